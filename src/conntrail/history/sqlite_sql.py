"""The SQLite store's schema and statements (text only, no I/O)."""

from __future__ import annotations

from conntrail.history.rows import COLUMNS, MUTABLE_COLUMNS

SCHEMA_VERSION = 1
ADDRESS_COLUMNS = ("orig_src", "orig_dst", "reply_src", "reply_dst")
COLUMN_LIST = ", ".join(COLUMNS)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS flows (
    id INTEGER PRIMARY KEY,
    start_ns INTEGER NOT NULL,      -- first known moment of the flow (part of its key)
    end_ns INTEGER,                 -- NULL while open
    closed_by INTEGER NOT NULL,     -- 0 open, 1 destroy, 2 vanished, 3 superseded
    netns TEXT NOT NULL,
    ct_id INTEGER NOT NULL,
    family INTEGER NOT NULL,
    proto INTEGER NOT NULL,
    orig_src BLOB NOT NULL,         -- packed address: 4 or 16 bytes
    orig_dst BLOB NOT NULL,
    orig_sport INTEGER,
    orig_dport INTEGER,
    reply_src BLOB,
    reply_dst BLOB,
    reply_sport INTEGER,
    reply_dport INTEGER,
    icmp_type INTEGER,
    icmp_code INTEGER,
    icmp_id INTEGER,
    nat INTEGER NOT NULL,           -- 0 none, 1 snat, 2 dnat, 3 both
    status INTEGER NOT NULL,
    state INTEGER,
    mark INTEGER,
    zone INTEGER,
    labels TEXT,
    orig_packets INTEGER,
    orig_bytes INTEGER,
    reply_packets INTEGER,
    reply_bytes INTEGER,
    pid INTEGER,
    uid INTEGER,
    gid INTEGER,
    exe TEXT,
    cmdline TEXT,
    unit TEXT
);
-- The flow's identity, and time windows as a range scan.
CREATE UNIQUE INDEX IF NOT EXISTS flows_key ON flows (start_ns, ct_id, netns);
-- who, SNAT: the public address and port are the reply tuple's destination.
CREATE INDEX IF NOT EXISTS flows_snat ON flows (reply_dst, reply_dport, start_ns, end_ns)
    WHERE nat IN (1, 3);
-- who, DNAT (and queries by destination): the original destination.
CREATE INDEX IF NOT EXISTS flows_dst ON flows (orig_dst, orig_dport, start_ns, end_ns);
-- who, local (and queries by source): the original source.
CREATE INDEX IF NOT EXISTS flows_src ON flows (orig_src, orig_sport, start_ns, end_ns);
-- The open flows, reloaded at start and closed by later dumps: few, so a small index.
CREATE INDEX IF NOT EXISTS flows_open ON flows (netns) WHERE end_ns IS NULL;
CREATE TABLE IF NOT EXISTS coverage (
    session INTEGER NOT NULL,
    netns TEXT NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    PRIMARY KEY (session, netns)
);
CREATE TABLE IF NOT EXISTS gaps (netns TEXT NOT NULL, at_ns INTEGER NOT NULL, lost INTEGER);
CREATE INDEX IF NOT EXISTS gaps_at ON gaps (at_ns);
"""

# New non-NULL values win for what a flow's life changes; its identity and tuples stay.
_MERGE = ", ".join(f"{name} = coalesce(excluded.{name}, {name})"
                   for name in MUTABLE_COLUMNS if name != "closed_by")
UPSERT = (
    f"INSERT INTO flows ({COLUMN_LIST}) VALUES ({', '.join('?' * len(COLUMNS))}) "
    "ON CONFLICT (start_ns, ct_id, netns) DO UPDATE SET "
    "closed_by = CASE WHEN excluded.end_ns IS NULL THEN closed_by ELSE excluded.closed_by END, "
    f"{_MERGE}"
)
CLOSE = ("UPDATE flows SET end_ns = ?, closed_by = ? "
         "WHERE start_ns = ? AND ct_id = ? AND netns = ? AND end_ns IS NULL")
COVERAGE = ("INSERT INTO coverage VALUES (?, ?, ?, ?) ON CONFLICT (session, netns) DO UPDATE "
            "SET start_ns = min(start_ns, excluded.start_ns), "
            "end_ns = max(end_ns, excluded.end_ns)")
DELETE_CHUNK = ("DELETE FROM flows WHERE id IN (SELECT id FROM flows WHERE start_ns < ? "
                "AND end_ns < ? LIMIT ?)")

# who: (role, column of the address, column of the port, the NAT condition its index has)
_WHO_ROLES = (
    ("snat", "reply_dst", "reply_dport", "nat IN (1, 3)"),
    ("dnat", "orig_dst", "orig_dport", "nat IN (2, 3)"),
    ("local", "orig_src", "orig_sport", "nat = 0"),
)


def who_statements(with_port: bool, with_proto: bool) -> list[tuple[str, str]]:
    """(role, statement) per role; parameters: address, [port], window end, window start,
    [proto], limit."""
    out = []
    for role, address, port, nat in _WHO_ROLES:
        where = [f"{address} = ?"]
        if with_port:
            where.append(f"{port} = ?")
        where += [nat, "start_ns <= ?", "(end_ns IS NULL OR end_ns >= ?)"]
        if with_proto:
            where.append("proto = ?")
        out.append((role, f"SELECT {COLUMN_LIST} FROM flows WHERE {' AND '.join(where)} "
                          "ORDER BY start_ns DESC LIMIT ?"))
    return out


def window_clauses(start_ns: int | None, end_ns: int | None) -> tuple[list[str], list[object]]:
    """Clauses for flows overlapping [start_ns, end_ns] (either bound may be open)."""
    clauses: list[str] = []
    params: list[object] = []
    if end_ns is not None:
        clauses.append("start_ns <= ?")
        params.append(end_ns)
    if start_ns is not None:
        clauses.append("(end_ns IS NULL OR end_ns >= ?)")
        params.append(start_ns)
    return clauses, params

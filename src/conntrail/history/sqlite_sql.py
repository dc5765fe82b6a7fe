"""The SQLite store's schema and statements (text only, no I/O)."""

from __future__ import annotations

from conntrail.history.rows import COLUMNS, MUTABLE_COLUMNS

SCHEMA_VERSION = 1
ADDRESS_COLUMNS = ("orig_src", "orig_dst", "reply_src", "reply_dst")
COLUMN_LIST = ", ".join(COLUMNS)

_COLUMNS_DDL = """
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
    unit TEXT"""

# Two tables: `open_flows` (small, changing) and `flows` (closed, written once, except when a
# late DESTROY corrects a "vanished" end).
#
# Closed rows carry `span`, the bit length of their duration in 2^20 ns (~1 ms) units (a flow
# of span b lasted < 2^(b+20) ns), and `bucket` = start_ns >> (span + 20). The flows of span b
# that cover moment T started in [T - 2^(b+20), T], so they sit in bucket T >> (b+20) or the
# one before: `who` is two index probes per span (at most 43), however long the history.
# The same keys make writes cheap at any size: indexes lead with (span, bucket), so a new
# row lands in the few recent buckets of its span, pages that stay cached, instead of at a
# random place of an index larger than memory (measured: without them the insert rate fell
# from 30k to 21k flows/s between 1 and 2 million stored flows).
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS flows ({_COLUMNS_DDL},
    span INTEGER NOT NULL,
    bucket INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS flows_key ON flows (start_ns, ct_id, netns);
CREATE INDEX IF NOT EXISTS flows_window ON flows (span, bucket, start_ns);
-- who, SNAT: the public address and port are the reply tuple's destination.
CREATE INDEX IF NOT EXISTS flows_snat ON flows
    (span, bucket, reply_dst, reply_dport, start_ns, end_ns) WHERE nat IN (1, 3);
-- who, DNAT (and queries by destination): the original destination.
CREATE INDEX IF NOT EXISTS flows_dst ON flows
    (span, bucket, orig_dst, orig_dport, start_ns, end_ns);
-- who, local (and queries by source): the original source.
CREATE INDEX IF NOT EXISTS flows_src ON flows
    (span, bucket, orig_src, orig_sport, start_ns, end_ns);
CREATE TABLE IF NOT EXISTS open_flows ({_COLUMNS_DDL});
CREATE UNIQUE INDEX IF NOT EXISTS open_key ON open_flows (start_ns, ct_id, netns);
CREATE INDEX IF NOT EXISTS open_snat ON open_flows (reply_dst, reply_dport);
CREATE INDEX IF NOT EXISTS open_dst ON open_flows (orig_dst, orig_dport);
CREATE INDEX IF NOT EXISTS open_src ON open_flows (orig_src, orig_sport);
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

SPAN_UNIT_BITS = 20  # span counts durations in 2^20 ns (~1 ms) units
MAX_SPAN = 42  # 2^62 ns, 146 years: longer than any flow, and within SQLite's int64


def span(start_ns: int, end_ns: int) -> int:
    """The span bucket of a closed flow: it lasted < 2^(span+20) ns (see SCHEMA)."""
    return min(MAX_SPAN, (max(0, end_ns - start_ns) >> SPAN_UNIT_BITS).bit_length())


def span_reach(span_: int) -> int:
    """How long (ns) a flow of this span may have lasted, at most: also its bucket width."""
    return 1 << (span_ + SPAN_UNIT_BITS)


def bucket(start_ns: int, span_: int) -> int:
    """The start bucket of a closed flow of this span."""
    return start_ns >> (span_ + SPAN_UNIT_BITS)


def buckets_covering(low_ns: int, high_ns: int, span_: int) -> tuple[int, int]:
    """First and last bucket holding flows of this span that overlap [low_ns, high_ns]."""
    return bucket(low_ns - span_reach(span_), span_), bucket(high_ns, span_)


_PLACEHOLDERS = ", ".join("?" * len(COLUMNS))
# New non-NULL values win for what a flow's life changes; its identity and tuples stay.
_MERGE = ", ".join(f"{name} = coalesce(excluded.{name}, {name})"
                   for name in MUTABLE_COLUMNS if name not in ("closed_by", "end_ns"))
OPEN_UPSERT = (f"INSERT INTO open_flows ({COLUMN_LIST}) VALUES ({_PLACEHOLDERS}) "
               f"ON CONFLICT (start_ns, ct_id, netns) DO UPDATE SET {_MERGE}")
# A closed row: written once; a second write (replay, or a late DESTROY after "vanished")
# takes the newer end and counters. What the closing event lacks (e.g. the attribution a NEW
# carried) comes from the open row, found by the key in the same statement.
_FIXED = frozenset({"start_ns", "closed_by", "netns", "ct_id", "family", "proto", "orig_src",
                    "orig_dst", "nat", "status"})
_CLOSED_VALUES = ", ".join(f"?{i}" if name in _FIXED else f"coalesce(?{i}, o.{name})"
                           for i, name in enumerate(COLUMNS, 1))
_KEY_ARGS = {name: COLUMNS.index(name) + 1 for name in ("start_ns", "ct_id", "netns")}
CLOSED_UPSERT = (
    f"INSERT INTO flows ({COLUMN_LIST}, span, bucket) SELECT {_CLOSED_VALUES}, "
    f"?{len(COLUMNS) + 1}, ?{len(COLUMNS) + 2} "
    "FROM (SELECT 1) LEFT JOIN open_flows o ON o.start_ns = ?{start_ns} AND "
    "o.ct_id = ?{ct_id} AND o.netns = ?{netns} WHERE true ".format(**_KEY_ARGS)
    + "ON CONFLICT (start_ns, ct_id, netns) DO UPDATE SET end_ns = excluded.end_ns, "
    f"closed_by = excluded.closed_by, span = excluded.span, bucket = excluded.bucket, {_MERGE}"
)
# Close an open row as it is (vanished, superseded): parameters end, closed_by, span, key.
MOVE_OPEN = (
    f"INSERT INTO flows ({COLUMN_LIST}, span, bucket) SELECT "
    + ", ".join("?1" if c == "end_ns" else "?2" if c == "closed_by" else c for c in COLUMNS)
    + f", ?3, start_ns >> (?3 + {SPAN_UNIT_BITS}) FROM open_flows "
    "WHERE start_ns = ?4 AND ct_id = ?5 AND netns = ?6 "
    "ON CONFLICT (start_ns, ct_id, netns) DO NOTHING"
)
# The open row's other columns fill in what a closing write lacks (e.g. a NEW's attribution).
DELETE_OPEN = "DELETE FROM open_flows WHERE start_ns = ? AND ct_id = ? AND netns = ?"
COVERAGE = ("INSERT INTO coverage VALUES (?, ?, ?, ?) ON CONFLICT (session, netns) DO UPDATE "
            "SET start_ns = min(start_ns, excluded.start_ns), "
            "end_ns = max(end_ns, excluded.end_ns)")
DELETE_CHUNK = ("DELETE FROM flows WHERE rowid IN (SELECT rowid FROM flows WHERE start_ns < ? "
                "AND end_ns < ? LIMIT ?)")
OLDEST_END = ("SELECT max(end_ns) FROM (SELECT end_ns FROM flows ORDER BY start_ns LIMIT ?)")
DELETE_OLDEST = ("DELETE FROM flows WHERE rowid IN (SELECT rowid FROM flows ORDER BY start_ns "
                 "LIMIT ?)")

# who: (role, column of the address, column of the port, the NAT condition)
WHO_ROLES = (
    ("snat", "reply_dst", "reply_dport", "nat IN (1, 3)"),
    ("dnat", "orig_dst", "orig_dport", "nat IN (2, 3)"),
    ("local", "orig_src", "orig_sport", "nat = 0"),
)


def who_closed(address: str, port: str, nat: str, with_port: bool, with_proto: bool,
               ranged: bool = False) -> str:
    """Closed flows of one span and bucket (or, `ranged`, a bucket range: a scan of those
    buckets) that used the endpoint in the window. Parameters: span, bucket (or first and
    last bucket), address, [port], window end, window start, [proto], limit."""
    buckets = "bucket BETWEEN ? AND ?" if ranged else "bucket = ?"
    where = ["span = ?", buckets, f"{address} = ?"] + ([f"{port} = ?"] if with_port else [])
    where += [nat, "start_ns <= ?", "end_ns >= ?"]
    where += ["proto = ?"] if with_proto else []
    return (f"SELECT {COLUMN_LIST} FROM flows WHERE {' AND '.join(where)} "
            "ORDER BY start_ns DESC LIMIT ?")


def who_open(address: str, port: str, nat: str, with_port: bool, with_proto: bool) -> str:
    """Open flows that used the endpoint and began before the window ended. Parameters:
    address, [port], window end, [proto], limit."""
    where = [f"{address} = ?"] + ([f"{port} = ?"] if with_port else [])
    where += [nat, "start_ns <= ?"] + (["proto = ?"] if with_proto else [])
    return (f"SELECT {COLUMN_LIST} FROM open_flows WHERE {' AND '.join(where)} "
            "ORDER BY start_ns DESC LIMIT ?")

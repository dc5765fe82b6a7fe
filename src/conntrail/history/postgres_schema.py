"""The PostgreSQL store's schema, migrations and statements (text only, no I/O).

Everything lives in the `conntrail` schema:
- `flows`: closed flows, RANGE-partitioned by start_ns into daily partitions the writer
  creates before it writes into them (no DEFAULT partition: it would block later ones).
- `flows_open`: the flows still open, a small live table; closing moves a row to `flows`.
- `during`: a stored tstzrange over [start, end] (unbounded while open), rounded outwards to
  the microsecond so it always contains the exact ns interval. "Who had IP:port at T" is one
  index probe per role (and partition): GiST (address, port, during) on `flows`, btree
  (address, port, start_ns) on `flows_open`, each partial on the role's NAT types.
- `coverage`, `gaps`: when recording ran, where events were lost.
- views: `flows_all` (both tables) and `ulog2_ct` (ulogd2's column names, for dashboards).
"""

from __future__ import annotations

from conntrail.history.rows import COLUMNS, MUTABLE_COLUMNS

SCHEMA = "conntrail"
DAY_NS = 86_400 * 10**9
ADDRESS_COLUMNS = ("orig_src", "orig_dst", "reply_src", "reply_dst")
LOCK_KEY = 0x636F6E6E747261  # advisory lock serialising schema and partition DDL

# FlowRow's columns, in its order, with their PostgreSQL types.
_TYPES = {
    "start_ns": "bigint NOT NULL", "end_ns": "bigint", "closed_by": "smallint NOT NULL",
    "netns": "text NOT NULL", "ct_id": "bigint NOT NULL", "family": "smallint NOT NULL",
    "proto": "smallint NOT NULL", "orig_src": "inet NOT NULL", "orig_dst": "inet NOT NULL",
    "orig_sport": "integer", "orig_dport": "integer", "reply_src": "inet", "reply_dst": "inet",
    "reply_sport": "integer", "reply_dport": "integer", "icmp_type": "smallint",
    "icmp_code": "smallint", "icmp_id": "integer", "nat": "smallint NOT NULL",
    "status": "bigint NOT NULL", "state": "smallint", "mark": "bigint", "zone": "integer",
    "labels": "text", "orig_packets": "bigint", "orig_bytes": "bigint",
    "reply_packets": "bigint", "reply_bytes": "bigint", "pid": "integer", "uid": "bigint",
    "gid": "bigint", "exe": "text", "cmdline": "text", "unit": "text",
}
assert tuple(_TYPES) == COLUMNS, "the PostgreSQL columns must follow FlowRow"

COLUMN_LIST = ", ".join(COLUMNS)
# What readers select: addresses as plain text (host() drops the /32 or /128).
SELECT_LIST = ", ".join(f"host({name}) AS {name}" if name in ADDRESS_COLUMNS else name
                        for name in COLUMNS)
_KEY_JOIN = "{a}.netns = {b}.netns AND {a}.ct_id = {b}.ct_id AND {a}.start_ns = {b}.start_ns"


def _columns_ddl(closed: bool) -> str:
    lines = [f"{name} {kind}" for name, kind in _TYPES.items()]
    if closed:
        lines[1] = "end_ns bigint NOT NULL"
    lines.append("during tstzrange NOT NULL "
                 "GENERATED ALWAYS AS (conntrail.ns_range(start_ns, end_ns)) STORED")
    lines.append("PRIMARY KEY (netns, ct_id, start_ns)")
    return ",\n    ".join(lines)


# who: (role, address column, port column, the NAT condition its partial index has)
WHO_ROLES = (
    ("snat", "reply_dst", "reply_dport", "nat IN (1, 3)"),
    ("dnat", "orig_dst", "orig_dport", "nat IN (2, 3)"),
    ("local", "orig_src", "orig_sport", "nat = 0"),
)


def _who_indexes(table: str) -> list[str]:
    """Per role, the address and port it is found by, with the time, over its NAT rows.
    Closed flows: GiST with `during` (inet_ops is the core class for addresses, btree_gist
    supplies the port's). Open flows end "never", so a btree on (address, port, start_ns)
    is as exact, and twice as cheap to keep up on a table with a row in and out per flow."""
    gist = table == "flows"
    return [f"CREATE INDEX {table}_{role} ON conntrail.{table} "
            + (f"USING gist ({addr} inet_ops, {port}, during)" if gist
               else f"({addr}, {port}, start_ns)") + f" WHERE {nat}"
            for role, addr, port, nat in WHO_ROLES]


def _ulog2_select(table: str, closed: bool) -> str:
    end_sec = "end_ns / 1000000000" if closed else "NULL::bigint"
    end_usec = "(end_ns % 1000000000) / 1000" if closed else "NULL::bigint"
    return f"""SELECT ct_id AS _ct_id, family AS oob_family,
    orig_src AS orig_ip_saddr_str, orig_dst AS orig_ip_daddr_str, proto AS orig_ip_protocol,
    orig_sport AS orig_l4_sport, orig_dport AS orig_l4_dport,
    orig_bytes AS orig_raw_pktlen, orig_packets AS orig_raw_pktcount,
    reply_src AS reply_ip_saddr_str, reply_dst AS reply_ip_daddr_str,
    proto AS reply_ip_protocol, reply_sport AS reply_l4_sport, reply_dport AS reply_l4_dport,
    reply_bytes AS reply_raw_pktlen, reply_packets AS reply_raw_pktcount,
    icmp_code, icmp_type, mark AS ct_mark,
    start_ns / 1000000000 AS flow_start_sec, (start_ns % 1000000000) / 1000 AS flow_start_usec,
    {end_sec} AS flow_end_sec, {end_usec} AS flow_end_usec,
    {4 if closed else 1}::smallint AS ct_event
FROM conntrail.{table}"""


# The whole of version 1. Each migration is a list of statements run in one transaction.
_V1 = [
    "CREATE EXTENSION IF NOT EXISTS btree_gist WITH SCHEMA conntrail",
    # Outward to whole microseconds (timestamptz's resolution); NULL end = still open.
    """CREATE FUNCTION conntrail.ns_range(lo bigint, hi bigint) RETURNS tstzrange
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN tstzrange(to_timestamp(floor(lo / 1000.0) / 1000000),
                     CASE WHEN hi IS NOT NULL
                          THEN to_timestamp(ceil(greatest(lo, hi) / 1000.0) / 1000000) END,
                     '[]')""",
    f"CREATE TABLE conntrail.flows (\n    {_columns_ddl(closed=True)}\n) "
    "PARTITION BY RANGE (start_ns)",
    f"CREATE TABLE conntrail.flows_open (\n    {_columns_ddl(closed=False)}\n)",
    *_who_indexes("flows"),
    *_who_indexes("flows_open"),
    # Time windows: flows started before the window's end and ended after its start.
    "CREATE INDEX flows_start ON conntrail.flows (start_ns)",
    "CREATE INDEX flows_end ON conntrail.flows (end_ns)",
    "CREATE INDEX flows_open_start ON conntrail.flows_open (start_ns)",
    """CREATE TABLE conntrail.coverage (
    session bigint NOT NULL, netns text NOT NULL,
    start_ns bigint NOT NULL, end_ns bigint NOT NULL,
    PRIMARY KEY (session, netns))""",
    "CREATE INDEX coverage_end ON conntrail.coverage (end_ns)",
    """CREATE TABLE conntrail.gaps (
    netns text NOT NULL, at_ns bigint NOT NULL, lost bigint,
    PRIMARY KEY (netns, at_ns))""",
    "CREATE INDEX gaps_at ON conntrail.gaps (at_ns)",
    f"""CREATE VIEW conntrail.flows_all AS
SELECT {COLUMN_LIST}, during FROM conntrail.flows
UNION ALL
SELECT {COLUMN_LIST}, during FROM conntrail.flows_open""",
    f"CREATE VIEW conntrail.ulog2_ct AS\n{_ulog2_select('flows', closed=True)}\n"
    f"UNION ALL\n{_ulog2_select('flows_open', closed=False)}",
]
MIGRATIONS: tuple[tuple[str, list[str]], ...] = (
    ("flows (daily partitions), flows_open, coverage, gaps, flows_all, ulog2_ct", _V1),
)
SCHEMA_VERSION = len(MIGRATIONS)

BOOTSTRAP = [
    "CREATE SCHEMA IF NOT EXISTS conntrail",
    """CREATE TABLE IF NOT EXISTS conntrail.schema_version (
    version integer PRIMARY KEY, description text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now())""",
]
VERSION = "SELECT coalesce(max(version), 0) FROM conntrail.schema_version"
PARTITIONS = ("SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
              "JOIN pg_class c ON c.oid = i.inhrelid "
              "WHERE i.inhparent = 'conntrail.flows'::regclass")

# --- writing --------------------------------------------------------------------------------

# The batch's upserts are COPYed here (one row per key, merged in Python), then moved.
STAGE = ("CREATE TEMP TABLE conntrail_stage (" + ", ".join(
    f"{name} {kind.removesuffix(' NOT NULL')}" for name, kind in _TYPES.items())
    + ") ON COMMIT DELETE ROWS")
COPY_STAGE = f"COPY conntrail_stage ({COLUMN_LIST}) FROM STDIN"


def _merge(target: str, source: str) -> str:
    """New non-NULL values win for what a flow's life changes; its identity stays."""
    return ", ".join(f"{name} = coalesce({source}.{name}, {target}.{name})"
                     for name in MUTABLE_COLUMNS)


# Open rows go live, unless that flow is already closed (a replayed older batch).
UPSERT_OPEN = f"""INSERT INTO conntrail.flows_open AS t ({COLUMN_LIST})
SELECT {COLUMN_LIST} FROM conntrail_stage s
WHERE s.end_ns IS NULL AND NOT EXISTS (
    SELECT 1 FROM conntrail.flows f WHERE {_KEY_JOIN.format(a="f", b="s")})
ON CONFLICT (netns, ct_id, start_ns) DO UPDATE SET {_merge("t", "excluded")}"""

# Closed rows leave flows_open (taking its fixed columns: the first write's) for flows.
_FROM_OPEN = ", ".join(
    f"coalesce(s.{name}, o.{name})" if name in MUTABLE_COLUMNS
    else f"CASE WHEN o.ct_id IS NULL THEN s.{name} ELSE o.{name} END"
    for name in COLUMNS)
UPSERT_CLOSED = f"""WITH o AS (
    DELETE FROM conntrail.flows_open d USING conntrail_stage s
    WHERE {_KEY_JOIN.format(a="d", b="s")} AND s.end_ns IS NOT NULL
    RETURNING d.*)
INSERT INTO conntrail.flows AS t ({COLUMN_LIST})
SELECT {_FROM_OPEN} FROM conntrail_stage s LEFT JOIN o ON {_KEY_JOIN.format(a="o", b="s")}
WHERE s.end_ns IS NOT NULL
ON CONFLICT (netns, ct_id, start_ns) DO UPDATE SET {_merge("t", "excluded")}"""

# A close applies to an open row only: it moves with the close's end and reason.
_CLOSED_FROM_OPEN = ", ".join(
    {"end_ns": "c_end", "closed_by": "c_by"}.get(name, name) for name in COLUMNS)
CLOSE = f"""WITH c AS (
    SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s::smallint[])
        AS c(netns, ct_id, start_ns, end_ns, closed_by)),
moved AS (
    DELETE FROM conntrail.flows_open o USING c WHERE {_KEY_JOIN.format(a="o", b="c")}
    RETURNING o.*, c.end_ns AS c_end, c.closed_by AS c_by)
INSERT INTO conntrail.flows ({COLUMN_LIST}) SELECT {_CLOSED_FROM_OPEN} FROM moved
ON CONFLICT (netns, ct_id, start_ns) DO NOTHING"""

COVERAGE = """INSERT INTO conntrail.coverage AS t (session, netns, start_ns, end_ns)
SELECT * FROM unnest(%s::bigint[], %s::text[], %s::bigint[], %s::bigint[])
ON CONFLICT (session, netns) DO UPDATE
SET start_ns = least(t.start_ns, excluded.start_ns), end_ns = greatest(t.end_ns, excluded.end_ns)"""

GAPS = """INSERT INTO conntrail.gaps (netns, at_ns, lost)
SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[])
ON CONFLICT (netns, at_ns) DO NOTHING"""

# --- reading --------------------------------------------------------------------------------


def who_statement(with_port: bool, with_proto: bool) -> str:
    """All roles, newest first. Parameters per role: address, [port], window start, window
    end, window end, window start, [proto]; then the limit."""
    parts = []
    for role, address, port, nat in WHO_ROLES:
        where = [nat, f"{address} = %s::inet"]
        if with_port:
            where.append(f"{port} = %s")
        # `during` finds the candidates in the index; the ns bounds are the exact test.
        where += ["during && conntrail.ns_range(%s, %s)", "start_ns <= %s",
                  "(end_ns IS NULL OR end_ns >= %s)"]
        if with_proto:
            where.append("proto = %s")
        parts.append(f"SELECT '{role}' AS role, {SELECT_LIST} FROM conntrail.flows_all "
                     f"WHERE {' AND '.join(where)}")
    return ("\nUNION ALL\n".join(parts)
            + "\nORDER BY start_ns DESC, netns, ct_id LIMIT %s")


def flows_source(state: str) -> str:
    """The relation a query reads for a state: open, closed or any."""
    return {"open": "conntrail.flows_open", "closed": "conntrail.flows"}.get(
        state, "conntrail.flows_all")

"""The PostgreSQL store against a real server the tests start: schema, COPY, partitions,
upsert idempotence, who, the ulog2_ct view, errors, and spool + replay across a restart."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conntrail.errors import ConfigError
from conntrail.history.rows import ClosedBy, CloseOp, Coverage, FlowRow, Gap, HistoryBatch
from conntrail.history.store import FlowQuery, WhoQuery, open_store
from tests.integration.pg import PG_BIN, PgCluster, pg_cluster

psycopg = pytest.importorskip("psycopg")
from conntrail.history.pgwriter import SpoolingWriter  # noqa: E402  (needs psycopg)
from conntrail.history.postgres import PostgresStore  # noqa: E402

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not (PG_BIN / "initdb").exists(), reason="PostgreSQL 15 not installed"),
]

DAY = 86_400 * 10**9
S = 10**9
T0 = 1_700_000_000 * S  # 2023-11-14T22:13:20Z
_DBS = itertools.count()
ULOG2_CT = ["_ct_id", "oob_family", "orig_ip_saddr_str", "orig_ip_daddr_str",
            "orig_ip_protocol", "orig_l4_sport", "orig_l4_dport", "orig_raw_pktlen",
            "orig_raw_pktcount", "reply_ip_saddr_str", "reply_ip_daddr_str",
            "reply_ip_protocol", "reply_l4_sport", "reply_l4_dport", "reply_raw_pktlen",
            "reply_raw_pktcount", "icmp_code", "icmp_type", "ct_mark", "flow_start_sec",
            "flow_start_usec", "flow_end_sec", "flow_end_usec", "ct_event"]


def flow(ct_id: int, start: int, end: int | None = None, *, nat: int = 1,
         orig: tuple[str, int, str, int] = ("10.0.0.2", 40000, "198.51.100.1", 443),
         reply: tuple[str, int, str, int] = ("198.51.100.1", 443, "203.0.113.1", 50000),
         proto: int = 6, pid: int | None = None, exe: str | None = None,
         packets: int | None = None, family: int = 2) -> FlowRow:
    """A flow row: open unless `end`; SNAT by default (10.0.0.2 seen as 203.0.113.1)."""
    closed_by = ClosedBy.OPEN if end is None else ClosedBy.DESTROY
    return FlowRow(start, end, int(closed_by), "host", ct_id, family, proto,
                   orig[0], orig[2], orig[1], orig[3], reply[0], reply[2], reply[1], reply[3],
                   None, None, None, nat, 0x1BE, 3, 7, 0, None, packets, None if packets is None
                   else packets * 100, packets, None if packets is None else packets * 100,
                   pid, None if pid is None else 1000, None, exe, None, None)


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    """One server for the module (each test has its own database; throwaway, so no fsync)."""
    with pg_cluster(fsync=False) as started:
        yield started


@pytest.fixture
def dsn(cluster: PgCluster) -> str:
    return cluster.create_database(f"t{next(_DBS)}")


@pytest.fixture
def store(dsn: str) -> Iterator[PostgresStore]:
    opened = PostgresStore(dsn, create=True)
    try:
        yield opened
    finally:
        opened.close()


def sql(store: PostgresStore, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of a statement on the store's own connection (none for a command)."""
    cursor = store._conn.execute(statement, params or None)
    return cursor.fetchall() if cursor.description is not None else []


def snapshot(store: PostgresStore) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows, sorted: equal snapshots mean nothing changed."""
    return {table: sorted(sql(store, f"SELECT * FROM conntrail.{table}"), key=repr)
            for table in ("flows", "flows_open", "coverage", "gaps")}


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------


def test_schema_creation_is_idempotent_and_versioned(dsn: str) -> None:
    for _ in range(2):
        PostgresStore(dsn, create=True).close()
    store = PostgresStore(dsn, create=False)
    try:
        assert sql(store, "SELECT version FROM conntrail.schema_version") == [(1,)]
        tables = {name for (name,) in sql(
            store, "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = "
            "c.relnamespace WHERE n.nspname = 'conntrail' AND c.relkind IN ('r', 'p', 'v')")}
        assert {"flows", "flows_open", "coverage", "gaps", "schema_version", "flows_all",
                "ulog2_ct"} <= tables
        assert sql(store, "SELECT count(*) FROM pg_extension WHERE extname = 'btree_gist'") \
            == [(1,)]
        assert sql(store, "SELECT partstrat FROM pg_partitioned_table WHERE partrelid = "
                   "'conntrail.flows'::regclass") == [("r",)]
    finally:
        store.close()


def test_newer_schema_is_refused(store: PostgresStore, dsn: str) -> None:
    sql(store, "INSERT INTO conntrail.schema_version VALUES (99, 'from the future')")
    with pytest.raises(ConfigError, match="schema version 99, newer"):
        PostgresStore(dsn, create=True)


def test_reader_on_an_empty_database_is_told_clearly(dsn: str) -> None:
    with pytest.raises(ConfigError, match="no conntrail history in postgresql://") as info:
        open_store(dsn, create=False)
    assert info.value.path == "--store"


def test_unreachable_database_at_open_names_the_problem(cluster: PgCluster) -> None:
    dsn = (f"postgresql://postgres:s3cret@/conntrail?host={cluster.root}/nowhere"
           f"&port={cluster.port}")
    with pytest.raises(ConfigError) as info:
        open_store(dsn, "--store", create=True)
    message = str(info.value)
    assert message.startswith(f"--store: cannot connect to postgresql://postgres@/conntrail?"
                              f"host={cluster.root}/nowhere")
    assert "No such file or directory" in message
    assert "s3cret" not in message and "\n" not in message and "Traceback" not in message


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def test_copy_path_10k_rows_in_one_batch(store: PostgresStore) -> None:
    opened = [flow(i, T0 + i * 1000, pid=i) for i in range(10_000)]
    closed = [flow(i, T0 + i * 1000, T0 + i * 1000 + 5 * S, packets=3) for i in range(10_000)]
    began = time.perf_counter()
    store.apply(HistoryBatch(upserts=opened))
    middle = time.perf_counter()
    store.apply(HistoryBatch(upserts=closed))
    done = time.perf_counter()
    print(f"\n10k open rows: {10_000 / (middle - began):,.0f} rows/s; "
          f"10k closing rows: {10_000 / (done - middle):,.0f} rows/s")
    assert sql(store, "SELECT count(*), count(DISTINCT (netns, ct_id, start_ns)), "
               "sum(orig_packets), count(pid) FROM conntrail.flows") == [(10_000, 10_000,
                                                                           30_000, 10_000)]
    assert sql(store, "SELECT count(*) FROM conntrail.flows_open") == [(0,)]


def partitions(store: PostgresStore) -> list[str]:
    """Names of the partitions of flows."""
    return [name for (name,) in sql(store, "SELECT c.relname::text FROM pg_inherits i JOIN "
                                    "pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = "
                                    "'conntrail.flows'::regclass ORDER BY 1")]


def test_partitions_are_created_for_rows_spanning_three_days(store: PostgresStore) -> None:
    midnight = 1_699_920_000 * S  # 2023-11-14T00:00:00Z
    rows = [flow(i, midnight + i * DAY // 2 + S, midnight + i * DAY // 2 + 2 * DAY)
            for i in range(6)]
    store.apply(HistoryBatch(upserts=rows))
    per_partition = sql(store, "SELECT tableoid::regclass::text, count(*) FROM conntrail.flows "
                        "GROUP BY 1 ORDER BY 1")
    assert per_partition == [("conntrail.flows_20231114", 2), ("conntrail.flows_20231115", 2),
                             ("conntrail.flows_20231116", 2)]
    # Plus the next day's, made a day early.
    assert partitions(store) == ["flows_20231114", "flows_20231115", "flows_20231116",
                                 "flows_20231117"]
    # Open rows live in flows_open: no partition until they close.
    later = midnight + 10 * DAY
    store.apply(HistoryBatch(upserts=[flow(99, later)]))
    assert len(partitions(store)) == 4
    store.apply(HistoryBatch(closes=[CloseOp("host", 99, later, later + S, 2)]))
    assert sql(store, "SELECT tableoid::regclass::text FROM conntrail.flows WHERE ct_id = 99") \
        == [("conntrail.flows_20231124",)]
    assert partitions(store)[-2:] == ["flows_20231124", "flows_20231125"]


def test_partitions_made_by_hand_are_respected(store: PostgresStore) -> None:
    midnight = 1_699_920_000 * S
    # Someone made a partition for the afternoon of the 14th only.
    sql(store, f"CREATE TABLE conntrail.manual PARTITION OF conntrail.flows FOR VALUES "
        f"FROM ({midnight + DAY // 2}) TO ({midnight + DAY})")
    store.apply(HistoryBatch(upserts=[flow(1, midnight + S, midnight + 2 * S),
                                      flow(2, midnight + DAY // 2 + S, midnight + DAY)]))
    assert sql(store, "SELECT ct_id, tableoid::regclass::text FROM conntrail.flows "
               "ORDER BY 1") == [(1, f"conntrail.flows_20231114_{midnight}"),
                                 (2, "conntrail.manual")]


def test_a_partition_dropped_behind_the_writers_back_is_recreated(store: PostgresStore) -> None:
    store.apply(HistoryBatch(upserts=[flow(1, T0, T0 + S)]))
    sql(store, "DROP TABLE conntrail.flows_20231114")
    store.apply(HistoryBatch(upserts=[flow(2, T0 + S, T0 + 2 * S)]))
    assert sql(store, "SELECT ct_id FROM conntrail.flows") == [(2,)]


def test_applying_the_same_batches_twice_changes_nothing(store: PostgresStore) -> None:
    first = HistoryBatch(upserts=[flow(1, T0), flow(2, T0 + 1), flow(3, T0 + 2, T0 + S)],
                         coverage=[Coverage(5, "host", T0, T0 + S)],
                         gaps=[Gap("host", T0 + 7, 12)])
    second = HistoryBatch(upserts=[flow(1, T0, T0 + 2 * S, packets=9)],
                          closes=[CloseOp("host", 2, T0 + 1, T0 + 3 * S, 2)],
                          coverage=[Coverage(5, "host", T0, T0 + 3 * S)])
    store.apply(first)
    store.apply(second)
    once = snapshot(store)
    # A replay after a crash between commit and spool delete: everything again, in order.
    store.apply(first)
    assert snapshot(store) == once
    store.apply(second)
    assert snapshot(store) == once
    assert sql(store, "SELECT count(*) FROM conntrail.flows") == [(3,)]
    assert sql(store, "SELECT count(*) FROM conntrail.flows_open") == [(0,)]


def test_duplicate_keys_within_one_batch_merge(store: PostgresStore) -> None:
    store.apply(HistoryBatch(upserts=[flow(1, T0, pid=4), flow(1, T0, T0 + S, packets=2)]))
    (row,) = store.query(FlowQuery())
    assert (row.end_ns, row.pid, row.orig_packets) == (T0 + S, 4, 2)


def test_open_then_close_moves_the_row(store: PostgresStore) -> None:
    store.apply(HistoryBatch(upserts=[flow(1, T0, pid=42, exe="/usr/bin/curl")]))
    assert sql(store, "SELECT ct_id FROM conntrail.flows_open") == [(1,)]
    # The DESTROY knows no process, and the kernel reports a different original port (never
    # happens, but shows that fixed columns keep the first write's value).
    closing = flow(1, T0, T0 + 3 * S, packets=5,
                   orig=("10.0.0.2", 1, "198.51.100.1", 443))
    store.apply(HistoryBatch(upserts=[closing]))
    assert sql(store, "SELECT count(*) FROM conntrail.flows_open") == [(0,)]
    (row,) = store.query(FlowQuery(state="closed"))
    assert (row.end_ns, row.closed_by, row.orig_packets) == (T0 + 3 * S, ClosedBy.DESTROY, 5)
    assert (row.pid, row.exe, row.orig_sport) == (42, "/usr/bin/curl", 40000)
    assert list(store.query(FlowQuery(state="open"))) == []


def test_close_op_takes_the_open_row_and_ignores_the_rest(store: PostgresStore) -> None:
    store.apply(HistoryBatch(upserts=[flow(1, T0, pid=7, packets=1)]))
    store.apply(HistoryBatch(closes=[CloseOp("host", 1, T0, T0 + 9 * S, ClosedBy.VANISHED),
                                     CloseOp("host", 404, T0, T0 + S, ClosedBy.VANISHED)]))
    (row,) = store.query(FlowQuery(state="any"))
    assert row == flow(1, T0, T0 + 9 * S, pid=7, packets=1)._replace(
        closed_by=int(ClosedBy.VANISHED))
    # A close of a row already closed changes nothing.
    store.apply(HistoryBatch(closes=[CloseOp("host", 1, T0, T0 + 99 * S, ClosedBy.SUPERSEDED)]))
    assert list(store.query(FlowQuery())) == [row]


def test_load_open_coverage_and_gaps(store: PostgresStore) -> None:
    store.apply(HistoryBatch(upserts=[flow(1, T0), flow(2, T0 + 1, T0 + S)],
                             coverage=[Coverage(5, "host", T0, T0 + S),
                                       Coverage(5, "host", T0 - S, T0 + 2 * S),
                                       Coverage(6, "other", T0, T0 + 4 * S)],
                             gaps=[Gap("host", T0 + S, None), Gap("host", T0 + 9 * S, 3)]))
    rows, alive = store.load_open(["host"])
    assert [row.ct_id for row in rows] == [1] and alive == {"host": T0 + 2 * S}
    assert store.coverage(T0, T0) == [Coverage(5, "host", T0 - S, T0 + 2 * S),
                                      Coverage(6, "other", T0, T0 + 4 * S)]
    assert store.gaps(T0, T0 + 5 * S) == [("host", T0 + S, None)]


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def nat_flows(store: PostgresStore) -> PostgresStore:
    """203.0.113.1 is the gateway's public address, used three ways."""
    snat = flow(1, T0, T0 + 10 * S)  # 10.0.0.2:40000 left as 203.0.113.1:50000
    dnat = flow(2, T0 + S, T0 + 5 * S, nat=2,  # 198.51.100.9 → :8080, forwarded to .10:80
                orig=("198.51.100.9", 5555, "203.0.113.1", 8080),
                reply=("192.168.1.10", 80, "198.51.100.9", 5555))
    local = flow(3, T0 + 2 * S, None, nat=0,  # the gateway's own connection, still open
                 orig=("203.0.113.1", 33333, "198.51.100.1", 443),
                 reply=("198.51.100.1", 443, "203.0.113.1", 33333))
    v6 = flow(4, T0 + 3 * S, T0 + 4 * S, nat=0, family=10, proto=17,
              orig=("2001:db8::1", 53000, "2001:db8:1::53", 53),
              reply=("2001:db8:1::53", 53, "2001:db8::1", 53000))
    store.apply(HistoryBatch(upserts=[snat, dnat, local, v6]))
    return store


def test_who_finds_each_role(nat_flows: PostgresStore) -> None:
    def who(port: int | None, at: int, **kw: Any) -> list[tuple[str, tuple[Any, Any]]]:
        return [(match.role, match.inside) for match in nat_flows.who(
            WhoQuery("203.0.113.1", port, at, at, **kw))]

    assert who(50000, T0 + 5 * S) == [("snat", ("10.0.0.2", 40000))]
    assert who(8080, T0 + 2 * S) == [("dnat", ("192.168.1.10", 80))]
    assert who(33333, T0 + 100 * DAY) == [("local", ("203.0.113.1", 33333))]  # still open
    assert who(None, T0 + 3 * S) == [("local", ("203.0.113.1", 33333)),
                                     ("dnat", ("192.168.1.10", 80)),
                                     ("snat", ("10.0.0.2", 40000))]
    assert who(None, T0 + 3 * S, limit=1) == [("local", ("203.0.113.1", 33333))]
    assert who(50000, T0 + 5 * S, proto=17) == []
    v6 = nat_flows.who(WhoQuery("2001:db8::1", 53000, T0 + 3 * S, T0 + 3 * S))
    assert [(m.role, m.row.orig_src, m.row.orig_dst) for m in v6] == \
        [("local", "2001:db8::1", "2001:db8:1::53")]


def test_who_at_a_time_with_no_flow_is_empty(nat_flows: PostgresStore) -> None:
    assert nat_flows.who(WhoQuery("203.0.113.1", 50000, T0 + 11 * S, T0 + 20 * S)) == []
    assert nat_flows.who(WhoQuery("203.0.113.1", 50000, T0 - 5 * S, T0 - 1)) == []
    assert nat_flows.who(WhoQuery("203.0.113.2", None, T0, T0 + DAY)) == []
    # The ns bounds are exact, though the index ranges are microseconds.
    assert nat_flows.who(WhoQuery("203.0.113.1", 50000, T0 + 10 * S + 1, T0 + 11 * S)) == []
    assert len(nat_flows.who(WhoQuery("203.0.113.1", 50000, T0 + 10 * S, T0 + 11 * S))) == 1


def test_who_is_one_index_probe_per_role(nat_flows: PostgresStore) -> None:
    from conntrail.history.postgres_schema import who_statement

    sql(nat_flows, "SET enable_seqscan = off")  # tiny tables: show the index is usable
    plan = "\n".join(line for (line,) in sql(
        nat_flows, "EXPLAIN " + who_statement(True, False),
        *(["203.0.113.1", 50000, T0, T0, T0, T0] * 3), 10))
    for index in ("flows_20231114_reply_dst_reply_dport_during_idx", "flows_open_snat",
                  "flows_open_dnat", "flows_open_local"):
        assert f"Index Scan using {index}" in plan


def test_query_windows_states_attributes_and_order(store: PostgresStore) -> None:
    store.apply(HistoryBatch(upserts=[
        flow(1, T0, T0 + S, pid=10, exe="/usr/bin/curl"),
        flow(2, T0 + 2 * S, T0 + 3 * S, pid=11, exe="/usr/sbin/sshd"),
        flow(3, T0 + 4 * S, None, pid=12, exe="/usr/bin/wget_x%"),
    ]))

    def ids(**kw: Any) -> list[int]:
        return [row.ct_id for row in store.query(FlowQuery(**kw))]

    assert ids() == [1, 2, 3]
    assert ids(newest_first=True, limit=2) == [3, 2]
    assert ids(start_ns=T0 + S + 1, end_ns=T0 + 2 * S) == [2]
    assert ids(start_ns=T0 + 100 * S) == [3]  # open: still going
    assert ids(state="open") == [3] and ids(state="closed") == [1, 2]
    assert ids(attributes={"pid": 11}) == [2]
    assert ids(attributes={"exe": "/usr/bin/*"}) == [1, 3]
    assert ids(attributes={"exe": "*_x%"}) == [3] and ids(attributes={"exe": "*x_%"}) == []
    with pytest.raises(ConfigError, match="unknown attribute"):
        store.query(FlowQuery(attributes={"comm": "x"}))


def test_query_with_a_filter_expression(nat_flows: PostgresStore) -> None:
    pytest.importorskip("conntrail.history.sqlwhere")
    from conntrail.filters.parser import parse

    def ids(text: str) -> list[int]:
        return [row.ct_id for row in nat_flows.query(FlowQuery(where=parse(text)))]

    assert ids("dport == 8080") == [2]
    assert ids("src in 10.0.0.0/8 or src == 2001:db8::1") == [1, 4]
    assert ids("reply.dst == 203.0.113.1 and proto == tcp") == [1, 3]


def test_ulog2_ct_view_has_ulogd2_columns(nat_flows: PostgresStore) -> None:
    cursor = nat_flows._conn.execute("SELECT * FROM conntrail.ulog2_ct ORDER BY _ct_id")
    assert cursor.description is not None
    assert [column.name for column in cursor.description] == ULOG2_CT
    rows = {row[0]: dict(zip(ULOG2_CT, row, strict=True)) for row in cursor.fetchall()}
    snat, local = rows[1], rows[3]
    assert (str(snat["orig_ip_saddr_str"]), str(snat["reply_ip_daddr_str"])) == \
        ("10.0.0.2", "203.0.113.1")
    assert (snat["flow_start_sec"], snat["flow_start_usec"], snat["flow_end_sec"],
            snat["flow_end_usec"], snat["ct_event"]) == (1_700_000_000, 0, 1_700_000_010, 0, 4)
    assert (local["ct_event"], local["flow_end_sec"], local["flow_start_sec"]) == \
        (1, None, 1_700_000_002)


# ---------------------------------------------------------------------------------------------
# Spool and replay across a real restart
# ---------------------------------------------------------------------------------------------


def test_spool_and_replay_across_a_database_restart(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with pg_cluster() as server:
        dsn = server.create_database("replay")
        writer = SpoolingWriter(lambda: PostgresStore(dsn, create=True), tmp_path / "spool",
                                min_backoff_s=0.0, max_backoff_s=0.0)
        try:
            _replay_scenario(server, writer, dsn)
        finally:
            writer.close()
    assert any(r.levelname == "ERROR" and "spooling" in r.message for r in caplog.records)
    assert any(r.levelname == "INFO" and "replayed 6 spooled batches" in r.message
               for r in caplog.records)


def _batch(number: int) -> HistoryBatch:
    """Batch n opens 100 flows and closes the 100 batch n-1 opened; flow 0 is rewritten by
    every batch (its pid is the batch's number), so order shows in the result."""
    opened = [flow(number * 1000 + i, T0 + number * S + i) for i in range(1, 101)]
    closed = [flow((number - 1) * 1000 + i, T0 + (number - 1) * S + i, T0 + number * S)
              for i in range(1, 101)] if number else []
    return HistoryBatch(upserts=[*opened, *closed, flow(0, T0, pid=number)],
                        coverage=[Coverage(1, "host", T0, T0 + number * S)])


def _replay_scenario(server: PgCluster, writer: SpoolingWriter, dsn: str) -> None:
    writer.apply(_batch(0))
    writer.apply(_batch(1))
    server.stop()
    for number in range(2, 8):  # the first fails mid-connection, the rest go straight on
        writer.apply(_batch(number))
    assert writer.pending() == 6 and writer.store is None
    server.start()
    writer.apply(_batch(8))  # replays 2…7 in order, then writes 8
    assert writer.pending() == 0
    check = PostgresStore(dsn, create=False)
    try:
        assert sql(check, "SELECT count(*), count(DISTINCT (netns, ct_id, start_ns)) "
                   "FROM conntrail.flows") == [(800, 800)]
        assert sql(check, "SELECT count(*), min(ct_id), max(ct_id) FROM conntrail.flows_open "
                   "WHERE ct_id > 0") == [(100, 8001, 8100)]
        assert sql(check, "SELECT pid FROM conntrail.flows_open WHERE ct_id = 0") == [(8,)]
        assert check.coverage(T0, T0) == [Coverage(1, "host", T0, T0 + 8 * S)]
        # A crash between the last commit and the spool delete: the replay changes nothing.
        before = snapshot(check)
        for number in range(2, 9):
            check.apply(_batch(number))
        assert snapshot(check) == before
    finally:
        check.close()

"""The flow lifecycle (sans-IO): events in, row operations out, and the SQLite store under it."""

from __future__ import annotations

from pathlib import Path

import pytest

from conntrail.errors import ConfigError
from conntrail.history.rows import ClosedBy, HistoryBatch, Lifecycle
from conntrail.history.sqlite import SqliteStore
from conntrail.history.store import FlowQuery, WhoQuery
from conntrail.model import (
    Counters,
    CtStatus,
    EventKind,
    Flow,
    FlowEvent,
    FlowTuple,
    LossNotice,
    TableSnapshot,
)

S = 1_000_000_000
T0 = 1_795_000_000 * S
SNAT = CtStatus.CONFIRMED | CtStatus.SRC_NAT | CtStatus.SEEN_REPLY


def event(kind: EventKind, ct_id: int, sport: int, at: int, *, start: int | None = None,
          stop: int | None = None, public_port: int | None = None) -> FlowEvent:
    """A masqueraded TCP flow 198.18.1.2:sport → 198.18.2.2:80 via 198.18.2.1."""
    orig = FlowTuple(2, 6, "198.18.1.2", "198.18.2.2", sport, 80)
    reply = FlowTuple(2, 6, "198.18.2.2", "198.18.2.1", 80, public_port or sport)
    counters = Counters(3, 300) if kind is EventKind.DESTROY else None
    flow = Flow(orig=orig, reply=reply, status=SNAT, ct_id=ct_id, start_ns=start, stop_ns=stop,
                event_ns=at, counters_orig=counters, counters_reply=counters)
    return FlowEvent(kind, flow, "gw", at)


@pytest.fixture
def life() -> Lifecycle:
    return Lifecycle(session=1, netns=["gw"], started_ns=T0 - S)


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    return SqliteStore(str(tmp_path / "h.sqlite"), create=True)


def test_new_then_destroy_is_one_row_keyed_by_the_new(life: Lifecycle) -> None:
    opened = life.feed([event(EventKind.NEW, 7, 40000, T0)], T0)
    closed = life.feed([event(EventKind.DESTROY, 7, 40000, T0 + 5 * S, start=T0 - 50,
                              stop=T0 + 5 * S)], T0 + 5 * S)
    [row_open], [row_closed] = opened.upserts, closed.upserts
    assert row_open.key == row_closed.key == ("gw", 7, T0)  # the NEW's stamp, kept
    assert (row_open.end_ns, row_closed.end_ns) == (None, T0 + 5 * S)
    assert row_closed.closed_by == ClosedBy.DESTROY and row_closed.orig_bytes == 300
    assert (row_closed.nat, row_closed.reply_dst) == (1, "198.18.2.1")
    assert life.open_count() == 0


def test_the_first_reply_is_stored_at_once_and_later_updates_are_not(
        life: Lifecycle) -> None:
    def unanswered(kind: EventKind, at: int) -> FlowEvent:
        base = event(kind, 7, 40000, at)
        return base._replace(flow=base.flow._replace(status=CtStatus.CONFIRMED))

    opened = life.feed([unanswered(EventKind.NEW, T0)], T0)
    quiet = life.feed([unanswered(EventKind.UPDATE, T0 + 1)], T0 + 1)
    answered = life.feed([event(EventKind.UPDATE, 7, 40000, T0 + 2),
                          event(EventKind.UPDATE, 7, 40000, T0 + 3)], T0 + 3)
    assert not quiet.upserts
    [row_open], [row_answered] = opened.upserts, answered.upserts
    assert row_answered.key == row_open.key and row_answered.end_ns is None
    assert row_answered.status & CtStatus.SEEN_REPLY and not row_open.status & CtStatus.SEEN_REPLY
    other = life.feed([event(EventKind.UPDATE, 8, 40001, T0 + 4)], T0 + 4)
    assert not other.upserts  # an update of a flow we never opened writes nothing


def test_destroy_without_new_uses_the_kernel_start(life: Lifecycle) -> None:
    [row] = life.feed([event(EventKind.DESTROY, 9, 40001, T0, start=T0 - 9 * S,
                             stop=T0)], T0).upserts
    assert (row.start_ns, row.end_ns, row.closed_by) == (T0 - 9 * S, T0, ClosedBy.DESTROY)


def test_a_reused_id_supersedes_and_its_late_destroy_lands_on_the_same_row(
        life: Lifecycle) -> None:
    life.feed([event(EventKind.NEW, 5, 40000, T0)], T0)
    batch = life.feed([event(EventKind.NEW, 5, 40009, T0 + S)], T0 + S)
    [close] = batch.closes
    assert (close.start_ns, close.end_ns, close.closed_by) == (T0, T0 + S,
                                                               ClosedBy.SUPERSEDED)
    late = life.feed([event(EventKind.DESTROY, 5, 40000, T0 + 2 * S, start=T0 - 10,
                            stop=T0 + S // 2)], T0 + 2 * S)
    assert late.upserts[0].start_ns == T0  # not a second row at the kernel's start
    assert life.open_count() == 1  # the new flow with the reused id stays open


def test_a_dump_closes_what_it_no_longer_contains(life: Lifecycle) -> None:
    life.feed([event(EventKind.NEW, 1, 40000, T0), event(EventKind.NEW, 2, 40001, T0)], T0)
    batch = life.feed([event(EventKind.DUMP, 2, 40001, T0 + 9 * S, start=T0 - 5),
                       TableSnapshot("gw", 1, T0 + 8 * S)], T0 + 9 * S)
    assert [(u.ct_id, u.start_ns) for u in batch.upserts] == [(2, T0)]  # same row as the NEW
    [close] = batch.closes
    assert (close.ct_id, close.end_ns, close.closed_by) == (1, T0 + 8 * S, ClosedBy.VANISHED)
    assert batch.coverage  # a close forces a coverage update


def test_rows_left_open_by_an_earlier_run_end_at_its_last_record(life: Lifecycle,
                                                                 store: SqliteStore) -> None:
    store.apply(life.feed([event(EventKind.NEW, 1, 40000, T0)], T0))
    rows, seen = store.load_open(["gw"])
    assert [r.ct_id for r in rows] == [1] and seen == {"gw": T0}
    later = Lifecycle(session=2, netns=["gw"], started_ns=T0 + 60 * S)
    later.seed(rows, seen)
    batch = later.feed([TableSnapshot("gw", 0, T0 + 61 * S)], T0 + 61 * S)
    assert [(c.ct_id, c.end_ns, c.closed_by) for c in batch.closes] == [
        (1, T0, ClosedBy.UNRECORDED)]


def test_losses_become_gaps(life: Lifecycle) -> None:
    batch = life.feed([LossNotice("gw", "enobufs", 12, T0)], T0)
    assert [(g.netns, g.at_ns, g.lost) for g in batch.gaps] == [("gw", T0, 12)]


def test_store_upserts_are_idempotent_and_who_finds_open_and_closed(
        life: Lifecycle, store: SqliteStore) -> None:
    first = life.feed([event(EventKind.NEW, 1, 40000, T0),
                       event(EventKind.NEW, 2, 40001, T0 + S, public_port=50000)], T0 + S)
    second = life.feed([event(EventKind.DESTROY, 1, 40000, T0 + 3 * S, start=T0,
                              stop=T0 + 3 * S)], T0 + 3 * S)
    for batch in (first, second, first, second):  # a replay changes nothing
        store.apply(batch)
    rows = list(store.query(FlowQuery()))
    assert [(r.ct_id, r.end_ns) for r in rows] == [(1, T0 + 3 * S), (2, None)]
    [hit] = store.who(WhoQuery("198.18.2.1", 40000, T0 + 2 * S, T0 + 2 * S))
    assert (hit.role, hit.inside) == ("snat", ("198.18.1.2", 40000))
    [hit] = store.who(WhoQuery("198.18.2.1", 50000, T0 + 9 * S, T0 + 9 * S))
    assert hit.inside == ("198.18.1.2", 40001)  # still open: found at any later moment
    assert store.who(WhoQuery("198.18.2.1", 40000, T0 + 4 * S, T0 + 4 * S)) == []
    assert store.who(WhoQuery("198.18.2.1", 50000, T0 - S, T0 - S)) == []


def test_windows_find_long_flows_by_their_span(store: SqliteStore) -> None:
    life = Lifecycle(session=1, netns=["gw"], started_ns=T0)
    day = 86_400 * S
    store.apply(life.feed([event(EventKind.DESTROY, 1, 40000, T0 + day, start=T0,
                                 stop=T0 + day),
                           event(EventKind.DESTROY, 2, 40001, T0 + 2, start=T0 + 1,
                                 stop=T0 + 2)], T0 + day))
    inside = list(store.query(FlowQuery(start_ns=T0 + day // 2, end_ns=T0 + day // 2 + S)))
    assert [r.ct_id for r in inside] == [1]
    assert [m.row.ct_id for m in store.who(WhoQuery("198.18.2.1", 40000, T0 + day // 2,
                                                    T0 + day // 2))] == [1]


def test_retention_by_age_and_coverage(store: SqliteStore) -> None:
    life = Lifecycle(session=1, netns=["gw"], started_ns=T0)
    store.apply(life.feed([event(EventKind.DESTROY, i, 40000 + i, T0 + i * S, start=T0,
                                 stop=T0 + i * S) for i in range(1, 6)], T0 + 5 * S))
    store.retention_s = 2.5
    assert store.enforce_retention(T0 + 5 * S) == 2  # ended at T0+1s and T0+2s
    assert sorted(r.ct_id for r in store.query(FlowQuery())) == [3, 4, 5]
    assert store.coverage(T0, T0 + 5 * S)[0].start_ns == T0 + 5 * S - int(2.5 * S)


def test_reader_errors_name_the_store(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no history at"):
        SqliteStore(str(tmp_path / "absent.sqlite"), create=False)
    (tmp_path / "other.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(ConfigError, match="cannot open history"):
        SqliteStore(str(tmp_path / "other.sqlite"), create=True)


def test_empty_batches_cost_nothing(store: SqliteStore) -> None:
    store.apply(HistoryBatch())
    assert list(store.query(FlowQuery())) == []


def test_attribute_columns_match_exactly_or_by_glob(life: Lifecycle, store: SqliteStore) -> None:
    rows = life.feed([event(EventKind.NEW, i, 40000 + i, T0 + i) for i in (1, 2, 3)], T0).upserts
    exes = {1: "/usr/bin/curl", 2: "/usr/sbin/sshd", 3: "/usr/bin/a_x%"}
    store.apply(HistoryBatch(upserts=[r._replace(exe=exes[r.ct_id], pid=10 + r.ct_id)
                                      for r in rows]))

    def ids(**attributes: int | str) -> list[int]:
        return [r.ct_id for r in store.query(FlowQuery(attributes=attributes))]

    assert ids(pid=12) == [2]
    assert ids(exe="/usr/bin/*") == [1, 3]
    assert ids(exe="*_x%") == [3] and ids(exe="*x_%") == []  # LIKE's wildcards are literal
    with pytest.raises(ConfigError, match="unknown attribute 'comm'"):
        list(store.query(FlowQuery(attributes={"comm": "x"})))

"""The on-disk spool (order, fsync'd records, torn tails) and the spooling writer's outage
handling, with a fake store."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import psycopg
import pytest

from conntrail.errors import BatchSpooled, ConfigError
from conntrail.history.pgwriter import SpoolingWriter
from conntrail.history.rows import ClosedBy, CloseOp, Coverage, FlowRow, Gap, HistoryBatch
from conntrail.history.spool import MAGIC, SUFFIX, Spool, decode, encode
from conntrail.history.store import HistoryStore

T0 = 1_700_000_000_000_000_000


def _row(ct_id: int, end_ns: int | None = None, pid: int | None = None) -> FlowRow:
    return FlowRow(T0 + ct_id, end_ns, ClosedBy.OPEN if end_ns is None else ClosedBy.DESTROY,
                   "host", ct_id, 2, 6, "10.0.0.2", "198.51.100.1", 40000, 443, "198.51.100.1",
                   "203.0.113.1", 443, 50000, None, None, None, 1, 0x1BE, 3, None, 0, "ff",
                   1, 60, 1, 60, pid, 0, 0, "/usr/bin/curl", "curl\x00-v", "x.service")


def _batch(number: int) -> HistoryBatch:
    """A distinguishable batch: its number is the flow id and the pid."""
    return HistoryBatch(upserts=[_row(number, pid=number)],
                        closes=[CloseOp("host", number, T0, T0 + 5, ClosedBy.VANISHED)],
                        coverage=[Coverage(7, "host", T0, T0 + number)],
                        gaps=[Gap("host", T0 + number, None if number % 2 else number)])


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def spool(spool_dir: Path) -> Iterator[Spool]:
    opened = Spool(spool_dir)
    try:
        yield opened
    finally:
        opened.close()


def _replayed(spool: Spool) -> list[HistoryBatch]:
    seen: list[HistoryBatch] = []
    spool.replay(seen.append)
    return seen


def test_encode_decode_round_trip() -> None:
    batch = _batch(3)
    batch.upserts.append(_row(4, end_ns=T0 + 99))
    back = decode(encode(batch))
    assert back == batch
    assert type(back.upserts[0]) is FlowRow and type(back.closes[0]) is CloseOp


def test_decode_rejects_another_format() -> None:
    with pytest.raises(ValueError, match="format"):
        decode(b'{"v": 99}')


def test_append_then_replay_in_order_and_segments_go(spool: Spool, spool_dir: Path) -> None:
    for number in range(5):
        spool.append(_batch(number))
    assert spool.pending() == 5
    assert [batch.upserts[0].pid for batch in _replayed(spool)] == [0, 1, 2, 3, 4]
    assert spool.pending() == 0
    assert list(spool_dir.glob(f"*{SUFFIX}")) == []
    assert _replayed(spool) == []


def test_pending_survives_a_restart(spool_dir: Path) -> None:
    first = Spool(spool_dir)
    first.append(_batch(1))
    first.append(_batch(2))
    first.close()
    second = Spool(spool_dir)
    try:
        assert second.pending() == 2
        second.append(_batch(3))  # a new segment of its own, behind the old ones
        assert len(second.segments()) == 2
        assert [batch.upserts[0].pid for batch in _replayed(second)] == [1, 2, 3]
    finally:
        second.close()


def test_small_segments_rotate_and_keep_order(spool_dir: Path) -> None:
    spool = Spool(spool_dir, segment_bytes=1024)
    try:
        for number in range(20):
            spool.append(_batch(number))
        assert len(spool.segments()) > 3
        assert [batch.upserts[0].pid for batch in _replayed(spool)] == list(range(20))
        assert spool.segments() == []
    finally:
        spool.close()


@pytest.mark.parametrize("cut", [1, 5, 9, 40])
def test_torn_last_record_is_ignored_with_a_log_line(
        spool_dir: Path, caplog: pytest.LogCaptureFixture, cut: int) -> None:
    spool = Spool(spool_dir)
    for number in range(3):
        spool.append(_batch(number))
    spool.close()
    (segment,) = spool.segments()
    data = segment.read_bytes()
    segment.write_bytes(data[:-cut])  # a crash in the middle of the last append
    caplog.set_level(logging.WARNING)
    reopened = Spool(spool_dir)
    try:
        assert reopened.pending() == 2
        assert "torn record" in caplog.text
        reopened.append(_batch(3))  # lands in a new segment, not behind the torn bytes
        assert [batch.upserts[0].pid for batch in _replayed(reopened)] == [0, 1, 3]
        assert reopened.segments() == []
    finally:
        reopened.close()


def test_corrupt_record_stops_that_segment(spool_dir: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(spool_dir)
    for number in range(3):
        spool.append(_batch(number))
    spool.close()
    (segment,) = spool.segments()
    data = bytearray(segment.read_bytes())
    first_length = int.from_bytes(data[len(MAGIC):len(MAGIC) + 4], "little")
    data[len(MAGIC) + 8 + first_length + 8 + 3] ^= 0xFF  # a byte of the second payload
    segment.write_bytes(bytes(data))
    reopened = Spool(spool_dir)
    try:
        assert reopened.pending() == 1
        assert "corrupt record" in caplog.text
    finally:
        reopened.close()


def test_a_failed_append_starts_a_new_segment(spool: Spool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    spool.append(_batch(1))

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full)
        with pytest.raises(OSError, match="No space"):
            spool.append(_batch(2))
    spool.append(_batch(3))
    assert len(spool.segments()) == 2 and spool.pending() == 2
    # The record whose fsync failed may well be whole: replaying it too is harmless.
    assert [batch.upserts[0].pid for batch in _replayed(spool)] in ([1, 3], [1, 2, 3])


def test_a_failed_replay_keeps_the_rest_and_resumes(spool: Spool) -> None:
    for number in range(4):
        spool.append(_batch(number))
    applied: list[int | None] = []
    failed: list[bool] = []

    def flaky(batch: HistoryBatch) -> None:
        if batch.upserts[0].pid == 2 and not failed:
            failed.append(True)
            raise OSError("store went away")
        applied.append(batch.upserts[0].pid)

    with pytest.raises(OSError, match="went away"):
        spool.replay(flaky)
    assert applied == [0, 1] and spool.pending() == 2
    assert len(spool.segments()) == 1  # not deleted: half of it is still to apply
    spool.replay(flaky)
    assert applied == [0, 1, 2, 3] and spool.pending() == 0


def test_empty_and_foreign_segments_are_set_aside(spool_dir: Path, spool: Spool) -> None:
    (spool_dir / f"000000000098{SUFFIX}").write_bytes(b"")
    (spool_dir / f"000000000099{SUFFIX}").write_bytes(b"not a spool")
    spool.append(_batch(1))
    assert [batch.upserts[0].pid for batch in _replayed(spool)] == [1]
    assert sorted(path.name for path in spool_dir.iterdir() if path.name != ".lock") == \
        ["000000000099.bad"]


def test_one_process_at_a_time(spool: Spool, spool_dir: Path) -> None:
    with pytest.raises(ConfigError, match="in use by another process"):
        Spool(spool_dir)


# ---------------------------------------------------------------------------------------------
# SpoolingWriter, with a store that can be made unreachable
# ---------------------------------------------------------------------------------------------


class FakeStore:
    """Records applied batches; raises like psycopg while `down`."""

    def __init__(self, world: FakeWorld) -> None:
        self.world = world
        self.url = "fake://"
        self.closed = False

    def apply(self, batch: HistoryBatch) -> None:
        if self.world.down:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        if batch.upserts[0].pid == self.world.poison:
            raise psycopg.DataError("value out of range")
        self.world.applied.append(batch.upserts[0].pid)

    def close(self) -> None:
        self.closed = True


class FakeWorld:
    """The database: up or down, what it holds, a clock for the backoff."""

    def __init__(self) -> None:
        self.down = False
        self.poison: int | None = None  # a batch the store rejects (not an outage)
        self.applied: list[int | None] = []
        self.now = 0.0
        self.connects = 0

    def factory(self) -> HistoryStore:
        self.connects += 1
        if self.down:
            raise psycopg.OperationalError("connection refused")
        return cast(HistoryStore, FakeStore(self))  # the writer uses apply and close only


@pytest.fixture
def world() -> FakeWorld:
    return FakeWorld()


@pytest.fixture
def writer(world: FakeWorld, spool_dir: Path) -> Iterator[SpoolingWriter]:
    made = SpoolingWriter(world.factory, spool_dir, min_backoff_s=1.0, max_backoff_s=8.0,
                          clock=lambda: world.now)
    try:
        yield made
    finally:
        made.close()


def test_writer_spools_during_an_outage_and_replays_in_order(
        world: FakeWorld, writer: SpoolingWriter, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    writer.apply(_batch(1))
    world.down = True
    writer.apply(_batch(2))  # fails mid-write: spooled
    writer.apply(_batch(3))  # within the backoff: straight to the spool
    assert writer.pending() == 2 and writer.store is None
    assert [r.levelname for r in caplog.records if "spooling" in r.message] == ["ERROR"]
    world.down = False
    writer.apply(_batch(4))  # still backing off: spooled behind the others
    world.now = 1.0
    writer.apply(_batch(5))
    assert world.applied == [1, 2, 3, 4, 5]
    assert writer.pending() == 0
    assert any(r.levelname == "INFO" and "replayed 3 spooled batches" in r.message
               for r in caplog.records)


def test_writer_backoff_doubles_up_to_the_max(world: FakeWorld,
                                              writer: SpoolingWriter) -> None:
    world.down = True
    attempts = []
    for second in range(40):
        world.now = float(second)
        before = world.connects
        writer.apply(_batch(second))
        if world.connects > before:
            attempts.append(second)
    assert attempts == [0, 1, 3, 7, 15, 23, 31, 39]
    assert writer.pending() == 40
    world.down = False
    world.now = 100.0
    writer.apply(_batch(40))
    assert world.applied == list(range(41))


def test_writer_down_at_start_spools_from_the_first_batch(world: FakeWorld,
                                                          writer: SpoolingWriter) -> None:
    world.down = True
    writer.apply(_batch(1))
    assert writer.pending() == 1 and world.applied == []
    world.down = False
    world.now = 5.0
    assert writer.flush() is True
    assert world.applied == [1]


def test_writer_other_errors_propagate_and_never_reorder(world: FakeWorld,
                                                        writer: SpoolingWriter) -> None:
    world.poison = 2
    writer.apply(_batch(1))
    with pytest.raises(psycopg.DataError):
        writer.apply(_batch(2))  # the new batch itself: the caller's to handle, not spooled
    assert writer.pending() == 0
    world.down = True
    writer.apply(_batch(2))
    world.down = False
    world.now = 1.0
    with pytest.raises(BatchSpooled, match="value out of range") as caught:
        writer.apply(_batch(3))  # the replay fails: 3 waits behind 2, in order
    assert isinstance(caught.value.__cause__, psycopg.DataError)  # kept: not to be retried
    assert writer.pending() == 2
    world.poison = None
    writer.apply(_batch(4))
    assert world.applied == [1, 2, 3, 4]


def test_writer_close_replays_what_it_can(world: FakeWorld, spool_dir: Path) -> None:
    made = SpoolingWriter(world.factory, spool_dir, clock=lambda: world.now)
    made.apply(_batch(1))
    world.down = True
    made.apply(_batch(2))
    made.close()  # store gone: the batch waits in the spool for the next run
    world.down = False
    again = SpoolingWriter(world.factory, spool_dir, clock=lambda: world.now)
    try:
        assert again.pending() == 1
        again.apply(_batch(3))
        assert world.applied == [1, 2, 3]
    finally:
        again.close()

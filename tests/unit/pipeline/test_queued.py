"""Queued sinks: full-queue policies, retries with backoff, per-sink filters, reopen."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
from tests.unit.formats.sample import ICMP, PLAIN_UDP6, SNAT_TCP

from conntrail.model import Record
from conntrail.pipeline.queued import FullPolicy, QueuedSink, RetryPolicy

FAST_RETRY = RetryPolicy(initial_s=0.01, max_s=0.02)


class GatedSink:
    """Writes only while `open_gate` is set; fails while `failures` remain."""

    def __init__(self, failures: int = 0) -> None:
        self.name = "gated"
        self.open_gate = threading.Event()
        self.open_gate.set()
        self.failures = failures
        self.written: list[bytes] = []
        self.reopened = 0
        self.closed = False

    def open(self) -> None:
        """Nothing to open."""

    def encode(self, batch: Sequence[Record]) -> bytes:
        return b"".join(str(record.flow.ct_id).encode() + b"\n"  # type: ignore[union-attr]
                        for record in batch)

    def write(self, payload: bytes) -> None:
        assert self.open_gate.wait(5)
        if self.failures:
            self.failures -= 1
            raise OSError("no space left on device")
        self.written.append(payload)

    def reopen(self) -> None:
        self.reopened += 1

    def close(self) -> None:
        self.closed = True


class MemorySpill:
    """An in-memory stand-in for the on-disk SpillQueue (same contract)."""

    def __init__(self, max_records: int) -> None:
        self.records: list[bytes] = []
        self.max_records = max_records
        self.lock = threading.Lock()
        self.closed = False

    def put(self, record: bytes) -> bool:
        with self.lock:
            if len(self.records) >= self.max_records:
                return False
            self.records.append(record)
            return True

    def get(self) -> bytes | None:
        with self.lock:
            return self.records[0] if self.records else None

    def commit(self) -> None:
        with self.lock:
            self.records.pop(0)

    def __len__(self) -> int:
        with self.lock:
            return len(self.records)

    def close(self) -> None:
        self.closed = True


def _events(count: int) -> list[list[Record]]:
    return [[SNAT_TCP._replace(flow=SNAT_TCP.flow._replace(ct_id=i))] for i in range(count)]


def _ids(sink: GatedSink) -> list[int]:
    return [int(line) for payload in sink.written for line in payload.split()]


def _wait(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_spill_keeps_order_and_loses_nothing() -> None:
    sink = GatedSink()
    sink.open_gate.clear()
    spill = MemorySpill(max_records=1000)
    queued = QueuedSink(sink, capacity=2, policy=FullPolicy.SPILL, spill=spill)
    queued.start()
    for batch in _events(50):
        queued.offer(batch)
    assert queued.counters.spilled > 40 and len(spill) > 40
    sink.open_gate.set()
    queued.stop(time.monotonic() + 5)
    assert _ids(sink) == list(range(50))
    assert queued.counters.written == 50 and queued.counters.dropped == 0
    assert spill.closed and sink.closed


def test_spill_full_counts_drops() -> None:
    sink = GatedSink()
    sink.open_gate.clear()
    queued = QueuedSink(sink, capacity=1, policy=FullPolicy.SPILL, spill=MemorySpill(5))
    queued.start()
    for batch in _events(20):
        queued.offer(batch)
    sink.open_gate.set()
    queued.stop(time.monotonic() + 5)
    assert queued.counters.written + queued.counters.dropped == 20
    assert queued.counters.dropped >= 13


def test_drop_oldest_keeps_the_newest() -> None:
    sink = GatedSink()
    sink.open_gate.clear()
    queued = QueuedSink(sink, capacity=3, policy=FullPolicy.DROP_OLDEST)
    queued.start()
    queued.offer(_events(1)[0])
    _wait(lambda: queued.depth() == 0)  # the worker holds batch 0, stuck at the gate
    for batch in _events(10)[1:]:
        queued.offer(batch)
    sink.open_gate.set()
    queued.stop(time.monotonic() + 5)
    assert _ids(sink) == [0, 7, 8, 9]
    assert queued.counters.dropped == 6


def test_failed_write_is_retried_with_the_same_payload() -> None:
    sink = GatedSink(failures=3)
    queued = QueuedSink(sink, retry=FAST_RETRY)
    queued.start()
    for batch in _events(3):
        queued.offer(batch)
    queued.stop(time.monotonic() + 5)
    assert _ids(sink) == [0, 1, 2]
    assert queued.counters.retries == 3 and queued.counters.errors == 3
    assert queued.counters.dropped == 0 and not queued.failing.is_set()


def test_without_retry_a_failed_write_is_dropped_and_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    sink = GatedSink(failures=1)
    queued = QueuedSink(sink)
    queued.start()
    for batch in _events(2):
        queued.offer(batch)
    queued.stop(time.monotonic() + 5)
    assert _ids(sink) == [1] and queued.counters.dropped == 1
    assert "failed to write" in caplog.text


def test_failing_block_sink_drops_instead_of_stalling_the_reader() -> None:
    sink = GatedSink(failures=10**9)
    queued = QueuedSink(sink, capacity=2, policy=FullPolicy.BLOCK,
                        retry=RetryPolicy(initial_s=0.05, max_s=0.05))
    queued.start()
    started = time.monotonic()
    for batch in _events(20):
        queued.offer(batch)
        if queued.counters.retries == 0:
            _wait(lambda: queued.counters.retries > 0)
    assert time.monotonic() - started < 3
    queued.stop(time.monotonic() + 0.3)
    assert queued.counters.dropped == 20 and queued.counters.written == 0


def test_retries_give_up_at_the_drain_deadline() -> None:
    sink = GatedSink(failures=10**9)
    queued = QueuedSink(sink, retry=RetryPolicy(initial_s=0.05, max_s=0.05))
    queued.start()
    queued.offer(_events(1)[0])
    started = time.monotonic()
    queued.stop(time.monotonic() + 0.3)
    assert time.monotonic() - started < 2.5
    assert queued.counters.dropped == 1


def test_sink_filter_counts_what_it_leaves_out() -> None:
    sink = GatedSink()
    queued = QueuedSink(sink, keep=lambda event: event.flow.orig.proto == 6)
    queued.start()
    queued.offer([SNAT_TCP, ICMP, PLAIN_UDP6])
    queued.offer([ICMP])
    queued.stop(time.monotonic() + 5)
    assert len(_ids(sink)) == 1 and queued.counters.filtered == 3
    assert queued.counters.written == 1


def test_reopen_runs_on_the_worker_between_writes() -> None:
    sink = GatedSink()
    queued = QueuedSink(sink)
    queued.start()
    queued.request_reopen()
    _wait(lambda: sink.reopened == 1)
    queued.offer(_events(1)[0])
    queued.stop(time.monotonic() + 5)
    assert sink.reopened == 1 and _ids(sink) == [0]


def test_a_spilled_batch_that_fails_without_retry_is_dropped_once() -> None:
    sink = GatedSink(failures=1)
    sink.open_gate.clear()
    spill = MemorySpill(max_records=100)
    queued = QueuedSink(sink, capacity=1, policy=FullPolicy.SPILL, spill=spill)
    queued.start()
    for batch in _events(6):
        queued.offer(batch)
    sink.open_gate.set()
    queued.stop(time.monotonic() + 5)
    assert queued.counters.dropped == 1 and queued.counters.written == 5
    assert len(spill) == 0  # committed: not replayed (and counted) again

"""The runner: filters and enrichers, per-stage counters, queue policies, failing stages."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence

import pytest
from tests.unit.formats.sample import ICMP, PLAIN_UDP6, SNAT_TCP

from conntrail.model import FlowEvent, LossNotice, Record
from conntrail.pipeline.runner import FullPolicy, Pipeline, QueuedSink


class ListSource:
    """A source that yields prepared batches through a pipe fd, then nothing."""

    name = "list"

    def __init__(self, batches: list[list[Record]]) -> None:
        self._batches = batches
        self._read_fd, self._write_fd = os.pipe()
        os.write(self._write_fd, b"x")

    def start(self) -> None:
        """Nothing to start."""

    def fileno(self) -> int:
        return self._read_fd

    def read(self) -> list[Record]:
        if not self._batches:
            return []
        if len(self._batches) == 1:
            os.read(self._read_fd, 1)  # drained: stop being readable
        return self._batches.pop(0)

    def stats(self) -> dict[str, int]:
        return {}

    def stop(self) -> None:
        os.close(self._read_fd)
        os.close(self._write_fd)


class CollectSink:
    """Keeps what it is given; can be told to block or fail."""

    def __init__(self, name: str = "collect", fail: bool = False,
                 gate: threading.Event | None = None) -> None:
        self.name = name
        self.fail = fail
        self.gate = gate
        self.records: list[Record] = []
        self.closed = False

    def open(self) -> None:
        """Nothing to open."""

    def encode(self, batch: Sequence[Record]) -> list[Record]:
        return list(batch)

    def write(self, payload: list[Record]) -> None:
        if self.gate is not None:
            self.gate.wait(5)
        if self.fail:
            raise OSError("disk full")
        self.records.extend(payload)

    def close(self) -> None:
        self.closed = True


def _run(pipeline: Pipeline, events: int) -> None:
    stop = threading.Event()
    pipeline.run(stop, max_events=events)
    pipeline.shutdown(drain_seconds=5)


def test_filters_count_and_notices_pass() -> None:
    notice = LossNotice("", "enobufs", 3, 0)
    sink = CollectSink()
    pipeline = Pipeline([ListSource([[SNAT_TCP, notice, PLAIN_UDP6, ICMP]])], [QueuedSink(sink)],
                        filters=[lambda event: event.flow.orig.proto != 1])
    _run(pipeline, 3)
    assert sink.records == [SNAT_TCP, notice, PLAIN_UDP6]
    assert (pipeline.counters.events, pipeline.counters.filtered) == (3, 1)
    assert pipeline.counters.notices == 1 and sink.closed


def test_enrichers_make_new_values_in_order() -> None:
    sink = CollectSink()
    enrichers = [lambda e: e._replace(netns=e.netns + "a"),
                 lambda e: e._replace(netns=e.netns + "b")]
    _run(Pipeline([ListSource([[PLAIN_UDP6]])], [QueuedSink(sink)], enrichers=enrichers), 1)
    (event,) = sink.records
    assert isinstance(event, FlowEvent) and event.netns == "ab"
    assert PLAIN_UDP6.netns == ""


def test_failing_stage_is_counted_and_event_kept(caplog: pytest.LogCaptureFixture) -> None:
    sink = CollectSink()

    def broken(event: FlowEvent) -> bool:
        raise KeyError("boom")

    pipeline = Pipeline([ListSource([[ICMP]])], [QueuedSink(sink)], filters=[broken])
    _run(pipeline, 1)
    assert pipeline.counters.stage_errors == 1 and sink.records == [ICMP]
    assert "filter failed" in caplog.text


def test_failing_sink_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    good, bad = CollectSink("good"), CollectSink("bad", fail=True)
    queued_bad = QueuedSink(bad)
    _run(Pipeline([ListSource([[ICMP], [PLAIN_UDP6]])], [QueuedSink(good), queued_bad]), 2)
    assert good.records == [ICMP, PLAIN_UDP6]
    assert queued_bad.counters.errors == 2 and queued_bad.counters.dropped == 2
    assert "sink bad failed" in caplog.text


def test_drop_policy_counts_every_dropped_event() -> None:
    gate = threading.Event()
    sink = CollectSink(gate=gate)
    queued = QueuedSink(sink, capacity=1, policy=FullPolicy.DROP)
    queued.start()
    for _ in range(5):
        queued.offer([ICMP, ICMP])
    time.sleep(0.1)
    gate.set()
    queued.stop(time.monotonic() + 5)
    assert queued.counters.written + queued.counters.dropped == 10
    assert queued.counters.dropped >= 6  # one batch in the writer, one queued, rest dropped


def test_failing_encode_is_counted_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    class BadEncoder(CollectSink):
        def encode(self, batch: Sequence[Record]) -> list[Record]:
            raise ValueError("cannot format")

    bad = QueuedSink(BadEncoder("bad"))
    good = CollectSink("good")
    _run(Pipeline([ListSource([[ICMP]])], [bad, QueuedSink(good)]), 1)
    assert bad.counters.errors == 1 and bad.counters.dropped == 1 and good.records == [ICMP]
    assert "sink bad failed to encode" in caplog.text


def test_stop_before_start_is_harmless() -> None:
    sink = CollectSink()
    QueuedSink(sink).stop(time.monotonic() + 1)
    assert sink.closed


def test_stuck_sink_cannot_hold_shutdown(caplog: pytest.LogCaptureFixture) -> None:
    gate = threading.Event()  # never set while the test waits: the sink is stuck
    queued = QueuedSink(CollectSink(gate=gate), capacity=1)
    queued.start()
    for _ in range(3):  # one in the writer, one queued; the third would block
        if _ == 2:
            threading.Timer(0.3, queued.stopping.set).start()
        queued.offer([ICMP, ICMP])
    started = time.monotonic()
    queued.stop(time.monotonic() + 0.5)
    assert time.monotonic() - started < 2
    assert queued.counters.dropped == 4  # the batch that gave up and the abandoned one
    assert "not drained before the deadline" in caplog.text
    gate.set()


def test_count_limit_is_exact() -> None:
    sink = CollectSink()
    pipeline = Pipeline([ListSource([[ICMP, PLAIN_UDP6, SNAT_TCP], [ICMP, ICMP]])],
                        [QueuedSink(sink)])
    _run(pipeline, 2)
    assert sink.records == [ICMP, PLAIN_UDP6]

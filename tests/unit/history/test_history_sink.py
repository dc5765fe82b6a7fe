"""The history sink: failed writes are retried in order, unless a writer keeps them itself."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from conntrail.history.rows import Gap, HistoryBatch
from conntrail.history.sqlite import SqliteStore
from conntrail.sinks.history import HistorySink


class FlakyWriter:
    """Fails its first `failures` applies, records the rest."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.applied: list[HistoryBatch] = []

    def apply(self, batch: HistoryBatch) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError("disk full")
        self.applied.append(batch)

    def close(self) -> None:
        pass


def gaps(*ats: int) -> HistoryBatch:
    return HistoryBatch(gaps=[Gap("gw", at, 1) for at in ats])


def applied_gaps(batches: Sequence[HistoryBatch]) -> list[int]:
    return [gap.at_ns for batch in batches for gap in batch.gaps]


def test_a_failed_write_is_written_first_next_time(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "h.sqlite"), create=True)
    sink = HistorySink(None, ["gw"], store=store)
    sink.open()
    flaky = FlakyWriter(failures=1)
    sink._writer = flaky  # the store's own writes, failing once
    with pytest.raises(OSError, match="disk full"):
        sink.write(gaps(1))
    sink.write(gaps(2))
    assert applied_gaps(flaky.applied) == [1, 2]  # in order, nothing lost


def test_a_writer_of_its_own_keeps_its_failures_itself(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "h.sqlite"), create=True)
    flaky = FlakyWriter(failures=0)
    sink = HistorySink(None, ["gw"], store=store, writer=flaky)
    sink.open()
    flaky.failures = 1
    with pytest.raises(OSError, match="disk full"):
        sink.write(gaps(1))  # a spooling writer has kept this one itself
    sink.write(gaps(2))
    assert applied_gaps(flaky.applied) == [2]  # not applied a second time by the sink

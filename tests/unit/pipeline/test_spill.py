"""The spill queue: FIFO over segments, two threads, the size bound, restarts, damage, lock."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conntrail import spoolfile
from conntrail.errors import ConntrailError
from conntrail.pipeline.spill import SpillQueue
from conntrail.spoolfile import MAGIC, SUFFIX, framed_size


def _record(number: int, size: int = 100) -> bytes:
    """A distinguishable record of `size` bytes (at least 8)."""
    return number.to_bytes(8, "big") + bytes([number % 251]) * (size - 8)


def _number(record: bytes) -> int:
    return int.from_bytes(record[:8], "big")


def _drain(queue: SpillQueue, limit: int = 100_000) -> list[int]:
    """get() and commit() until empty (bounded)."""
    seen: list[int] = []
    for _ in range(limit):
        record = queue.get()
        if record is None:
            return seen
        seen.append(_number(record))
        queue.commit()
    raise AssertionError(f"queue not empty after {limit} records")


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{SUFFIX}"))


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "spill"


@pytest.fixture
def opened(directory: Path) -> Iterator[Callable[..., SpillQueue]]:
    """Opens queues on `directory` and closes every one of them, even on failure."""
    made: list[SpillQueue] = []

    def open_queue(max_bytes: int = 1 << 20, segment_bytes: int = 8 << 20) -> SpillQueue:
        made.append(SpillQueue(directory, max_bytes, segment_bytes))
        return made[-1]

    try:
        yield open_queue
    finally:
        for queue in made:
            queue.close()


def test_fifo_across_segment_boundaries(opened: Callable[..., SpillQueue],
                                        directory: Path) -> None:
    queue = opened(max_bytes=1 << 20, segment_bytes=1000)
    sizes = [8 + (number * 37) % 400 for number in range(200)]
    for number, size in enumerate(sizes):
        assert queue.put(_record(number, size))
    assert len(_segments(directory)) > 10
    assert len(queue) == queue.pending_records == 200
    assert queue.pending_bytes == sum(framed_size(_record(0, size)) for size in sizes)
    assert _drain(queue) == list(range(200))
    assert len(queue) == 0 and queue.pending_bytes == 0


def test_get_repeats_until_commit_and_reads_the_segment_being_written(
        opened: Callable[..., SpillQueue]) -> None:
    queue = opened()
    assert queue.get() is None
    assert queue.put(_record(1))
    assert queue.get() == queue.get() == _record(1)  # not sealed: read behind the writer
    assert queue.put(_record(2))
    queue.commit()
    assert queue.get() == _record(2)
    queue.commit()
    assert queue.get() is None
    with pytest.raises(ValueError, match="without a record"):
        queue.commit()


def test_put_does_not_fsync_each_record(opened: Callable[..., SpillQueue],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    queue = opened()
    real_fsync = os.fsync
    calls: list[int] = []

    def counting(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting)
    for number in range(100):
        assert queue.put(_record(number))
    assert len(calls) == 2  # the new segment and its directory entry, once
    queue.close()
    assert len(calls) == 3  # sealed at close


@pytest.mark.parametrize("max_bytes", [64 << 20, 64 << 10])
def test_one_putter_and_one_getter_thread(opened: Callable[..., SpillQueue],
                                          directory: Path, max_bytes: int) -> None:
    """20k records; with the small bound the getter starts late, so the putter is refused
    (and retries) and segments are recycled under way."""
    queue = opened(max_bytes=max_bytes, segment_bytes=16 << 10)
    total, deadline = 20_000, time.monotonic() + 60
    refused = threading.Event()
    failures: list[BaseException] = []

    def putter() -> None:
        try:
            for number in range(total):
                while not queue.put(_record(number, 8 + number % 200)):
                    refused.set()
                    assert time.monotonic() < deadline, "putter timed out"
                    time.sleep(0.0005)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the main thread's assert
            failures.append(exc)

    thread = threading.Thread(target=putter, daemon=True)
    thread.start()
    seen: list[int] = []
    try:
        if max_bytes < 1 << 20:
            assert refused.wait(10), "the putter was never refused"
        while len(seen) < total and time.monotonic() < deadline and not failures:
            record = queue.get()
            if record is None:
                time.sleep(0.0002)
                continue
            seen.append(_number(record))
            queue.commit()
    finally:
        thread.join(max(0.0, deadline - time.monotonic()) + 1)
    assert not failures and not thread.is_alive()
    assert seen == list(range(total))
    assert queue.disk_bytes <= max_bytes
    assert refused.is_set() == (max_bytes < 1 << 20)
    assert len(_segments(directory)) <= 1  # consumed segments went; the live one stays
    queue.close()
    assert _segments(directory) == []


def test_max_bytes_refuses_and_space_comes_back(opened: Callable[..., SpillQueue],
                                                directory: Path) -> None:
    queue = opened(max_bytes=4096)
    assert queue.segment_bytes == 1024  # capped: segments go whole, so keep them small
    accepted = 0
    while queue.put(_record(accepted)):
        accepted += 1
        assert accepted < 100, "never refused"
    assert accepted > 25  # most of the budget holds records
    assert queue.disk_bytes <= 4096
    assert queue.disk_bytes == sum(path.stat().st_size for path in _segments(directory))
    assert not queue.put(_record(999, 5000))  # can never fit
    for _ in range(12):  # the first segment's records: it goes, and its space with it
        assert queue.get() is not None
        queue.commit()
    assert queue.put(_record(accepted))
    assert _drain(queue) == list(range(12, accepted + 1))


def test_a_consumed_live_segment_is_recycled_for_big_records(
        opened: Callable[..., SpillQueue], directory: Path) -> None:
    """A record too big to share the budget with the (consumed) segment before it."""
    queue = opened(max_bytes=1000)
    for number in range(10):
        assert queue.put(_record(number, 600)), f"refused record {number}"
        assert _drain(queue) == [number]
    assert len(_segments(directory)) == 1  # each consumed one went as the next came


def test_a_pending_record_is_not_recycled(opened: Callable[..., SpillQueue]) -> None:
    queue = opened(max_bytes=1000)
    assert queue.put(_record(1, 600))
    assert not queue.put(_record(2, 600))  # the first is still pending: no room
    assert queue.get() == _record(1, 600)
    assert not queue.put(_record(2, 600))  # read but not committed: still no room
    queue.commit()
    assert queue.put(_record(2, 600))
    assert _drain(queue) == [2]


def test_restart_replays_what_was_left_then_new_records(
        opened: Callable[..., SpillQueue], directory: Path) -> None:
    first = opened(segment_bytes=1000)
    for number in range(50):
        assert first.put(_record(number))
    for _ in range(10):  # the first segment (9 records) and one record of the second
        assert first.get() is not None
        first.commit()
    assert first.get() == _record(10)  # written by the sink, but never committed
    first.close()
    second = opened(segment_bytes=1000)
    assert len(second) == 40  # the position in the second segment was kept at close
    assert second.pending_bytes == 40 * framed_size(_record(0))
    assert second.put(_record(50))
    assert _drain(second) == list(range(10, 51))  # at least once: 10 again


def test_a_crash_replays_the_head_segment_from_its_start(
        opened: Callable[..., SpillQueue], directory: Path, tmp_path: Path) -> None:
    first = opened(segment_bytes=1000)
    for number in range(20):
        assert first.put(_record(number))
    for _ in range(12):
        assert first.get() is not None
        first.commit()
    crashed = tmp_path / "crashed"  # the files as a crash would leave them: no close()
    shutil.copytree(directory, crashed)
    second = SpillQueue(crashed, 1 << 20, 1000)
    try:
        assert _drain(second) == list(range(9, 20))  # committed 9…11 come again
    finally:
        second.close()


def test_a_stale_or_foreign_cursor_skips_nothing_it_should_not(
        opened: Callable[..., SpillQueue], directory: Path) -> None:
    first = opened()
    for number in range(3):
        assert first.put(_record(number))
    first.close()
    (segment,) = _segments(directory)
    for cursor in (f"{segment.name} 13\n", f"{segment.name} 99999\n", "other.seg 8\n",
                   "garbage"):
        (directory / ".cursor").write_text(cursor)
        again = opened()
        assert len(again) == 3, cursor
        again.close()


def test_old_segments_sort_before_new_ones_even_if_the_clock_went_back(
        opened: Callable[..., SpillQueue], directory: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    first = opened()
    assert first.put(_record(1))
    first.close()
    monkeypatch.setattr("conntrail.pipeline.spill.time_ns", lambda: 1)
    second = opened()
    assert second.put(_record(2))
    old, new = _segments(directory)
    assert int(new.stem) == int(old.stem) + 1
    assert _drain(second) == [1, 2]


@pytest.mark.parametrize("cut", [1, 5, 8, 50])
def test_a_torn_tail_is_ignored_with_a_warning(
        opened: Callable[..., SpillQueue], directory: Path,
        caplog: pytest.LogCaptureFixture, cut: int) -> None:
    first = opened()
    for number in range(5):
        assert first.put(_record(number))
    first.close()
    (segment,) = _segments(directory)
    size = segment.stat().st_size
    os.truncate(segment, size - cut)  # a crash in the middle of the last write
    caplog.set_level(logging.WARNING)
    second = opened()
    torn_at = size - framed_size(_record(4))
    assert f"spool {segment}: ignoring a torn record" in caplog.text
    assert f"at offset {torn_at}" in caplog.text
    assert len(second) == 4
    assert second.put(_record(5))  # into a new segment, not behind the torn bytes
    assert _drain(second) == [0, 1, 2, 3, 5]


def test_a_segment_with_only_a_torn_record_is_dropped(
        opened: Callable[..., SpillQueue], directory: Path) -> None:
    first = opened()
    assert first.put(_record(1))
    first.close()
    (segment,) = _segments(directory)
    os.truncate(segment, len(MAGIC) + 3)
    second = opened()
    assert len(second) == 0 and _segments(directory) == []


def test_bad_magic_is_set_aside_never_deleted(
        opened: Callable[..., SpillQueue], directory: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    first = opened()
    assert first.put(_record(1))
    first.close()
    directory.joinpath(f"{1:020d}{SUFFIX}").write_bytes(b"GARBAGE!" + b"x" * 30)
    directory.joinpath(f"{2:020d}{SUFFIX}").write_bytes(b"")  # a crash as it was created
    caplog.set_level(logging.ERROR)
    second = opened()
    assert f"{1:020d}.bad" in caplog.text and "bad header" in caplog.text
    assert directory.joinpath(f"{1:020d}.bad").read_bytes() == b"GARBAGE!" + b"x" * 30
    assert not directory.joinpath(f"{2:020d}{SUFFIX}").exists()
    assert _drain(second) == [1]


def test_consumed_segments_are_deleted_as_they_go(opened: Callable[..., SpillQueue],
                                                  directory: Path) -> None:
    queue = opened(segment_bytes=4 * framed_size(_record(0)) + len(MAGIC))
    for number in range(12):
        assert queue.put(_record(number))
    assert len(_segments(directory)) == 3
    first = _segments(directory)[0]
    for _ in range(3):
        assert queue.get() is not None
        queue.commit()
    assert first.exists()  # one record of it is still pending
    assert queue.get() is not None
    queue.commit()
    assert not first.exists() and len(_segments(directory)) == 2
    assert _drain(queue) == list(range(4, 12))
    assert len(_segments(directory)) == 1  # the live one: appended to until sealed
    assert queue.disk_bytes == _segments(directory)[0].stat().st_size
    queue.close()
    assert _segments(directory) == []
    assert sorted(path.name for path in directory.iterdir()) == [".lock"]


def test_a_damaged_segment_is_skipped_and_its_loss_counted(
        opened: Callable[..., SpillQueue], directory: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    queue = opened(segment_bytes=3 * framed_size(_record(0)) + len(MAGIC))
    for number in range(9):
        assert queue.put(_record(number))
    first = _segments(directory)[0]
    with first.open("r+b") as handle:  # damage after the start: not caught by the scan
        handle.seek(len(MAGIC) + framed_size(_record(0)) + 20)
        handle.write(b"\xff\xff")
    caplog.set_level(logging.ERROR)
    assert _drain(queue) == [0, 3, 4, 5, 6, 7, 8]
    assert queue.lost_records == 2 and len(queue) == 0 and queue.pending_bytes == 0
    assert "2 spilled batches lost" in caplog.text and str(first) in caplog.text


def test_a_failing_disk_drops_logs_once_and_recovers(
        opened: Callable[..., SpillQueue], directory: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    queue = opened()
    assert queue.put(_record(1))
    real_write_all = spoolfile.write_all

    def half_then_full(fd: int, data: bytes) -> None:
        real_write_all(fd, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    caplog.set_level(logging.ERROR)
    with monkeypatch.context() as patch:
        patch.setattr("conntrail.pipeline.spill.write_all", half_then_full)
        assert not queue.put(_record(2))
        assert not queue.put(_record(3))
    assert caplog.text.count("cannot write") == 1
    assert queue.put(_record(4))
    # 1 and a torn half; a torn half alone; 4: each failure sealed its segment
    assert len(_segments(directory)) == 3
    assert queue.disk_bytes == sum(path.stat().st_size for path in _segments(directory))
    assert _drain(queue) == [1, 4]


def test_a_second_opener_is_refused_naming_the_directory(
        opened: Callable[..., SpillQueue], directory: Path) -> None:
    queue = opened()
    with pytest.raises(ConntrailError, match=f"spill directory {directory} is in use"):
        SpillQueue(directory, 1 << 20)
    queue.close()
    opened().close()


def test_an_unusable_directory_is_an_error_naming_it(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    with pytest.raises(ConntrailError, match=f"spill directory {not_a_dir}: cannot use it"):
        SpillQueue(not_a_dir, 1 << 20)


def test_close_is_idempotent_and_put_after_close_is_refused(
        opened: Callable[..., SpillQueue]) -> None:
    queue = opened()
    assert queue.put(_record(1))
    queue.close()
    queue.close()
    with pytest.raises(ValueError, match="closed"):
        queue.put(_record(2))

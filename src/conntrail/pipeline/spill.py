"""The on-disk queue of the `spill` full-queue policy: encoded batches wait there, in order.

When a sink's in-memory queue is full the pipeline thread put()s encoded batches here and the
sink's worker thread get()s and commit()s them, oldest first. Records use the shared spool
framing (`conntrail.spoolfile`) in segment files named by a monotonic time stamp, so an
earlier run's segments sort, and replay, before this run's.

Durability is bounded on purpose: put() hands each record to the OS with one write() (a
crash of the daemon loses nothing) but fsyncs only when a segment is sealed and at close (a
crash of the host may lose the unsealed tail). Delivery is at least once: a record written
by the sink but not committed is replayed by the next run, and after a crash (no close(),
which saves the read position) so is every committed record of the head segment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from time import time_ns
from typing import BinaryIO

from conntrail.errors import ConntrailError
from conntrail.spoolfile import (
    MAGIC,
    SUFFIX,
    RecordError,
    create_segment,
    frame,
    framed_size,
    fsync_dir,
    has_magic,
    lock_directory,
    read_record,
    read_segment,
    set_aside,
    write_all,
)

log = logging.getLogger(__name__)

_CURSOR = ".cursor"  # "<segment name> <offset>": where close() left the reader
_MAX_SKIPS = 64  # corrupt segments get() skips in one call before it reports "nothing yet"


@dataclass(slots=True, eq=False)
class _Segment:
    """One segment file and what is known of it (fields change under the queue's lock)."""

    path: Path
    size: int  # bytes in the file: what it takes on disk
    end: int  # offset just after its last complete record
    records: int  # complete records in it
    consumed: int = 0  # records committed (or lost to corruption)
    sealed: bool = True  # nothing more is appended: it goes once consumed


def _stamp(path: Path) -> int:
    return int(path.stem) if path.stem.isdigit() else 0


def _scan(path: Path, cursor: int) -> tuple[int, int, int]:
    """A segment's intact records, the offset after the last, and how many of them come
    before offset `cursor` (0 unless it falls on a record boundary)."""
    records, end, before = 0, len(MAGIC), 0
    for payload in read_segment(path):  # warns of a torn tail, naming the offset
        records += 1
        end += framed_size(payload)
        if end == cursor:
            before = records
    return records, end, before


class SpillQueue:
    """A FIFO of byte records on disk for one putter and one getter thread.

    `max_bytes` bounds the segment files' total size; `segment_bytes` is capped at a quarter
    of it, since a segment is deleted only once all of it is committed.
    """

    def __init__(self, directory: Path, max_bytes: int,
                 segment_bytes: int = 8 << 20) -> None:
        if max_bytes < 1 or segment_bytes < 1:
            raise ValueError("max_bytes and segment_bytes must be positive")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = min(segment_bytes, max(max_bytes // 4, 1))
        self.lost_records = 0  # records lost to corruption found while reading
        self._lock = threading.Lock()
        self._segments: deque[_Segment] = deque()  # oldest first; the last may be live
        self._disk_bytes = 0
        self._pending_records = 0
        self._pending_bytes = 0
        # The putter's: the segment it appends to, and its fd.
        self._live: _Segment | None = None
        self._fd = -1
        self._last_stamp = 0
        self._failing = False
        # The getter's: where the next record of the head segment starts, a handle on it,
        # and the record get() returned that is not committed yet.
        self._offset = len(MAGIC)
        self._reader: BinaryIO | None = None
        self._reader_path: Path | None = None
        self._current: bytes | None = None
        self._closed = False
        self._lock_file = self._lock_directory()
        try:
            self._recover()
        except OSError as exc:
            self._lock_file.close()
            raise ConntrailError(f"spill directory {self.directory}: cannot read the "
                                 f"records left there: {exc}") from exc

    def _lock_directory(self) -> BinaryIO:
        try:
            return lock_directory(self.directory)
        except BlockingIOError as exc:
            raise ConntrailError(f"spill directory {self.directory} is in use by another "
                                 "process") from exc
        except OSError as exc:
            raise ConntrailError(f"spill directory {self.directory}: cannot use it: "
                                 f"{exc}") from exc

    def _recover(self) -> None:
        """Queue the records an earlier run left, oldest segment first, from where its
        close() left the reader."""
        cursor_name, cursor = self._take_cursor()
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            self._last_stamp = max(self._last_stamp, _stamp(path))
            if not has_magic(path):
                set_aside(path)
                continue
            head = not self._segments and path.name == cursor_name
            records, end, consumed = _scan(path, cursor if head else -1)
            if consumed == records:
                path.unlink()
                fsync_dir(self.directory)
                continue
            size = path.stat().st_size
            self._segments.append(_Segment(path, size, end, records, consumed))
            if consumed:
                self._offset = cursor
            self._disk_bytes += size
            self._pending_records += records - consumed
            self._pending_bytes += end - (cursor if consumed else len(MAGIC))
        if self._pending_records:
            log.info("spill %s: %d records (%d bytes) left by an earlier run, replayed first",
                     self.directory, self._pending_records, self._pending_bytes)

    def _take_cursor(self) -> tuple[str, int]:
        """The head segment's name and read offset saved by the last close(), if any; the
        file goes, since a later crash must replay from where that run really was."""
        path = self.directory / _CURSOR
        try:
            text = path.read_bytes().decode("ascii", "replace")
        except FileNotFoundError:
            return "", -1
        path.unlink()
        name, _, offset = text.strip().partition(" ")
        return (name, int(offset)) if offset.isdigit() else ("", -1)

    def _save_cursor(self) -> None:
        """Keep the read position in the head segment (durably), so a clean restart does
        not replay the records committed in it."""
        with self._lock:
            head = self._segments[0] if self._segments else None
            offset = self._offset
        if head is None or offset <= len(MAGIC):
            return
        temporary = self.directory / f"{_CURSOR}.new"
        try:
            with temporary.open("wb") as handle:
                handle.write(f"{head.path.name} {offset}\n".encode())
                handle.flush()
                os.fsync(handle.fileno())
            temporary.rename(self.directory / _CURSOR)
            fsync_dir(self.directory)
        except OSError as exc:  # only costs replays: the next run starts the segment over
            log.warning("spill %s: cannot save the read position: %s", self.directory, exc)

    # -- the putter's side ---------------------------------------------------------------

    def put(self, record: bytes) -> bool:
        """Append a record behind all others (no fsync). False, with nothing queued, when it
        would take the files past max_bytes or the disk refuses it (logged)."""
        if self._closed:
            raise ValueError(f"spill queue {self.directory} is closed")
        data = frame(record)
        rotate = self._must_rotate(len(data))
        if not self._fits(len(data), rotate):
            if not self._recycle_live():
                return False
            rotate = True
            if not self._fits(len(data), rotate):
                return False
        try:
            if rotate:
                self._rotate()
            write_all(self._fd, data)
        except OSError as exc:
            self._put_failed(exc)
            return False
        self._appended(len(data))
        return True

    def _must_rotate(self, size: int) -> bool:
        live = self._live  # only this thread changes its size and records
        return live is None or (live.records > 0 and live.size + size > self.segment_bytes)

    def _fits(self, size: int, rotate: bool) -> bool:
        # Unlocked read: only this thread makes the files grow, so the value can only be
        # too high (a deletion racing with us), which errs on the safe side.
        need = size + (len(MAGIC) if rotate else 0)
        return self._disk_bytes + need <= self.max_bytes

    def _appended(self, size: int) -> None:
        live = self._live
        assert live is not None
        with self._lock:
            live.size += size
            live.end += size
            live.records += 1
            self._disk_bytes += size
            self._pending_records += 1
            self._pending_bytes += size
        self._failing = False

    def _rotate(self) -> None:
        """Seal the live segment (fsync) and start a new one."""
        self._seal_live()
        self._last_stamp = max(time_ns(), self._last_stamp + 1)
        path = self.directory / f"{self._last_stamp:020d}{SUFFIX}"
        try:
            fd = create_segment(path)
        except OSError:
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        segment = _Segment(path, len(MAGIC), len(MAGIC), 0, sealed=False)
        with self._lock:
            self._segments.append(segment)
            self._disk_bytes += segment.size
        self._live, self._fd = segment, fd

    def _seal_live(self) -> None:
        """No more appends to the live segment: fsync it so the getter may delete it once
        consumed, and a host crash cannot lose it."""
        live, fd = self._live, self._fd
        if live is None:
            return
        self._live, self._fd = None, -1
        try:
            os.fsync(fd)
        except OSError as exc:
            log.error("spill %s: cannot fsync %s: %s", self.directory, live.path.name, exc)
        finally:
            os.close(fd)
        with self._lock:
            live.sealed = True

    def _recycle_live(self) -> bool:
        """Drop the live segment when the getter has committed all of it: otherwise a queue
        that caught up would keep its space until the segment fills."""
        with self._lock:
            live = self._live
            if live is None or self._segments[0] is not live or self._current is not None \
                    or live.consumed < live.records:
                return False
            self._segments.popleft()
            self._disk_bytes -= live.size
            self._offset = len(MAGIC)
        self._live, fd, self._fd = None, self._fd, -1
        os.close(fd)
        self._unlink([live])
        return True

    def _put_failed(self, exc: OSError) -> None:
        """Seal the segment: any torn bytes stay past its known end, never read, and the next
        put starts a new segment rather than land behind them."""
        if not self._failing:
            log.error("spill %s: cannot write (%s); batches are dropped until it can",
                      self.directory, exc)
        self._failing = True
        live = self._live
        if live is None:
            return
        with contextlib.suppress(OSError):
            size = os.fstat(self._fd).st_size
            with self._lock:
                self._disk_bytes += size - live.size
                live.size = size
        self._seal_live()

    # -- the getter's side ---------------------------------------------------------------

    def get(self) -> bytes | None:
        """The oldest record not committed yet (the same one until commit()), or None."""
        for _ in range(_MAX_SKIPS):
            with self._lock:
                if self._current is not None:
                    return self._current
                gone = self._pop_finished()
                head = self._segments[0] if self._segments else None
                offset, end = self._offset, head.end if head else 0
            self._unlink(gone)
            if head is None or offset >= end:
                return None
            record = self._read(head, offset)
            if record is not None:
                return record
        return None

    def _read(self, head: _Segment, offset: int) -> bytes | None:
        """The record at `offset` (complete: put() returned), None after skipping the rest
        of a damaged segment."""
        try:
            record = read_record(self._reader_at(head.path, offset))
            if record is None:
                raise RecordError(offset, 0)
        except (RecordError, OSError) as exc:
            self._skip_rest(head, offset, exc)
            return None
        with self._lock:
            self._current = record
        return record

    def _reader_at(self, path: Path, offset: int) -> BinaryIO:
        if self._reader is None or self._reader_path != path:
            self._close_reader()
            self._reader, self._reader_path = path.open("rb"), path
        if self._reader.tell() != offset:
            self._reader.seek(offset)
        return self._reader

    def _skip_rest(self, head: _Segment, offset: int, exc: Exception) -> None:
        # `end` is a record boundary, so records a live segment gets later stay readable.
        with self._lock:
            lost = head.records - head.consumed
            head.consumed = head.records
            self._offset = head.end
            self._pending_records -= lost
            self._pending_bytes -= head.end - offset
            self.lost_records += lost
        log.error("spill %s: unreadable record at offset %d (%s); %d spilled batches lost",
                  head.path, offset, exc, lost)

    def commit(self) -> None:
        """The record from the last get() was written: forget it (a consumed segment goes)."""
        with self._lock:
            record, self._current = self._current, None
            if record is None:
                raise ValueError("commit() without a record from get()")
            size = framed_size(record)
            self._segments[0].consumed += 1
            self._offset += size
            self._pending_records -= 1
            self._pending_bytes -= size
            gone = self._pop_finished()
        self._unlink(gone)

    def _pop_finished(self) -> list[_Segment]:
        """Take sealed, fully consumed segments off the head (called holding the lock)."""
        gone: list[_Segment] = []
        while self._segments and self._segments[0].sealed \
                and self._offset >= self._segments[0].end:
            segment = self._segments.popleft()
            self._disk_bytes -= segment.size
            self._offset = len(MAGIC)
            gone.append(segment)
        return gone

    def _unlink(self, gone: list[_Segment]) -> None:
        if not gone:
            return
        try:
            for segment in gone:
                if segment.path == self._reader_path:
                    self._close_reader()
                with contextlib.suppress(FileNotFoundError):
                    segment.path.unlink()
            fsync_dir(self.directory)  # else a host crash could bring them back: replays
        except OSError as exc:
            log.error("spill %s: cannot delete a consumed segment (%s); a restart would "
                      "replay it", self.directory, exc)

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = self._reader_path = None

    # -- either side -----------------------------------------------------------------------

    def __len__(self) -> int:
        return self.pending_records

    @property
    def pending_records(self) -> int:
        """Records put and not committed."""
        with self._lock:
            return self._pending_records

    @property
    def pending_bytes(self) -> int:
        """Their size as stored (payloads and record headers)."""
        with self._lock:
            return self._pending_bytes

    @property
    def disk_bytes(self) -> int:
        """What the segment files take: pending records, plus committed ones whose segment
        is not consumed yet (put() keeps it within max_bytes)."""
        with self._lock:
            return self._disk_bytes

    def close(self) -> None:
        """Seal (fsync) what was written, delete what was consumed, release the directory
        (idempotent). Call it once both threads are done with the queue."""
        if self._closed:
            return
        self._closed = True
        try:
            self._seal_live()
            with self._lock:
                gone = self._pop_finished()
            self._unlink(gone)
            self._save_cursor()
        finally:
            self._close_reader()
            self._lock_file.close()

"""An ordered on-disk spool of HistoryBatch: what a writer keeps while its store is away.

A directory of append-only segment files, framed by `conntrail.spoolfile`. Each record is a
length, a CRC32 and the batch as JSON (orjson), written with one write() and fsynced before
append() returns. A crash can only tear the last record of the last segment: reading stops
there, says so, and ignores it (its batch was never acknowledged). Each process appends to a
segment of its own, so a new record never lands behind a torn one. Replay applies batches
oldest first and deletes a segment once all of its batches applied; a crash in between
re-applies some, which the stores' idempotent upserts make harmless.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from conntrail.errors import ConfigError
from conntrail.history.rows import CloseOp, Coverage, FlowRow, Gap, HistoryBatch
from conntrail.spoolfile import (
    MAGIC,
    SUFFIX,
    create_segment,
    frame,
    fsync_dir,
    has_magic,
    lock_directory,
    read_segment,
    set_aside,
)

__all__ = ["MAGIC", "SUFFIX", "Spool", "decode", "encode", "read_segment"]

log = logging.getLogger(__name__)

_FORMAT = 1


def encode(batch: HistoryBatch) -> bytes:
    """A batch as JSON bytes: its four lists of tuples."""
    return orjson.dumps({"v": _FORMAT,
                         "upserts": [tuple(row) for row in batch.upserts],
                         "closes": [tuple(op) for op in batch.closes],
                         "coverage": [tuple(cov) for cov in batch.coverage],
                         "gaps": [tuple(gap) for gap in batch.gaps]})


def decode(payload: bytes) -> HistoryBatch:
    """The inverse of `encode`; ValueError/TypeError for a record that is not a batch."""
    data: dict[str, Any] = orjson.loads(payload)
    if data.get("v") != _FORMAT:
        raise ValueError(f"unknown spool record format {data.get('v')!r}")
    # Rows written before a column was added at FlowRow's end take its default.
    return HistoryBatch(upserts=[FlowRow(*values) for values in data["upserts"]],
                        closes=[CloseOp(*values) for values in data["closes"]],
                        coverage=[Coverage(*values) for values in data["coverage"]],
                        gaps=[Gap(*values) for values in data["gaps"]])


class Spool:
    """The spool in `directory`: append(), pending(), replay(). One process at a time."""

    def __init__(self, directory: Path | str, *, segment_bytes: int = 16 << 20) -> None:
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        try:
            self._lock = lock_directory(self.directory)
        except BlockingIOError as exc:
            raise ConfigError(str(self.directory), "the spool is in use by another "
                              "process") from exc
        except OSError as exc:
            raise ConfigError(str(self.directory), f"cannot use the spool: {exc}") from exc
        self._writer: BinaryIO | None = None
        # Per segment, how many of its batches were applied by a replay that then failed:
        # the next replay in this process skips them (after a restart they apply again).
        self._applied: dict[Path, int] = {}
        self._pending = sum(1 for path in self.segments() for _ in read_segment(path))

    def segments(self) -> list[Path]:
        """The segment files, oldest first."""
        return sorted(self.directory.glob(f"*{SUFFIX}"))

    def pending(self) -> int:
        """Batches spooled and not yet applied."""
        return self._pending

    def append(self, batch: HistoryBatch) -> None:
        """Store a batch durably (fsynced) behind all the others."""
        payload = encode(batch)
        record = frame(payload)
        writer = self._segment_for(len(record))
        try:
            writer.write(record)
            writer.flush()
            os.fsync(writer.fileno())
        except BaseException:
            # Part of the record may be on disk (disk full…): it stays that segment's torn
            # end, and the next append starts a new segment rather than land behind it.
            with contextlib.suppress(OSError):
                self._seal()
            raise
        self._pending += 1

    def _segment_for(self, size: int) -> BinaryIO:
        """This process's current segment, or a new one when it is full."""
        if self._writer is not None and self._writer.tell() + size > self.segment_bytes:
            self._seal()
        if self._writer is None:
            existing = self.segments()
            number = int(existing[-1].stem) + 1 if existing else 1
            path = self.directory / f"{number:012d}{SUFFIX}"
            self._writer = os.fdopen(create_segment(path), "ab")
        return self._writer

    def _seal(self) -> None:
        """Stop appending to the current segment (the next append starts a new one)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def replay(self, apply: Callable[[HistoryBatch], None]) -> int:
        """Apply every spooled batch, oldest first; a segment is deleted once all of its
        batches applied. An exception from `apply` stops the replay (and propagates) with
        the rest kept. Returns how many batches were applied."""
        self._seal()
        done = 0
        for path in self.segments():
            if not has_magic(path):
                set_aside(path)
                continue
            skip = self._applied.get(path, 0)
            for index, payload in enumerate(read_segment(path, report=False)):
                if index < skip:
                    continue
                batch = self._decode(path, index, payload)
                if batch is not None:
                    apply(batch)
                self._applied[path] = index + 1
                self._pending -= 1
                done += 1
            path.unlink()
            fsync_dir(self.directory)
            self._applied.pop(path, None)
        self._pending = 0
        return done

    @staticmethod
    def _decode(path: Path, index: int, payload: bytes) -> HistoryBatch | None:
        try:
            return decode(payload)
        except (ValueError, TypeError, KeyError) as exc:
            # Intact (its CRC matched) yet unreadable: a newer format. Keeping it would block
            # every later batch forever.
            log.error("spool %s: skipping record %d, not a batch this version reads: %s",
                      path, index, exc)
            return None

    def close(self) -> None:
        """Close the current segment and release the directory (idempotent)."""
        self._seal()
        if not self._lock.closed:
            self._lock.close()

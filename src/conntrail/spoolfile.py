"""The one on-disk spool format: segment files of length + CRC32 framed records.

Shared by the history spool (`history/spool.py`) and the sinks' spill queue
(`pipeline/spill.py`). A segment starts with MAGIC; each record is a little-endian header
(payload length, CRC32 of the payload) followed by the payload. Records are only ever
appended, so a crash can tear the last record of a segment and nothing else: readers stop
there and say so. What a record's payload means is the user's business.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

MAGIC = b"CTSPOOL1"  # first bytes of every segment: format and version
SUFFIX = ".seg"
HEADER = struct.Struct("<II")  # payload length, CRC32 of the payload
_BAD_SUFFIX = ".bad"
_MAX_BAD_NAMES = 1000  # bounds the search for a free .bad name


class RecordError(ValueError):
    """A record that is torn or corrupt at byte `offset` of its segment."""

    def __init__(self, offset: int, read: int) -> None:
        self.offset = offset
        self.read = read  # bytes of header and payload found before giving up
        super().__init__(f"bad record at offset {offset}")


def frame(payload: bytes) -> bytes:
    """A payload with its header: the bytes one append writes."""
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def framed_size(payload: bytes) -> int:
    """How many bytes `payload` takes in a segment."""
    return HEADER.size + len(payload)


def read_record(handle: BinaryIO) -> bytes | None:
    """The record at the handle's position, None at a clean end of the segment; raises
    RecordError for a short or corrupt one (the handle's position is then undefined)."""
    offset = handle.tell()
    header = handle.read(HEADER.size)
    if not header:
        return None
    if len(header) < HEADER.size:
        raise RecordError(offset, len(header))
    length, crc = HEADER.unpack(header)
    payload = handle.read(length)
    if len(payload) != length or zlib.crc32(payload) != crc:
        raise RecordError(offset, HEADER.size + len(payload))
    return payload


def read_segment(path: Path, *, report: bool = True) -> Iterator[bytes]:
    """The intact records of one segment, in order; stops (with a log line, if `report`) at
    a torn or corrupt record, since nothing after it can be trusted to start where it
    seems to."""
    with path.open("rb") as handle:
        if handle.read(len(MAGIC)) != MAGIC:
            return  # empty (a crash as it was created) or not ours: the owner sets it aside
        size = os.fstat(handle.fileno()).st_size
        while True:
            try:
                payload = read_record(handle)
            except RecordError as bad:
                if report:
                    _report_bad(path, bad, size)
                return
            if payload is None:
                return
            yield payload


def _report_bad(path: Path, bad: RecordError, size: int) -> None:
    # A record reaching the end of the file is the last append, cut short by a crash;
    # anything before the end is damage.
    what = "torn record at its end (a crash during append)" \
        if bad.offset + bad.read >= size else "corrupt record"
    log.warning("spool %s: ignoring a %s at offset %d (%d bytes)", path, what, bad.offset,
                size - bad.offset)


def has_magic(path: Path) -> bool:
    """Whether the file starts like a segment."""
    with path.open("rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def create_segment(path: Path) -> int:
    """Create a new segment (never an existing one) holding MAGIC, durably (file and
    directory entry fsynced); returns its fd, opened for appending."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
    try:
        write_all(fd, MAGIC)
        os.fsync(fd)
        fsync_dir(path.parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_all(fd: int, data: bytes) -> None:
    """One os.write() in the common case; loops on a short write (bounded by the size)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # not expected from a regular file; never loop on it
            raise OSError(f"write to fd {fd} wrote nothing")
        view = view[written:]


def fsync_dir(directory: Path) -> None:
    """Make a file's creation, rename or removal itself durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_aside(path: Path) -> None:
    """An empty segment (a crash right after creating it) goes; anything else that is not
    a segment is renamed .bad for a human, never read again and never deleted."""
    if path.stat().st_size == 0:
        path.unlink()
    else:
        target = _free_bad_name(path)
        log.error("spool %s: not a spool segment (bad header); renamed to %s", path,
                  target.name)
        path.rename(target)
    fsync_dir(path.parent)


def _free_bad_name(path: Path) -> Path:
    """`name.bad`, or `name.N.bad` when an earlier one has that name (never overwrite)."""
    target = path.with_suffix(_BAD_SUFFIX)
    for number in range(1, _MAX_BAD_NAMES):
        if not target.exists():
            return target
        target = path.with_suffix(f".{number}{_BAD_SUFFIX}")
    raise FileExistsError(f"{path}: too many .bad files named after it")


def lock_directory(directory: Path) -> BinaryIO:
    """Create `directory` (0700) if needed and hold an exclusive flock on its `.lock` file
    for as long as the returned file is open. Raises BlockingIOError when another process
    (or another open in this one) holds it, OSError when the directory is unusable."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = (directory / ".lock").open("a+b")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        lock.close()
        raise
    return lock

"""The file sink: formatted records appended as lines to a file, rotated, compressed, pruned.

Writes go through `os.write` on an O_APPEND fd, so a failure midway (ENOSPC) is exact: the
sink remembers how much of the payload reached the file and, when `write` is called again
with the same payload object, writes only the rest. The runner's contract: a payload whose
write failed is retried, the same object, until it is written or given up at shutdown
(`close()` then cuts its written part off the file, so no torn line is left). A batch is
never split across files: rotation and reopen wait until the pending payload is complete.
Compression and pruning run on a background thread: a 100 MB gzip never stalls the writer.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import logging
import lzma
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from conntrail.config import Table
from conntrail.errors import ConfigError
from conntrail.formats.choose import formatter_from
from conntrail.model import Record
from conntrail.pipeline.stages import Formatter, SinkContext
from conntrail.units import parse_duration

log = logging.getLogger(__name__)
COMPRESSIONS = ("gzip", "xz", "none")
_SUFFIXES = {"gzip": ".gz", "xz": ".xz"}
_CHUNK = 1 << 20  # compression reads this much between looks at the abort flag
_COMPRESS_NICE = 10  # on a 2-core host the compressor must not starve the kernel reader
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class Rotation:
    """When to rotate (either limit; None = never), how many to keep, how to compress."""

    size: int | None = None  # bytes: rotate before a batch that would go past it
    interval: float | None = None  # seconds since the file's first line
    keep: int = 10  # rotated files kept; 0 keeps all
    compress: str = "gzip"  # "gzip", "xz" or "none"


@dataclass(slots=True)
class _Pending:
    """The payload being written: where it started in the file and how much is in."""

    payload: bytes
    start: int
    written: int = 0


class FileSink:
    """Appends each batch's lines to a file; see the module docstring for the contract."""

    def __init__(self, name: str, path: Path, formatter: Formatter, *, mode: int = 0o640,
                 rotation: Rotation = Rotation(), fsync: float | None = 1.0,
                 clock: Callable[[], float] = time.time, key_path: str = "path",
                 close_timeout: float = 10.0) -> None:
        self.name = name
        self.path = path
        self.destination = str(path.resolve())  # two sinks on one file are refused
        self.rotation = rotation
        self.fsync = fsync  # None: never; 0: after every write; else at most every N s
        # Idle heartbeats (empty batches) let time-based work happen on a quiet host.
        self.heartbeat = bool(fsync) or rotation.interval is not None
        self._format = formatter
        self._mode = mode
        self._clock = clock
        self._key_path = key_path
        self._close_timeout = close_timeout
        self._fd: int | None = None
        self._size = 0
        self._started = 0.0  # when the current file got its first line (clock)
        self._synced_at = 0.0
        self._dirty = False
        self._pending: _Pending | None = None
        self._reopen_wanted = False
        self._rotate_failing = False
        self._keeper: _Housekeeper | None = None
        self._counters = {"rotations": 0, "bytes_written": 0, "write_errors": 0,
                          "compressed": 0, "compress_failures": 0, "pruned": 0}

    def open(self) -> None:
        """Create the directory and open the file; queue leftovers for compression."""
        try:
            self._open_fd()
        except OSError as exc:
            raise self._error(f"cannot open {self.path}: {_reason(exc)}") from exc
        self._started = self._synced_at = self._clock()
        self._keeper = _Housekeeper(self.path, self.rotation, self.name, self._counters)
        self._keeper.start()
        self._keeper.adopt_leftovers()

    def encode(self, batch: Sequence[Record]) -> bytes:
        """The batch's lines as one bytes object (pipeline thread)."""
        fmt = self._format
        return b"".join([fmt(record) for record in batch])

    def write(self, payload: bytes) -> None:
        """Append one batch; after an OSError, call again with the same payload object."""
        pending = self._pending
        if pending is not None and pending.payload is not payload:
            log.warning("sink %s: a failed batch was not retried; its part is cut off",
                        self.name)
            self._drop_pending()
            pending = None
        try:
            if pending is None:
                if self._fd is not None:
                    self._rotate_if_due(len(payload))
                self._ensure_open()  # its size is where this batch starts
                pending = self._pending = _Pending(payload, self._size)
            self._finish(self._ensure_open(), pending)
        except OSError:
            self._counters["write_errors"] += 1
            raise
        self._pending = None
        if self._reopen_wanted:
            try:
                self.reopen()
            except OSError as exc:  # this payload is in: raising would write it twice
                log.error("sink %s: cannot reopen %s: %s", self.name, self.path,
                          _reason(exc))

    def close(self) -> None:
        """Flush (fsync unless "never"), close, and wait a bounded time for compression."""
        self._drop_pending()
        self._close_fd()
        if self._keeper is not None:
            self._keeper.stop(self._close_timeout)
            self._keeper = None

    def reopen(self) -> None:
        """Close and reopen the same path (SIGHUP after an external logrotate)."""
        if self._pending is not None:
            self._reopen_wanted = True  # the batch's rest must go to the same file
            return
        self._reopen_wanted = False
        self._close_fd()
        self._ensure_open()

    def check(self) -> str:
        """The directory exists or can be created and is writable; report free space."""
        if self.path.is_dir():
            raise self._error(f"{self.path} is a directory")
        existing = self.path.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise self._error(f"{existing} is not a directory")
        probe = existing / f".{self.path.name}.probe-{os.getpid()}"
        self._probe(probe, os.O_CREAT | os.O_EXCL, f"directory {existing} is not writable")
        probe.unlink()
        if self.path.exists():
            self._probe(self.path, os.O_APPEND, f"{self.path} is not writable")
        vfs = os.statvfs(existing)
        note = "" if existing == self.path.parent else f" (to be created in {existing})"
        return (f"file {self.path}: directory writable{note}, "
                f"{vfs.f_bavail * vfs.f_frsize / (1 << 30):.1f} GiB free")

    def stats(self) -> dict[str, int]:
        """Monotonic counters: rotations, bytes written, write errors, compression, pruning."""
        return dict(self._counters)

    def _finish(self, fd: int, pending: _Pending) -> None:
        """Write the rest of `pending`; each os.write moves it on, so the loop ends."""
        view = memoryview(pending.payload)
        while pending.written < len(view):
            try:
                count = os.write(fd, view[pending.written:])
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
            if count <= 0:
                raise OSError(errno.EIO, "write accepted no bytes", str(self.path))
            pending.written += count
            self._size += count
            self._counters["bytes_written"] += count
            self._dirty = True
        now = self._clock()
        elapsed = now - self._synced_at  # < 0: the clock went back; sync now
        if self.fsync is not None and self._dirty and not 0 <= elapsed < self.fsync:
            try:
                os.fdatasync(fd)  # on failure, the retry (same payload) syncs again
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
            self._synced_at = now
            self._dirty = False

    def _drop_pending(self) -> None:
        """Give up the pending payload: cut its part off the file (no torn line is left)."""
        pending, self._pending = self._pending, None
        if pending is None or self._fd is None:
            return
        if not 0 < pending.written < len(pending.payload):
            return  # nothing of it written, or all of it (only its fsync failed)
        # Only when nobody else changed the file meanwhile (a copytruncate logrotate).
        if os.fstat(self._fd).st_size == pending.start + pending.written:
            try:
                os.ftruncate(self._fd, pending.start)
                self._size = pending.start
            except OSError as exc:
                log.error("sink %s: cannot cut a partly written batch off %s: %s",
                          self.name, self.path, _reason(exc))

    def _ensure_open(self) -> int:
        if self._fd is None and self._open_fd():
            self._started = self._clock()
        assert self._fd is not None
        return self._fd

    def _open_fd(self) -> bool:
        """Open the file (created with the configured mode); True if it was created."""
        _make_dir(self.path.parent)
        try:
            fd, created = os.open(self.path, _OPEN_FLAGS | os.O_EXCL, self._mode), True
        except FileExistsError:
            fd, created = os.open(self.path, _OPEN_FLAGS, self._mode), False
        try:
            self._size = self._adopt(fd, created)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return created

    def _adopt(self, fd: int, created: bool) -> int:
        """Check a freshly opened fd; returns the file's size."""
        if created:
            os.fchmod(fd, self._mode)  # the umask must not narrow the configured mode
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(self.path))
        if info.st_size and _ends_mid_line(self.path, info.st_size):
            # An earlier run died mid-write: end that line so the next one stays whole.
            log.warning("sink %s: %s ended mid-line; terminated it", self.name, self.path)
            os.write(fd, b"\n")
            return info.st_size + 1
        return info.st_size

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self.fsync is not None and self._dirty:
                os.fdatasync(fd)
        except OSError as exc:
            log.error("sink %s: fsync of %s failed: %s", self.name, self.path, _reason(exc))
        finally:
            self._dirty = False
            os.close(fd)

    def _rotate_if_due(self, incoming: int) -> None:
        now = self._clock()
        if self._size == 0 or now < self._started:
            self._started = now  # an empty file's age starts with its first line
            return
        limit, interval = self.rotation.size, self.rotation.interval
        if (limit is not None and self._size + incoming > limit) or (
                interval is not None and now - self._started >= interval):
            self._rotate(now)

    def _rotate(self, now: float) -> None:
        """Rename the file to its timestamped name, start a new one, queue the old one."""
        target: Path | None = None
        try:
            target = _rotated_name(self.path, now)
            os.rename(self.path, target)
        except FileNotFoundError:
            target = None  # moved away by someone else (logrotate): just start anew
        except OSError as exc:
            if not self._rotate_failing:  # once per episode: it is retried every batch
                log.error("sink %s: cannot rotate %s: %s; writing on", self.name, self.path,
                          _reason(exc))
            self._rotate_failing = True
            return
        self._rotate_failing = False
        self._counters["rotations"] += 1
        self._close_fd()
        if self._keeper is not None and target is not None:
            self._keeper.submit(target)
        self._open_fd()  # a failure raises from write; its retry opens again
        self._started = now

    def _probe(self, path: Path, flags: int, problem: str) -> None:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CLOEXEC | flags, 0o600))
        except OSError as exc:
            raise self._error(f"{problem}: {_reason(exc)}") from exc

    def _error(self, reason: str) -> ConfigError:
        return ConfigError(self._key_path, reason)


class _Housekeeper:
    """Compresses rotated files and prunes the oldest, one job at a time, off the writer."""

    def __init__(self, path: Path, rotation: Rotation, name: str,
                 counters: dict[str, int]) -> None:
        self.path = path
        self.rotation = rotation
        self.counters = counters  # the sink's: compressed, compress_failures, pruned
        self._suffix = _SUFFIXES.get(rotation.compress)
        # name-STAMP[_N][.gz|.xz][.tmp]: groups 1 stamp, 2 counter, 3 suffix, 4 temp
        self._pattern = re.compile(re.escape(path.name) + r"-(\d{8}T\d{6}Z)(?:_(\d+))?"
                                   r"(\.gz|\.xz)?(\.tmp)?")
        self._jobs: queue.Queue[Path | None] = queue.Queue()
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sink:{name}:compress",
                                        daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def submit(self, rotated: Path) -> None:
        """Compress `rotated` (if configured), then prune."""
        self._jobs.put(rotated)

    def adopt_leftovers(self) -> None:
        """Remove stale temp files; queue uncompressed rotated files left by an earlier run."""
        leftovers = []
        for entry, match in self._rotated():
            if match.group(4):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            elif match.group(3) is None and self._suffix is not None:
                leftovers.append(entry)
        for entry in sorted(leftovers):
            self.submit(entry)

    def stop(self, timeout: float) -> None:
        """Finish queued jobs within `timeout`, else abort (a leftover is done next run)."""
        self._jobs.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("compression of rotated %s files unfinished at exit; resumed at the "
                        "next start", self.path)
            self._abort.set()
            self._thread.join(2.0)

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # nicer only: a failure changes nothing else
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _COMPRESS_NICE)
        while not self._abort.is_set():
            job = self._jobs.get()
            if job is None:
                return
            if self._suffix is not None:
                self._compress(job, self._suffix)
            self._prune()

    def _compress(self, source: Path, suffix: str) -> None:
        final = source.with_name(source.name + suffix)
        try:
            if _compress_file(source, final, self._abort):
                source.unlink()
                self.counters["compressed"] += 1
        except FileNotFoundError:
            pass  # already pruned: the writer rotated faster than we compress
        except OSError as exc:
            self.counters["compress_failures"] += 1
            log.error("cannot compress %s: %s", source, _reason(exc))

    def _rotated(self) -> list[tuple[Path, re.Match[str]]]:
        with os.scandir(self.path.parent) as entries:
            matches = [(Path(entry.path), self._pattern.fullmatch(entry.name))
                       for entry in entries]
        return [(path, match) for path, match in matches if match is not None]

    def _prune(self) -> None:
        """Delete the oldest rotated files beyond `keep` (a file and its .gz count once)."""
        if self.rotation.keep == 0:
            return
        groups: dict[tuple[str, int], list[Path]] = {}
        try:
            for entry, match in self._rotated():
                if not match.group(4):
                    key = (match.group(1), int(match.group(2) or 0))
                    groups.setdefault(key, []).append(entry)
        except OSError as exc:
            log.error("cannot list %s: %s", self.path.parent, _reason(exc))
            return
        for key in sorted(groups)[:-self.rotation.keep]:
            for entry in groups[key]:
                try:
                    entry.unlink()
                    self.counters["pruned"] += 1
                except OSError as exc:
                    log.error("cannot delete %s: %s", entry, _reason(exc))


class _Aborted(Exception):  # noqa: N818 - control flow inside this module only
    """Compression stopped at close; the source stays for the next run."""


def _compress_file(source: Path, final: Path, abort: threading.Event) -> bool:
    """Compress to a temp name, fsync, rename to `final`; False if aborted (no temp left)."""
    temp = final.with_name(final.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()
    mode = stat.S_IMODE(os.stat(source).st_mode)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with open(fd, "wb") as raw:
            os.fchmod(fd, mode)
            with _packer(raw, final) as packed, open(source, "rb") as data:
                while chunk := data.read(_CHUNK):
                    if abort.is_set():
                        raise _Aborted
                    packed.write(chunk)
            raw.flush()
            os.fsync(fd)
        os.replace(temp, final)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        if isinstance(exc, _Aborted):
            return False
        raise
    return True


def _packer(raw: IO[bytes], final: Path) -> io.BufferedIOBase:
    if final.suffix == ".xz":
        return lzma.LZMAFile(raw, "wb")
    # Level 6, gzip's own default: level 9 costs about twice the CPU for ~1 % less.
    return gzip.GzipFile(final.name, "wb", 6, raw)


def _rotated_name(path: Path, now: float) -> Path:
    """`flows.jsonl-20261122T140200Z`, or `…Z_1`, `…Z_2` when taken (compressed or not).

    `_` sorts after `.`, so `…Z_1.gz` lists after `…Z.gz`, as it was made later.
    """
    base = f"{path.name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))}"
    for counter in range(1000):
        name = base if counter == 0 else f"{base}_{counter}"
        if not any(os.path.lexists(path.with_name(name + suffix))
                   for suffix in ("", ".gz", ".xz")):
            return path.with_name(name)
    raise OSError(errno.EEXIST, "no free name for the rotated file", base)


def _make_dir(directory: Path) -> None:
    if not directory.is_dir():
        directory.mkdir(0o750, parents=True, exist_ok=True)
        os.chmod(directory, 0o750)  # noqa: S103 - the documented mode; mkdir's is umasked


def _ends_mid_line(path: Path, size: int) -> bool:
    with open(path, "rb") as data:
        data.seek(size - 1)
        return data.read(1) not in (b"\n", b"")


def _reason(exc: OSError) -> str:
    """`no space left on device`: the strerror, lowercase, without errno and path."""
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def from_config(table: Table, context: SinkContext) -> FileSink:
    """A FileSink from its table: path, mode, rotation, keep, compress, fsync, format keys."""
    formatter = formatter_from(table)
    extension = ".log" if table.data.get("format") == "text" else ".jsonl"
    path = _path(table, context, context.log_dir / f"{context.name}{extension}")
    mode = _mode(table)
    rotation = _rotation(table)
    fsync = _fsync(table)
    table.done()
    return FileSink(context.name, path, formatter, mode=mode, rotation=rotation, fsync=fsync,
                    key_path=table.key_path("path"))


def parse_fsync(text: str, key_path: str) -> float | None:
    """"never" → None, "always" → 0.0, a duration ("1s", "500ms") → seconds (0 = always)."""
    if text in ("never", "always"):
        return None if text == "never" else 0.0
    try:
        return parse_duration(text, key_path) / 1e9
    except ConfigError:
        raise ConfigError(key_path, 'must be "never", "always" or a duration such as "1s", '
                          f"not {text!r}") from None


def _path(table: Table, context: SinkContext, default: Path) -> Path:
    text: str | None = table.text("path", None)
    if text is None:
        return default
    if not text.strip() or text.endswith("/"):
        raise table.error("path", f"must name a file, not {text!r}")
    return context.log_dir / text  # a relative path is under the log directory


def _mode(table: Table) -> int:
    text: str = table.text("mode", "0640")
    try:
        mode = int(text, 8)
    except ValueError:
        raise table.error("mode", f'must be an octal mode such as "0640", not {text!r}') \
            from None
    if not 0 <= mode <= 0o777:
        raise table.error("mode", f"must be at most 0777, not {text!r}")
    if not mode & stat.S_IWUSR:
        raise table.error("mode", f"must let the owner write (0600 or more), not {text!r}")
    return mode


def _rotation(table: Table) -> Rotation:
    size = table.size("rotate_size", None)
    interval = table.duration("rotate_interval", None)
    if interval is not None and interval < 1:
        raise table.error("rotate_interval", "must be at least 1s (rotated names have "
                          "one-second resolution)")
    keep = table.integer("keep", 10, minimum=0)
    compress = table.text("compress", "gzip", choices=COMPRESSIONS)
    return Rotation(size, interval, keep, compress)


def _fsync(table: Table) -> float | None:
    if not isinstance(table.data.get("fsync", ""), str):
        seconds: float = table.duration("fsync")  # a number of seconds, or a type error
        return seconds
    return parse_fsync(table.text("fsync", "1s"), table.key_path("fsync"))

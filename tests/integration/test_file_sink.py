"""The file sink on a real, tiny, full filesystem: a write torn by ENOSPC is finished whole."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from conntrail.errors import ConfigError
from conntrail.formats.jsonl import JsonFormat
from conntrail.sinks.file import FileSink
from tests.integration.netenv import sh

PAGE = 4096


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `where` for the block; always unmounted, even on failure."""
    where.mkdir()
    sh("mount", "-t", "tmpfs", "-o", options, "ctt-file-sink", str(where))
    try:
        yield where
    finally:
        sh("umount", str(where), check=False)
        if os.path.ismount(where):  # busy (a test failed with a file open): detach it
            sh("umount", "-l", str(where))


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs."""
    with tmpfs(tmp_path / "mnt", "size=64k,mode=0755") as mount:
        yield mount


def fill(directory: Path, leave: int) -> Path:
    """Fill the filesystem, then free `leave` bytes (whole pages); returns the filler."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        for _ in range(64):  # a 64 KiB filesystem is full after at most 16 pages
            try:
                os.write(fd, b"\0" * PAGE)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        else:
            raise AssertionError("the filesystem never filled up")
        os.ftruncate(fd, os.fstat(fd).st_size - leave)
    finally:
        os.close(fd)
    return filler


def event_lines(count: int, start: int = 0) -> bytes:
    """JSON lines of about 100 bytes, each naming its index."""
    return b"".join(orjson.dumps({"index": i, "pad": "x" * 80}) + b"\n"
                    for i in range(start, start + count))


def test_enospc_midway_is_finished_whole_after_space_returns(small_fs: Path) -> None:
    sink = FileSink("log", small_fs / "flows.jsonl", JsonFormat(), fsync=0.0)
    sink.open()
    try:
        first = event_lines(5)
        sink.write(first)
        filler = fill(small_fs, leave=2 * PAGE)
        payload = event_lines(200, start=5)  # ~20 KiB: about 10 KiB fit
        with pytest.raises(OSError) as raised:
            sink.write(payload)
        assert raised.value.errno == errno.ENOSPC
        torn = sink.path.read_bytes()
        assert len(first) < len(torn) < len(first) + len(payload)  # it stopped midway
        assert not torn.endswith(b"\n")
        with pytest.raises(OSError):  # still full: the retry fails too, writing nothing twice
            sink.write(payload)
        filler.unlink()
        sink.write(payload)  # the runner's retry: the same payload object
        sink.write(event_lines(1, start=205))
    finally:
        sink.close()
    written = sink.path.read_bytes()
    assert written == first + payload + event_lines(1, start=205)
    indexes = [orjson.loads(line)["index"] for line in written.splitlines()]
    assert indexes == list(range(206))  # every line once, whole, in order
    assert sink.stats()["write_errors"] == 2


def test_a_batch_given_up_on_a_full_disk_is_cut_off(small_fs: Path) -> None:
    sink = FileSink("log", small_fs / "flows.jsonl", JsonFormat(), fsync=None)
    sink.open()
    try:
        first = event_lines(5)
        sink.write(first)
        fill(small_fs, leave=PAGE)
        with pytest.raises(OSError, match="No space left on device"):
            sink.write(event_lines(200, start=5))
        assert len(sink.path.read_bytes()) > len(first)
    finally:
        sink.close()  # the runner gave up at shutdown
    assert sink.path.read_bytes() == first


def test_check_refuses_a_read_only_filesystem(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "size=64k,ro") as mount:
        sink = FileSink("log", mount / "flows.jsonl", JsonFormat(),
                        key_path="pipelines.main.sinks.log.path")
        with pytest.raises(ConfigError, match=f"^pipelines.main.sinks.log.path: directory "
                           f"{mount} is not writable: read-only file system$"):
            sink.check()

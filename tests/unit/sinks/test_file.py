"""The file sink: lines, rotation, pruning, compression, reopen, resumed writes, config."""

from __future__ import annotations

import errno
import gzip
import lzma
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from tests.unit.formats.sample import ICMP, PLAIN_UDP6, SNAT_TCP

from conntrail.config import Table
from conntrail.errors import ConfigError
from conntrail.formats.jsonl import JsonFormat
from conntrail.pipeline.stages import SinkContext
from conntrail.sinks import file as file_sink
from conntrail.sinks.file import FileSink, Rotation, from_config, parse_fsync

PREFIX = "pipelines.main.sinks.log"
T0 = 1_795_356_720.0  # 2026-11-22T14:12:00Z


class Clock:
    """A settable wall clock."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def lines(n: int, start: int = 0, width: int = 40) -> bytes:
    """`n` distinct newline-terminated lines of about `width` bytes."""
    return b"".join(b"%06d %s\n" % (i, b"x" * (width - 8)) for i in range(start, start + n))


def rotated(directory: Path, name: str = "flows.jsonl") -> list[str]:
    """The rotated files' names, sorted (as `ls` shows them)."""
    return sorted(entry for entry in os.listdir(directory) if entry.startswith(name + "-"))


def read_any(path: Path) -> bytes:
    """A rotated file's content, decompressed."""
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes())
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes())
    return path.read_bytes()


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., FileSink]]:
    """Builds opened sinks in tmp_path/logs; every one is closed after the test."""
    sinks: list[FileSink] = []

    def build(clock: Clock | None = None, **options: Any) -> FileSink:
        sink = FileSink("log", tmp_path / "logs" / "flows.jsonl", JsonFormat(),
                        clock=clock or Clock(), **options)
        sink.open()
        sinks.append(sink)
        return sink

    try:
        yield build
    finally:
        for sink in sinks:
            sink.close()


def configured(tmp_path: Path, **keys: Any) -> FileSink:
    return from_config(Table(dict(keys), PREFIX), SinkContext("log", log_dir=tmp_path))


# -- writing -------------------------------------------------------------------------------


def test_batches_are_written_as_json_lines(tmp_path: Path) -> None:
    sink = configured(tmp_path)
    sink.open()
    try:
        sink.write(sink.encode([SNAT_TCP, PLAIN_UDP6]))
        sink.write(sink.encode([ICMP]))
    finally:
        sink.close()
    docs = [orjson.loads(line) for line in (tmp_path / "log.jsonl").read_bytes().splitlines()]
    assert [doc["network"]["transport"] for doc in docs] == ["tcp", "udp", "icmp"]
    assert docs[0]["source"]["nat"]["ip"] == "198.18.2.1"
    assert sink.stats()["bytes_written"] == (tmp_path / "log.jsonl").stat().st_size


def test_the_default_path_follows_the_format(tmp_path: Path) -> None:
    assert configured(tmp_path).path == tmp_path / "log.jsonl"
    assert configured(tmp_path, format="ulogd").path == tmp_path / "log.jsonl"
    assert configured(tmp_path, format="text").path == tmp_path / "log.log"
    assert configured(tmp_path, path="sub/x.txt").path == tmp_path / "sub" / "x.txt"
    assert configured(tmp_path, path="/srv/x.log").path == Path("/srv/x.log")


def test_text_format_writes_text_lines(tmp_path: Path) -> None:
    sink = configured(tmp_path, format="text", template="{orig}", fsync="never")
    sink.open()
    try:
        sink.write(sink.encode([PLAIN_UDP6]))
    finally:
        sink.close()
    assert (tmp_path / "log.log").read_text() == "2001:db8::1/5000 > 2001:db8::2/53\n"


def test_files_and_directories_get_their_modes(tmp_path: Path) -> None:
    old_umask = os.umask(0o077)  # stricter than the modes asked for: must not narrow them
    try:
        sink = configured(tmp_path, path="new/dir/x.jsonl", mode="0644")
        sink.open()
        sink.close()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "new/dir").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "new/dir/x.jsonl").stat().st_mode) == 0o644
    existing = tmp_path / "old.jsonl"
    existing.write_bytes(b"")
    existing.chmod(0o600)
    sink = configured(tmp_path, path="old.jsonl", mode="0644")
    sink.open()
    sink.close()
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600  # existing files keep theirs


def test_a_file_ending_mid_line_is_terminated_at_open(make: Callable[..., FileSink],
                                                      tmp_path: Path) -> None:
    path = tmp_path / "logs" / "flows.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"whole\ntorn")
    sink = make(fsync=None)
    sink.write(b"next\n")
    assert path.read_bytes() == b"whole\ntorn\nnext\n"


# -- partial writes ------------------------------------------------------------------------


class ShortDisk:
    """Replaces os.write: accepts `room` bytes in all, then fails with ENOSPC."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, room: int) -> None:
        self.room = room
        self._real = os.write
        monkeypatch.setattr(os, "write", self.write)  # the sink calls os.write at each write

    def write(self, fd: int, data: Any) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        count = self._real(fd, bytes(data[:self.room]))
        self.room -= count
        return count


def test_a_failed_write_resumes_where_it_stopped(make: Callable[..., FileSink],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    sink = make(fsync=None)
    sink.write(lines(2))
    payload = lines(10, start=2)
    disk = ShortDisk(monkeypatch, room=95)  # two lines and a part of the third
    with pytest.raises(OSError, match="No space left on device") as raised:
        sink.write(payload)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(sink.path)
    assert not sink.path.read_bytes().endswith(b"\n")  # really torn midway
    disk.room = 1 << 20
    sink.write(payload)  # the same object: only the rest goes out
    assert sink.path.read_bytes() == lines(12)
    assert sink.stats()["write_errors"] == 1


def test_a_batch_given_up_at_close_leaves_no_torn_line(make: Callable[..., FileSink],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    sink = make(fsync=None)
    sink.write(lines(2))
    ShortDisk(monkeypatch, room=50)
    with pytest.raises(OSError):
        sink.write(lines(5, start=2))
    sink.close()
    assert sink.path.read_bytes() == lines(2)


def test_another_payload_after_a_failure_cuts_the_torn_part(
        make: Callable[..., FileSink], monkeypatch: pytest.MonkeyPatch) -> None:
    sink = make(fsync=None)
    disk = ShortDisk(monkeypatch, room=60)
    with pytest.raises(OSError):
        sink.write(lines(5))
    disk.room = 1 << 20
    sink.write(lines(1, start=7))  # breaks the contract: still, only whole lines remain
    assert sink.path.read_bytes() == lines(1, start=7)


def test_rotation_waits_for_the_pending_batch(make: Callable[..., FileSink],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    sink = make(clock, fsync=None, rotation=Rotation(interval=60, compress="none"))
    sink.write(lines(1))
    clock.now += 30
    payload = lines(4, start=1)
    disk = ShortDisk(monkeypatch, room=70)
    with pytest.raises(OSError):
        sink.write(payload)
    clock.now += 60  # rotation is due now, but the batch must not be split
    disk.room = 1 << 20
    sink.write(payload)
    assert sink.path.read_bytes() == lines(5)
    assert rotated(sink.path.parent) == []
    sink.write(lines(1, start=5))  # the next batch rotates
    assert sink.path.read_bytes() == lines(1, start=5)
    assert rotated(sink.path.parent) == ["flows.jsonl-20261122T141330Z"]


# -- fsync ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("never", None), ("always", 0.0), ("1s", 1.0), ("250ms", 0.25), ("2m", 120.0), ("0", 0.0),
])
def test_fsync_policies_parse(text: str, seconds: float | None) -> None:
    assert parse_fsync(text, "x.fsync") == seconds


def test_a_bad_fsync_policy_names_its_key() -> None:
    with pytest.raises(ConfigError, match=r'x\.fsync: must be "never", "always" or a duration'):
        parse_fsync("sometimes", "x.fsync")


def count_syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    monkeypatch.setattr(os, "fdatasync", calls.append)
    return calls


@pytest.mark.parametrize(("fsync", "during", "total"), [(None, 0, 0), (0.0, 4, 4), (1.0, 1, 2)])
def test_fsync_policy_decides_how_often(make: Callable[..., FileSink],
                                        monkeypatch: pytest.MonkeyPatch,
                                        fsync: float | None, during: int, total: int) -> None:
    clock = Clock()
    sink = make(clock, fsync=fsync)
    syncs = count_syncs(monkeypatch)
    for _ in range(4):  # at T0+0.4, +0.8, +1.2, +1.6: a 1 s policy syncs once (at +1.2)
        clock.now += 0.4
        sink.write(lines(1))
    assert len(syncs) == during
    sink.close()  # and at close what is not synced yet, unless "never"
    assert len(syncs) == total


# -- rotation ------------------------------------------------------------------------------


def test_rotation_by_size_never_splits_a_batch(make: Callable[..., FileSink]) -> None:
    clock = Clock()
    sink = make(clock, fsync=None, rotation=Rotation(size=100, keep=0, compress="none"))
    for index in range(5):  # 40-byte lines, two per batch: every batch after the first rotates
        sink.write(lines(2, start=2 * index))
        clock.now += 1
    names = rotated(sink.path.parent)
    assert names == [f"flows.jsonl-20261122T1412{second:02d}Z" for second in range(1, 5)]
    contents = [(sink.path.parent / name).read_bytes() for name in names]
    assert [*contents, sink.path.read_bytes()] == [lines(2, 2 * i) for i in range(5)]
    assert sink.stats()["rotations"] == 4


def test_a_batch_bigger_than_the_limit_still_goes_whole(make: Callable[..., FileSink]) -> None:
    sink = make(fsync=None, rotation=Rotation(size=100, compress="none"))
    sink.write(lines(10))
    assert sink.path.read_bytes() == lines(10)
    assert rotated(sink.path.parent) == []


def test_rotations_in_one_second_get_counters(make: Callable[..., FileSink]) -> None:
    sink = make(fsync=None, rotation=Rotation(size=50, keep=0, compress="none"))
    for index in range(4):
        sink.write(lines(1, start=index))
    assert rotated(sink.path.parent) == ["flows.jsonl-20261122T141200Z",
                                         "flows.jsonl-20261122T141200Z_1",
                                         "flows.jsonl-20261122T141200Z_2"]


def test_rotation_by_time(make: Callable[..., FileSink]) -> None:
    clock = Clock()
    sink = make(clock, fsync=None, rotation=Rotation(interval=3600, compress="none"))
    sink.write(lines(1))
    clock.now += 3599
    sink.write(lines(1, start=1))
    assert rotated(sink.path.parent) == []
    clock.now += 1
    sink.write(b"")  # an idle heartbeat rotates too
    assert rotated(sink.path.parent) == ["flows.jsonl-20261122T151200Z"]
    clock.now += 7200
    sink.write(b"")  # an empty file is never rotated
    assert len(rotated(sink.path.parent)) == 1
    assert sink.heartbeat


def test_keep_prunes_the_oldest(make: Callable[..., FileSink]) -> None:
    clock = Clock()
    sink = make(clock, fsync=None, rotation=Rotation(size=50, keep=2, compress="none"))
    for index in range(6):
        sink.write(lines(1, start=index))
        clock.now += 1
    sink.close()  # waits for the background pruning
    names = rotated(sink.path.parent)
    assert names == ["flows.jsonl-20261122T141204Z", "flows.jsonl-20261122T141205Z"]
    assert [(sink.path.parent / n).read_bytes() for n in names] == [lines(1, 3), lines(1, 4)]
    assert sink.stats()["pruned"] == 3


@pytest.mark.parametrize(("compress", "suffix"), [("gzip", ".gz"), ("xz", ".xz")])
def test_rotated_files_are_compressed(make: Callable[..., FileSink], compress: str,
                                      suffix: str) -> None:
    clock = Clock()
    sink = make(clock, fsync=None, rotation=Rotation(size=2000, keep=3, compress=compress),
                mode=0o600)
    batches = [lines(40, start=40 * index) for index in range(6)]
    for batch in batches:
        sink.write(batch)
        clock.now += 1
    sink.close()
    names = rotated(sink.path.parent)
    assert len(names) == 3 and all(name.endswith(suffix) for name in names)
    assert [read_any(sink.path.parent / name) for name in names] == batches[2:5]
    assert stat.S_IMODE((sink.path.parent / names[0]).stat().st_mode) == 0o600
    # The writer may outrun the compressor: pruning can take a file before it is compressed.
    assert 3 <= sink.stats()["compressed"] <= 5
    assert sink.stats()["compress_failures"] == 0


def test_leftovers_are_compressed_at_open(make: Callable[..., FileSink],
                                          tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "flows.jsonl-20261101T000000Z").write_bytes(b"old\n")
    (logs / "flows.jsonl-20261102T000000Z.gz.tmp").write_bytes(b"half a gzip")
    (logs / "other.jsonl-20261101T000000Z").write_bytes(b"not ours\n")
    sink = make(rotation=Rotation(compress="gzip"))
    sink.close()
    assert sorted(os.listdir(logs)) == ["flows.jsonl", "flows.jsonl-20261101T000000Z.gz",
                                        "other.jsonl-20261101T000000Z"]
    assert read_any(logs / "flows.jsonl-20261101T000000Z.gz") == b"old\n"


def test_compression_stopped_at_close_leaves_the_source(tmp_path: Path) -> None:
    source = tmp_path / "f-20261101T000000Z"
    source.write_bytes(lines(10))
    final = tmp_path / "f-20261101T000000Z.gz"
    abort = threading.Event()
    abort.set()
    assert not file_sink._compress_file(source, final, abort)
    assert os.listdir(tmp_path) == [source.name]


def test_reopen_after_rename_recreates_the_file(make: Callable[..., FileSink]) -> None:
    sink = make(fsync=None)
    sink.write(lines(1))
    moved = sink.path.with_name("flows.jsonl.1")
    sink.path.rename(moved)  # what logrotate does before sending SIGHUP
    sink.write(lines(1, start=1))  # still the old file until reopened
    sink.reopen()
    sink.write(lines(1, start=2))
    assert moved.read_bytes() == lines(2)
    assert sink.path.read_bytes() == lines(1, start=2)


# -- check ---------------------------------------------------------------------------------


def test_check_reports_free_space(tmp_path: Path) -> None:
    sink = FileSink("log", tmp_path / "a" / "b.jsonl", JsonFormat())
    report = sink.check()
    assert report.startswith(f"file {tmp_path}/a/b.jsonl: directory writable (to be created in "
                             f"{tmp_path})") and report.endswith("GiB free")
    assert os.listdir(tmp_path) == []  # check leaves nothing behind


def test_check_refuses_a_directory_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"")
    sink = FileSink("log", tmp_path / "plain" / "x" / "f.jsonl", JsonFormat(),
                    key_path=f"{PREFIX}.path")
    with pytest.raises(ConfigError, match=f"^{PREFIX}.path: {tmp_path}/plain is not a "
                       "directory$"):
        sink.check()


def test_check_refuses_a_path_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        FileSink("log", tmp_path, JsonFormat()).check()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_check_refuses_an_unwritable_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(0o500)
    try:
        with pytest.raises(ConfigError, match=f"path: directory {locked} is not writable: "
                           "permission denied"):
            FileSink("log", locked / "f.jsonl", JsonFormat()).check()
    finally:
        locked.chmod(0o700)


def test_open_failure_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"")
    sink = FileSink("log", tmp_path / "plain" / "f.jsonl", JsonFormat(),
                    key_path=f"{PREFIX}.path")
    with pytest.raises(ConfigError, match=f"^{PREFIX}.path: cannot open .*: file exists"):
        sink.open()


# -- configuration -------------------------------------------------------------------------


def test_configuration_defaults(tmp_path: Path) -> None:
    sink = configured(tmp_path)
    assert sink.rotation == Rotation(size=None, interval=None, keep=10, compress="gzip")
    assert sink.fsync == 1.0
    assert sink._mode == 0o640


def test_configuration_values(tmp_path: Path) -> None:
    sink = configured(tmp_path, rotate_size="100M", rotate_interval="1d", keep=0,
                      compress="xz", fsync=2, mode="600")
    assert sink.rotation == Rotation(size=100 << 20, interval=86400.0, keep=0, compress="xz")
    assert sink.fsync == 2.0
    assert sink._mode == 0o600


@pytest.mark.parametrize(("key", "value", "reason"), [
    ("rotate_size", "lots", "not a size"),
    ("rotate_size", True, "must be a size"),
    ("rotate_interval", "soon", "not a duration"),
    ("rotate_interval", "0s", "must be at least 1s"),
    ("keep", -1, "must be at least 0"),
    ("keep", "all", "must be an integer"),
    ("compress", "zip", "unknown value 'zip'"),
    ("fsync", "sometimes", 'must be "never", "always" or a duration'),
    ("fsync", True, "must be a duration"),
    ("mode", "rw-r-----", "must be an octal mode"),
    ("mode", "1777", "must be at most 0777"),
    ("mode", "0444", "must let the owner write"),
    ("mode", 416, "must be a string"),
    ("path", "", "must name a file"),
    ("path", "logs/", "must name a file"),
    ("format", "csv", "unknown value 'csv'"),
    ("template", "{orig}", 'only applies to format = "text"'),
])
def test_every_config_error_names_its_key(tmp_path: Path, key: str, value: Any,
                                          reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as raised:
        configured(tmp_path, **{key: value})
    assert raised.value.path == f"{PREFIX}.{key}"


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key; did you mean 'rotate_size'") as raised:
        configured(tmp_path, rotate_szie="1M")
    assert raised.value.path == f"{PREFIX}.rotate_szie"

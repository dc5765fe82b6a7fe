"""The shared spool framing: records, segments, torn tails, set-aside files, the lock."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import pytest

from conntrail import spoolfile
from conntrail.spoolfile import (
    HEADER,
    MAGIC,
    RecordError,
    create_segment,
    frame,
    framed_size,
    has_magic,
    lock_directory,
    read_record,
    read_segment,
    set_aside,
    write_all,
)


def _segment(path: Path, payloads: list[bytes]) -> Path:
    path.write_bytes(MAGIC + b"".join(frame(payload) for payload in payloads))
    return path


def test_records_round_trip_and_end_cleanly() -> None:
    handle = io.BytesIO(frame(b"one") + frame(b"") + frame(b"x" * 5000))
    assert [read_record(handle) for _ in range(4)] == [b"one", b"", b"x" * 5000, None]
    assert framed_size(b"one") == len(frame(b"one")) == HEADER.size + 3


@pytest.mark.parametrize("cut", [1, HEADER.size - 1, HEADER.size, HEADER.size + 2])
def test_a_short_record_names_its_offset(cut: int) -> None:
    data = frame(b"first") + frame(b"second")
    handle = io.BytesIO(data[:-cut])
    assert read_record(handle) == b"first"
    with pytest.raises(RecordError) as caught:
        read_record(handle)
    assert caught.value.offset == len(frame(b"first"))


def test_a_crc_mismatch_is_a_bad_record() -> None:
    data = bytearray(frame(b"payload"))
    data[-1] ^= 0x01
    with pytest.raises(RecordError, match="offset 0"):
        read_record(io.BytesIO(bytes(data)))


def test_read_segment_warns_of_a_torn_tail_with_file_and_offset(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _segment(tmp_path / "1.seg", [b"a" * 10, b"b" * 10, b"c" * 10])
    path.write_bytes(path.read_bytes()[:-4])
    assert list(read_segment(path)) == [b"a" * 10, b"b" * 10]
    offset = len(MAGIC) + 2 * framed_size(b"a" * 10)
    assert f"spool {path}: ignoring a torn record" in caplog.text
    assert f"at offset {offset}" in caplog.text


def test_read_segment_stops_quietly_when_asked(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    path = _segment(tmp_path / "1.seg", [b"a", b"b"])
    path.write_bytes(path.read_bytes()[:-1])
    assert list(read_segment(path, report=False)) == [b"a"]
    assert caplog.text == ""


def test_read_segment_yields_nothing_from_a_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "1.seg"
    path.write_bytes(b"not a spool at all")
    assert list(read_segment(path)) == []
    assert not has_magic(path)


def test_create_segment_writes_the_magic_and_never_reuses_a_file(tmp_path: Path) -> None:
    path = tmp_path / "1.seg"
    fd = create_segment(path)
    try:
        write_all(fd, frame(b"hello"))
    finally:
        os.close(fd)
    assert has_magic(path) and list(read_segment(path)) == [b"hello"]
    with pytest.raises(FileExistsError):
        create_segment(path)


def test_write_all_finishes_short_writes_and_refuses_zero(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))
        write_all(fd, b"0123456789")
        monkeypatch.setattr(os, "write", lambda fd, data: 0)
        with pytest.raises(OSError, match="wrote nothing"):
            write_all(fd, b"more")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"0123456789"


def test_set_aside_deletes_empty_files_and_never_overwrites_a_bad_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    empty = tmp_path / "1.seg"
    empty.write_bytes(b"")
    set_aside(empty)
    assert not empty.exists()
    caplog.set_level(logging.ERROR)
    for content in (b"first foreign", b"second foreign"):
        foreign = tmp_path / "2.seg"
        foreign.write_bytes(content)
        set_aside(foreign)
    assert (tmp_path / "2.bad").read_bytes() == b"first foreign"
    assert (tmp_path / "2.1.bad").read_bytes() == b"second foreign"
    assert "bad header" in caplog.text and "renamed to 2.1.bad" in caplog.text


def test_set_aside_gives_up_rather_than_overwrite(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spoolfile, "_MAX_BAD_NAMES", 2)
    (tmp_path / "3.bad").write_bytes(b"x")
    (tmp_path / "3.1.bad").write_bytes(b"y")
    foreign = tmp_path / "3.seg"
    foreign.write_bytes(b"z")
    with pytest.raises(FileExistsError, match="too many"):
        set_aside(foreign)
    assert foreign.read_bytes() == b"z"


def test_the_directory_lock_is_exclusive_until_closed(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b"
    first = lock_directory(directory)
    try:
        assert directory.is_dir() and (directory.stat().st_mode & 0o777) == 0o700
        with pytest.raises(BlockingIOError):
            lock_directory(directory)
    finally:
        first.close()
    lock_directory(directory).close()

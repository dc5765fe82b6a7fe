"""The inventory's state file: what was seen survives a restart.

Layout (little-endian): magic, version, a JSON header (namespace names, counts), then one
record per entry (key length, packed key, counters), then a CRC-32 of all that precedes.
Written to a temporary file, fsynced and renamed over the old one, so a crash leaves the old
state or the new, never half of one. A damaged file is refused with the byte offset of the
damage; it is never silently replaced (it holds what an earlier run accepted).
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import tempfile
import zlib
from pathlib import Path

from conntrail.errors import ConfigError
from conntrail.inventory.aggregate import KEY, Inventory, Snapshot, decode_entry

MAGIC = b"conntrail-inventory\n"
VERSION = 1
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
VALUES = struct.Struct("<qqIBQQ")  # first, last, flows, confirmed, packets, bytes
DEFAULT_PATH = Path("/var/lib/conntrail/inventory.state")
STATE_ENV = "CONNTRAIL_INVENTORY_STATE"


def default_state_path() -> Path:
    """$CONNTRAIL_INVENTORY_STATE, else /var/lib/conntrail/inventory.state."""
    return Path(os.environ.get(STATE_ENV) or DEFAULT_PATH)


def encode_state(snapshot: Snapshot, saved_ns: int) -> bytes:
    """The whole state file's bytes."""
    header = json.dumps({"netns": snapshot.netns, "entries": len(snapshot),
                         "events": snapshot.events, "saved_ns": saved_ns}).encode()
    parts = [MAGIC, _U16.pack(VERSION), _U32.pack(len(header)), header]
    for key, row in snapshot.keys:
        parts.append(_U16.pack(len(key)))
        parts.append(key)
        parts.append(VALUES.pack(*snapshot.values(row)))
    body = b"".join(parts)
    return body + _U32.pack(zlib.crc32(body))


class StateError(ValueError):
    """A state file that cannot be read: where and why."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"byte {offset}: {reason}")
        self.offset = offset


def decode_state(data: bytes, into: Inventory) -> int:
    """Merge a state file's entries into an inventory; returns the events it had counted."""
    if not data.startswith(MAGIC):
        raise StateError(0, "not a conntrail inventory state file")
    if len(data) < len(MAGIC) + _U16.size + _U32.size * 2:
        raise StateError(len(data), "truncated")
    body, (crc,) = data[:-_U32.size], _U32.unpack_from(data, len(data) - _U32.size)
    if zlib.crc32(body) != crc:
        raise StateError(len(body), "checksum mismatch (damaged or truncated)")
    offset = len(MAGIC)
    (version,) = _U16.unpack_from(body, offset)
    if version != VERSION:
        raise StateError(offset, f"version {version}, this conntrail reads {VERSION}")
    (length,) = _U32.unpack_from(body, offset + 2)
    offset += 6
    try:
        header = json.loads(body[offset:offset + length])
        netns = [str(name) for name in header["netns"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(offset, f"bad header: {exc}") from None
    offset += length
    while offset < len(body):
        offset = _merge_record(body, offset, netns, into)
    events = header.get("events", 0)
    return events if isinstance(events, int) else 0


def _merge_record(body: bytes, offset: int, netns: list[str], into: Inventory) -> int:
    start = offset
    if offset + _U16.size > len(body):
        raise StateError(start, "record header cut short")
    length: int = _U16.unpack_from(body, offset)[0]
    offset += _U16.size
    end = offset + length + VALUES.size
    if length < KEY.size or end > len(body):
        raise StateError(start, f"record of {length} key bytes does not fit")
    key = body[offset:offset + length]
    ns: int = _U16.unpack_from(key)[0]
    if ns >= len(netns):
        raise StateError(start, f"namespace number {ns} not in the header")
    first, last, flows, confirmed, packets, nbytes = VALUES.unpack_from(body, offset + length)
    values = (first, last, flows, confirmed, packets, nbytes)
    try:  # a key that would not decode at dump time is refused now, with its offset
        decode_entry(key, netns, values)
    except (ValueError, KeyError) as exc:
        raise StateError(start, f"undecodable entry ({exc})") from None
    into.merge_entry(key, netns[ns], values)
    return end


def save(path: Path, snapshot: Snapshot, saved_ns: int) -> None:
    """Replace the state file atomically and durably."""
    write_atomically(path, encode_state(snapshot, saved_ns), durable=True)


def write_atomically(path: Path, data: bytes, durable: bool = False) -> None:
    """Write to a temporary file beside `path` and rename it over: readers see the old
    content or the new, never a part. `durable` also fsyncs the file and the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.",  # noqa: SIM115
                                         delete=False)
    try:
        with handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    if durable:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def lock(path: Path, option: str = "--state") -> int:
    """Hold `path`.lock for this process's life: two conntrails saving one state file would
    each replace the other's work. Returns the lock's fd (closing it releases the lock)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(option, f"{path}.lock: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(option, f"{path} is in use by another conntrail inventory "
                                  "(give this one its own --state)") from None
    return fd


def load(path: Path, into: Inventory, option: str = "--state") -> int:
    """Merge the state file at `path` (absent: nothing) into `into`; errors name the byte."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise ConfigError(option, f"{path}: {exc.strerror}") from None
    try:
        return decode_state(data, into)
    except StateError as exc:
        raise ConfigError(option, f"{path}: damaged at {exc}; move it away or start "
                                  "over with --reset") from None

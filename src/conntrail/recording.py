"""The recording format of `conntrail record`: comment header, then one datagram per line.

Each data line is `<received_ns> <hex>`; a bare `<hex>` line is accepted too. Text, so a
recording can be read, diffed and pasted into a bug report.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from conntrail.errors import DecodeError


@dataclass(frozen=True, slots=True)
class RecordedDatagram:
    """One datagram as received, with its receipt time and source line."""

    line: int
    received_ns: int
    data: bytes


def format_line(received_ns: int, data: bytes) -> str:
    """One data line for a recording."""
    return f"{received_ns} {data.hex()}\n"


def header_lines(comments: Iterable[str]) -> str:
    """The comment header: every line prefixed with '# '."""
    return "".join(f"# {line}\n" for line in comments)


def parse_line(number: int, raw: str) -> RecordedDatagram | None:
    """One line: None for blanks and comments; DecodeError (offset = line number) if bad."""
    text = raw.strip()
    if not text or text.startswith("#"):
        return None
    parts = text.split()
    if len(parts) > 2:
        raise DecodeError(number, "recording line has more than two fields")
    try:
        received = int(parts[0]) if len(parts) == 2 else 0
        data = bytes.fromhex(parts[-1])
    except ValueError as exc:
        raise DecodeError(number, f"recording line is not '<ns> <hex>': {exc}") from exc
    return RecordedDatagram(number, received, data)


def parse_lines(lines: Iterable[str]) -> Iterator[RecordedDatagram]:
    """Every datagram of a recording; the first bad line raises DecodeError."""
    for number, raw in enumerate(lines, start=1):
        item = parse_line(number, raw)
        if item is not None:
            yield item

"""Stored flows as text: an aligned table, JSON lines, CSV; `who` answers. Pure, no I/O."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from conntrail.formats.timefmt import iso_utc
from conntrail.history.rows import COLUMNS, ClosedBy, FlowRow, NatType
from conntrail.history.store import WhoMatch
from conntrail.model import FAMILY_NAMES, proto_name, state_name, status_names

_CLOSED_BY = {member.value: member.label for member in ClosedBy}
_NAT = {member.value: member.label for member in NatType}


def endpoint(address: str | None, port: int | None) -> str:
    """'198.18.1.2:40000', '[2001:db8::1]:443', or the bare address."""
    if address is None:
        return "-"
    if port is None:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def end_text(row: FlowRow) -> str:
    """The end time, 'open', '<=time' (an upper bound) or '>=time' (a lower bound: it ended
    while nobody recorded)."""
    if row.end_ns is None:
        return "open"
    bound = {ClosedBy.DESTROY: "", ClosedBy.UNRECORDED: ">="}.get(ClosedBy(row.closed_by),
                                                                  "<=")
    return bound + iso_utc(row.end_ns)


def duration_text(row: FlowRow) -> str:
    """Seconds with one decimal, or '-' while open."""
    return "-" if row.end_ns is None else f"{(row.end_ns - row.start_ns) / 1e9:.1f}s"


def byte_count(row: FlowRow) -> int | None:
    """Bytes both ways, None without accounting."""
    if row.orig_bytes is None and row.reply_bytes is None:
        return None
    return (row.orig_bytes or 0) + (row.reply_bytes or 0)


def _nat_text(row: FlowRow) -> str:
    """The translated endpoints: 'snat→198.18.2.1:40000', 'dnat→198.18.3.2:80'."""
    parts = []
    if row.nat & NatType.SNAT:
        parts.append("snat->" + endpoint(row.reply_dst, row.reply_dport))
    if row.nat & NatType.DNAT:
        parts.append("dnat->" + endpoint(row.reply_src, row.reply_sport))
    return " ".join(parts) or "-"


def _process_text(row: FlowRow) -> str:
    bits = []
    if row.pid is not None:
        bits.append(f"pid={row.pid}")
    if row.uid is not None:
        bits.append(f"uid={row.uid}")
    if row.exe:
        bits.append(f"exe={row.exe}")
    if row.unit:
        bits.append(f"unit={row.unit}")
    return " ".join(bits)


TABLE_HEADER = ("START (UTC)", "END", "DURATION", "PROTO", "ORIGINAL", "NAT", "BYTES",
                "NETNS", "PROCESS")


def table_cells(row: FlowRow) -> tuple[str, ...]:
    """One table line's cells."""
    size = byte_count(row)
    return (iso_utc(row.start_ns), end_text(row), duration_text(row), proto_name(row.proto),
            f"{endpoint(row.orig_src, row.orig_sport)} > {endpoint(row.orig_dst, row.orig_dport)}",
            _nat_text(row), "-" if size is None else str(size), row.netns or "-",
            _process_text(row) or "-")


def table_lines(rows: Iterable[FlowRow], header: bool = True) -> Iterator[str]:
    """An aligned table (columns sized on the rows shown)."""
    cells = [table_cells(row) for row in rows]
    if header:
        cells.insert(0, TABLE_HEADER)
    if not cells:
        return
    widths = [max(len(line[i]) for line in cells) for i in range(len(TABLE_HEADER))]
    for line in cells:
        yield "  ".join(cell.ljust(width) for cell, width in zip(line, widths,
                                                                   strict=True)).rstrip()


def row_document(row: FlowRow) -> dict[str, Any]:
    """Every column, plus readable times, names and durations."""
    doc: dict[str, Any] = dict(zip(COLUMNS, row, strict=True))
    doc["start"] = iso_utc(row.start_ns)
    doc["end"] = None if row.end_ns is None else iso_utc(row.end_ns)
    doc["closed_by"] = _CLOSED_BY.get(row.closed_by, str(row.closed_by))
    doc["nat"] = _NAT.get(row.nat, str(row.nat))
    doc["family"] = FAMILY_NAMES.get(row.family, str(row.family))
    doc["proto"] = proto_name(row.proto)
    doc["status"] = list(status_names(row.status))
    doc["state"] = None if row.state is None else state_name(row.proto, row.state)
    doc["bytes"] = byte_count(row)
    return doc


def json_line(row: FlowRow) -> bytes:
    """One JSON object per flow."""
    return orjson.dumps(row_document(row), option=orjson.OPT_APPEND_NEWLINE)


def csv_lines(rows: Iterable[FlowRow]) -> Iterator[str]:
    """CSV with a header, every column, times as RFC 3339 UTC beside the nanoseconds."""
    names = ("start", "end", *COLUMNS)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    for row in rows:
        doc = row_document(row)
        doc["status"] = "|".join(doc["status"])
        writer.writerow(["" if doc[name] is None else doc[name] for name in names])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue()


def who_line(match: WhoMatch) -> str:
    """One `who` answer: role, inside endpoint, peer, times, bytes, process."""
    row = match.row
    inside = endpoint(*match.inside)
    if match.role == "dnat":
        peer = "from " + endpoint(row.orig_src, row.orig_sport)
        public = endpoint(row.orig_dst, row.orig_dport)
    else:
        peer = "to " + endpoint(row.orig_dst, row.orig_dport)
        public = endpoint(row.reply_dst, row.reply_dport) if match.role == "snat" else inside
    size = byte_count(row)
    parts = [f"{match.role:5}", f"inside {inside}", f"as {public}", peer,
             proto_name(row.proto), f"{iso_utc(row.start_ns)} .. {end_text(row)}",
             f"({duration_text(row)})", "" if size is None else f"{size} bytes",
             f"netns {row.netns}" if row.netns else "", _process_text(row)]
    return "  ".join(part for part in parts if part)


def who_document(match: WhoMatch) -> dict[str, Any]:
    """A `who` answer as JSON: the role, the inside endpoint, and the whole flow."""
    address, port = match.inside
    return {"role": match.role, "inside": {"address": address, "port": port},
            "flow": row_document(match.row)}

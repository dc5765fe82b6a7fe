"""An inventory dump as text: an aligned table, one JSON document, or CSV. Pure, no I/O."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from conntrail.formats.timefmt import iso_utc
from conntrail.inventory.model import ANY_FAMILY, Direction, InventoryEntry
from conntrail.model import AF_INET, AF_INET6, proto_name

_FAMILY_SUFFIX = {AF_INET: "v4", AF_INET6: "v6", ANY_FAMILY: ""}
_FAMILY_NAMES = {AF_INET: "ipv4", AF_INET6: "ipv6", ANY_FAMILY: "any"}
_DIRECTION_SHORT = {Direction.INBOUND: "in", Direction.OUTBOUND: "out",
                    Direction.FORWARDED: "fwd", Direction.LOCAL: "local"}
_PROTO_LABELS = {6: "TCP", 17: "UDP", 1: "ICMP", 58: "ICMP", 132: "SCTP", 136: "UDPLite",
                 33: "DCCP", 47: "GRE"}
TABLE_HEADER = ("PROTO", "DIR", "SOURCE", "DESTINATION", "PORT", "FLOWS", "CONFIRMED",
                "FIRST SEEN", "LAST SEEN", "PACKETS", "BYTES")
CSV_COLUMNS = ("netns", "direction", "family", "proto", "src", "sport", "dst", "dport",
               "icmp_type", "icmp_code", "flows", "confirmed", "first_seen", "last_seen",
               "packets", "bytes")


@dataclass(frozen=True, slots=True)
class DumpInfo:
    """What a dump says about itself."""

    taken_ns: int
    events: int  # events ingested in all
    lost: int = 0  # events the kernel dropped before we saw them: the inventory may miss flows
    reason: str = "exit"  # exit, signal, timer, history


def proto_label(entry: InventoryEntry) -> str:
    """conntracker's protocol label: TCPv4, UDPv6, ICMPv4; 'TCP' for merged families."""
    base = _PROTO_LABELS.get(entry.proto) or proto_name(entry.proto).upper()
    return base + _FAMILY_SUFFIX.get(entry.family, "")


def _endpoint(address: str, port: int | None) -> str:
    text = address or "any"
    if port is None:
        return text
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def port_text(entry: InventoryEntry) -> str:
    """The destination port, 'type/code' for ICMP, or '-'."""
    if entry.dport is not None:
        return str(entry.dport)
    if entry.icmp_type is not None:
        return f"{entry.icmp_type}/{entry.icmp_code}"
    return "-"


def _seconds(ns: int) -> str:
    return iso_utc(ns)[:19] + "Z"


def table_cells(entry: InventoryEntry) -> tuple[str, ...]:
    """One table line's cells."""
    return (proto_label(entry), _DIRECTION_SHORT[entry.direction],
            _endpoint(entry.src, entry.sport), _endpoint(entry.dst, None), port_text(entry),
            str(entry.flows), "yes" if entry.confirmed else "no", _seconds(entry.first_ns),
            _seconds(entry.last_ns), str(entry.packets), str(entry.bytes))


def summary_line(entries: Sequence[InventoryEntry], info: DumpInfo) -> str:
    """The comment line heading a text dump."""
    confirmed = sum(1 for entry in entries if entry.confirmed)
    line = (f"# conntrail inventory at {_seconds(info.taken_ns)} ({info.reason}): "
            f"{len(entries)} entries, {confirmed} confirmed, from {info.events} events")
    if info.lost:
        line += f"; {info.lost} events LOST in the kernel, flows may be missing"
    return line


def table_lines(entries: Sequence[InventoryEntry], info: DumpInfo) -> Iterator[str]:
    """A summary line, then per namespace an aligned table (columns sized on its rows)."""
    yield summary_line(entries, info)
    namespaces = sorted({entry.netns for entry in entries})
    for netns in namespaces:
        if len(namespaces) > 1 or netns:
            yield f"# netns {netns or '(host)'}"
        cells = [TABLE_HEADER] + [table_cells(e) for e in entries if e.netns == netns]
        widths = [max(len(line[i]) for line in cells) for i in range(len(TABLE_HEADER))]
        for line in cells:
            yield "  ".join(cell.ljust(width) for cell, width in zip(line, widths,
                                                                       strict=True)).rstrip()


def entry_document(entry: InventoryEntry) -> dict[str, Any]:
    """One entry as JSON, with ECS-style names where ECS has one."""
    source: dict[str, Any] = {"address": entry.src or None}
    if entry.sport is not None:
        source["port"] = entry.sport
    destination: dict[str, Any] = {"address": entry.dst or None}
    if entry.dport is not None:
        destination["port"] = entry.dport
    doc: dict[str, Any] = {
        "netns": entry.netns, "direction": entry.direction.label,
        "network": {"type": _FAMILY_NAMES.get(entry.family, str(entry.family)),
                    "transport": proto_name(entry.proto), "iana_number": str(entry.proto)},
        "source": source, "destination": destination,
        "flows": entry.flows, "confirmed": entry.confirmed,
        "first_seen": iso_utc(entry.first_ns), "last_seen": iso_utc(entry.last_ns),
        "packets": entry.packets, "bytes": entry.bytes,
    }
    if entry.icmp_type is not None:
        doc["icmp"] = {"type": entry.icmp_type, "code": entry.icmp_code}
    return doc


def json_document(entries: Sequence[InventoryEntry], info: DumpInfo) -> bytes:
    """The whole dump as one JSON document on one line."""
    return orjson.dumps({
        "inventory": {"taken": iso_utc(info.taken_ns), "reason": info.reason,
                      "entries": len(entries), "events": info.events, "lost": info.lost},
        "entries": [entry_document(entry) for entry in entries],
    }, option=orjson.OPT_APPEND_NEWLINE)


def csv_text(entries: Sequence[InventoryEntry]) -> str:
    """CSV with a header; times RFC 3339 UTC."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for e in entries:
        writer.writerow([e.netns, e.direction.label, _FAMILY_NAMES.get(e.family, e.family),
                         proto_name(e.proto), e.src, _blank(e.sport), e.dst, _blank(e.dport),
                         _blank(e.icmp_type), _blank(e.icmp_code), e.flows,
                         "yes" if e.confirmed else "no", iso_utc(e.first_ns),
                         iso_utc(e.last_ns), e.packets, e.bytes])
    return buffer.getvalue()


def _blank(value: int | None) -> str:
    return "" if value is None else str(value)

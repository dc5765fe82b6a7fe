"""Text lines from templates, in the spirit of conntrack-logger: `{ts}: {ev.proto} …`."""

from __future__ import annotations

import string
from collections.abc import Callable

from conntrail.errors import ConfigError
from conntrail.formats import timefmt
from conntrail.formats.fields import ALIASES, FIELDS
from conntrail.model import (
    AF_INET,
    AF_INET6,
    Counters,
    EventKind,
    Flow,
    FlowEvent,
    FlowTuple,
    LossNotice,
    Record,
    TableSnapshot,
)

DEFAULT_TEMPLATE = "{ts}: {family_proto} {orig} :: {event}{details}{who}"
DEFAULT_TS = "iso"

Piece = Callable[[FlowEvent], str]


def _literal(text: str) -> Piece:
    return lambda _event: text


def _field_piece(name: str, spec: str, conversion: str | None, ts_format: str) -> Piece:
    key = ALIASES.get(name, name)
    if key not in FIELDS:
        raise ConfigError("--format", f"unknown field {{{name}}}; known: "
                          + ", ".join(sorted(FIELDS)))
    getter = FIELDS[key][0]
    if key == "ts":
        return lambda event: format(timefmt.render(event.time_ns, ts_format), spec)
    if conversion == "r":
        return lambda event: format(repr(getter(event)), spec)
    return lambda event: format(getter(event), spec)


def compile_template(template: str, ts_format: str = DEFAULT_TS) -> Callable[[FlowEvent], str]:
    """Compile once into a list of pieces; unknown fields are a ConfigError naming them."""
    pieces: list[Piece] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError("--format", f"invalid template: {exc}") from exc
    for literal, name, spec, conversion in parsed:
        if literal:
            pieces.append(_literal(literal))
        if name is not None:
            pieces.append(_field_piece(name, spec or "", conversion, ts_format))
    _check_ts(ts_format)

    def line(event: FlowEvent) -> str:
        return "".join([piece(event) for piece in pieces])

    _check_renders(line)
    return line


def _check_renders(line: Callable[[FlowEvent], str]) -> None:
    """Render sample events now, so a bad format spec (`{sport:d}` meets an ICMP flow's
    missing port) is a ConfigError at start, not a failure on live traffic."""
    for sample in _SAMPLES:
        try:
            line(sample)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ConfigError("--format", f"cannot render a {sample.flow.orig.proto_name} "
                              f"flow: {exc}") from exc


_SAMPLES = (
    FlowEvent(EventKind.NEW, Flow(orig=FlowTuple(AF_INET, 1, "198.18.0.1", "198.18.0.2",
                                                 icmp_type=8, icmp_code=0, icmp_id=1))),
    FlowEvent(EventKind.DESTROY, Flow(
        orig=FlowTuple(AF_INET6, 6, "::", "::", 1, 2),
        reply=FlowTuple(AF_INET6, 6, "::", "::", 2, 1),
        proto_state=3, mark=1, zone=1, labels=1, ct_id=1, timeout=1, start_ns=1, stop_ns=2,
        counters_orig=Counters(1, 1), counters_reply=Counters(1, 1)), "ns", 1),
)


def _check_ts(ts_format: str) -> None:
    try:
        timefmt.render(0, ts_format)
    except (ValueError, TypeError) as exc:
        raise ConfigError("--format-ts", f"invalid time format {ts_format!r}: {exc}") from exc


class TextFormat:
    """A Formatter for text lines (one per record, newline-terminated)."""

    def __init__(self, template: str = DEFAULT_TEMPLATE, ts_format: str = DEFAULT_TS) -> None:
        self._line = compile_template(template, ts_format)
        self._ts_format = ts_format

    def __call__(self, record: Record) -> bytes:
        if isinstance(record, TableSnapshot):
            return b""  # a mark for stateful consumers (history), nothing to print
        if isinstance(record, LossNotice):
            count = "some" if record.lost is None else str(record.lost)
            when = timefmt.render(record.received_ns, self._ts_format)
            where = f" in netns {record.netns}" if record.netns else ""
            return f"{when}: !! lost {count} events{where} ({record.reason}); resync " \
                   "dump follows\n".encode()
        return (self._line(record) + "\n").encode()

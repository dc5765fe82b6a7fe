"""Compiled per-layout decoders for ctnetlink messages: the hot path of `decode_datagram`.

Events of one kind of flow (say, UDP over IPv4 through SNAT, NEW) share one exact attribute
layout: same attributes, same lengths, same order; only the values differ. The first message
of a layout is decoded by the generic walker; then a template is compiled for it:

- one native-order `struct` that reads every attribute header (its result must equal the
  layout's signature, so a template can only ever apply to its exact layout), and
- one big-endian `struct` that reads every value in a single call, and
- a generated function that builds the FlowEvent from those values.

Measured on this VM for a UDP SNAT NEW event: 1.2 µs against 3.8 µs for the walker.
Layouts with attributes the templates do not model (helper, security context, malformed
lengths) never get a template: the walker handles them, and raises where it must.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from conntrail.model import (
    AF_INET,
    AF_INET6,
    Counters,
    CtStatus,
    EventKind,
    Flow,
    FlowEvent,
    FlowTuple,
)

Builder = Callable[[tuple[object, ...], EventKind, str, int], FlowEvent]

_NESTED_TYPES = 0x3FFF
_UNMODELLED = object()  # an attribute that forbids a template (strings, …)


@dataclass(frozen=True, slots=True)
class _Leaf:
    code: str  # struct code read in network order
    name: str
    exact: bool = False  # the payload must be exactly this size (else the walker decodes)


@dataclass(frozen=True, slots=True)
class _Nest:
    members: Mapping[int, object]  # attribute type → _Leaf, _Nest or _UNMODELLED
    name: str


_PROTO = {1: _Leaf("B", "num"), 2: _Leaf("H", "sport"), 3: _Leaf("H", "dport"),
          4: _Leaf("H", "icmp_id"), 5: _Leaf("B", "icmp_type"), 6: _Leaf("B", "icmp_code"),
          7: _Leaf("H", "icmp_id"), 8: _Leaf("B", "icmp_type"), 9: _Leaf("B", "icmp_code")}
_IP = {1: _Leaf("4s", "src4"), 2: _Leaf("4s", "dst4"), 3: _Leaf("16s", "src6"),
       4: _Leaf("16s", "dst6")}
_TUPLE = {1: _Nest(_IP, "ip"), 2: _Nest(_PROTO, "proto"), 3: _Leaf("H", "zone")}
_COUNTERS = {1: _Leaf("Q", "packets"), 2: _Leaf("Q", "bytes"), 3: _Leaf("I", "packets"),
             4: _Leaf("I", "bytes")}
_STATE = {1: _Leaf("B", "state")}
_TOP: dict[int, object] = {
    1: _Nest(_TUPLE, "orig"), 2: _Nest(_TUPLE, "reply"), 3: _Leaf("I", "status"),
    4: _Nest({1: _Nest(_STATE, "tcp"), 2: _Nest(_STATE, "dccp"), 3: _Nest(_STATE, "sctp")},
             "protoinfo"),
    5: _UNMODELLED, 7: _Leaf("I", "timeout"), 8: _Leaf("I", "mark"),
    9: _Nest(_COUNTERS, "counters_orig"), 10: _Nest(_COUNTERS, "counters_reply"),
    11: _Leaf("I", "use"), 12: _Leaf("I", "ct_id"), 18: _Leaf("H", "zone"),
    19: _UNMODELLED, 20: _Nest({1: _Leaf("Q", "start_ns"), 2: _Leaf("Q", "stop_ns")}, "ts"),
    22: _Leaf("16s", "labels", exact=True), 27: _Leaf("Q", "event_ns"),
}


@dataclass
class _Layout:
    """What a walk over one message learned: both struct formats and where each value lies."""

    native: list[str] = field(default_factory=list)
    big: list[str] = field(default_factory=list)
    signature: list[int] = field(default_factory=list)
    values: dict[str, int] = field(default_factory=dict)  # dotted path → index in big tuple
    order: list[str] = field(default_factory=list)  # leaf paths in message order
    nests: set[str] = field(default_factory=set)  # top-level nests present (even if empty)
    count: int = 0  # values the big struct yields so far


class _NotModelledError(Exception):
    """This layout is not modelled; the walker decodes it."""


def _walk(data: bytes, start: int, end: int, members: Mapping[int, object],
          path: str, layout: _Layout) -> None:
    offset = start
    while offset < end:
        if end - offset < 4:
            raise _NotModelledError
        length, attr_type = struct.unpack_from("=HH", data, offset)
        padded = min((length + 3) & ~3, end - offset)
        if length < 4 or offset + length > end:
            raise _NotModelledError
        layout.native.append("HH")
        layout.big.append("4x")
        layout.signature += (length, attr_type)
        spec = members.get(attr_type & _NESTED_TYPES)
        if spec is _UNMODELLED:
            raise _NotModelledError
        if isinstance(spec, _Nest) and not path:
            if spec.name in layout.nests:
                raise _NotModelledError  # a repeated nest: the walker's rules decide
            layout.nests.add(spec.name)
        _payload(data, offset + 4, offset + length, padded - length, spec, path, layout)
        offset += padded


def _payload(data: bytes, start: int, end: int, pad: int, spec: object, path: str,
             layout: _Layout) -> None:
    size = end - start
    if isinstance(spec, _Nest):
        _walk(data, start, end, spec.members, f"{path}{spec.name}.", layout)
        _skip(layout, pad)
    elif isinstance(spec, _Leaf):
        need = struct.calcsize("!" + spec.code)
        if size < need or (spec.exact and size != need):
            raise _NotModelledError
        layout.native.append(f"{size + pad}x")
        layout.big.append(f"{spec.code}{size - need + pad}x")
        name = path + spec.name
        if name in layout.values or (name.startswith("protoinfo.") and any(
                key.startswith("protoinfo.") for key in layout.values)):
            raise _NotModelledError  # repeated values: the walker's rules decide
        layout.values[name] = layout.count
        layout.order.append(name)
        layout.count += 1
    else:
        _skip(layout, size + pad)


def _skip(layout: _Layout, size: int) -> None:
    if size:
        layout.native.append(f"{size}x")
        layout.big.append(f"{size}x")


# --- code generation -------------------------------------------------------------------------

def _tuple_expr(layout: _Layout, prefix: str) -> str:
    v = layout.values
    has4 = f"{prefix}ip.src4" in v or f"{prefix}ip.dst4" in v
    has6 = f"{prefix}ip.src6" in v or f"{prefix}ip.dst6" in v
    if has4 == has6:
        raise _NotModelledError  # no family, or mixed: the walker decides
    suffix, family, name = ("4", AF_INET, "_v4") if has4 else ("6", AF_INET6, "_v6")
    src, dst, num = (f"{prefix}ip.src{suffix}", f"{prefix}ip.dst{suffix}", f"{prefix}proto.num")
    if src not in v or dst not in v or num not in v:
        raise _NotModelledError

    def opt(leaf: str) -> str:
        key = f"{prefix}{leaf}"
        return f"b[{v[key]}]" if key in v else "None"

    fields = [str(family), f"b[{v[num]}]", f"{name}(b[{v[src]}])", f"{name}(b[{v[dst]}])",
              opt("proto.sport"), opt("proto.dport"), opt("proto.icmp_type"),
              opt("proto.icmp_code"), opt("proto.icmp_id"), opt("zone")]
    return f"_new(FlowTuple, ({', '.join(fields)}))"


def _counters_expr(layout: _Layout, prefix: str) -> str:
    if prefix[:-1] not in layout.nests:
        return "None"
    packets = f"b[{layout.values[prefix + 'packets']}]" if prefix + "packets" in layout.values \
        else "0"
    octets = f"b[{layout.values[prefix + 'bytes']}]" if prefix + "bytes" in layout.values \
        else "0"
    return f"_new(Counters, ({packets}, {octets}))"


def _flow_exprs(layout: _Layout) -> dict[str, str]:
    v = layout.values

    def leaf(name: str) -> str:
        return f"b[{v[name]}]" if name in v else "None"

    states = [name for name in layout.order if name.startswith("protoinfo.")]
    exprs = {
        "orig": _tuple_expr(layout, "orig."),
        "reply": _tuple_expr(layout, "reply.") if "reply" in layout.nests else "None",
        "status": f"_status(b[{v['status']}])" if "status" in v else "_NO_STATUS",
        "proto_state": f"b[{v[states[0]]}]" if states else "None",
        "labels": f"_labels(b[{v['labels']}])" if "labels" in v else "None",
        "counters_orig": _counters_expr(layout, "counters_orig."),
        "counters_reply": _counters_expr(layout, "counters_reply."),
    }
    for name in ("timeout", "mark", "zone", "ct_id", "use", "event_ns"):
        exprs[name] = leaf(name)
    exprs["start_ns"], exprs["stop_ns"] = leaf("ts.start_ns"), leaf("ts.stop_ns")
    exprs["secctx"] = exprs["helper"] = "None"
    return exprs


def _labels(raw: bytes) -> int:
    return int.from_bytes(raw, sys.byteorder)


@dataclass(frozen=True, slots=True)
class Template:
    """One compiled layout."""

    signature: tuple[int, ...]
    headers: Callable[[bytes, int], tuple[int, ...]]
    values: Callable[[bytes, int], tuple[object, ...]]
    build: Builder
    source: str  # the generated code, for debugging and tests


def compile_template(data: bytes, start: int, end: int,
                     helpers: dict[str, object]) -> Template | None:
    """A template for the message attributes in data[start:end], or None if not modelled.

    `helpers` supplies the cached converters the generated code calls (`_v4`, `_v6`,
    `_status`), so templates and the walker share caches and give identical values.
    """
    layout = _Layout()
    try:
        _walk(data, start, end, _TOP, "", layout)
        exprs = _flow_exprs(layout)
    except _NotModelledError:
        return None
    body = ", ".join(exprs[name] for name in Flow._fields)
    source = ("def build(b, kind, netns, received):\n"
              f"    return _new(FlowEvent, (kind, _new(Flow, ({body},)), netns, received, None))\n")
    namespace: dict[str, object] = {
        "_new": tuple.__new__, "Flow": Flow, "FlowEvent": FlowEvent, "FlowTuple": FlowTuple,
        "Counters": Counters, "_labels": _labels, "_NO_STATUS": CtStatus(0), **helpers}
    exec(compile(source, "<conntrail template>", "exec"), namespace)  # noqa: S102 - our code
    headers = struct.Struct("=" + "".join(layout.native))
    values = struct.Struct("!" + "".join(layout.big))
    return Template(tuple(layout.signature), headers.unpack_from, values.unpack_from,
                    namespace["build"], source)  # type: ignore[arg-type]


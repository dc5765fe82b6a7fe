"""The filter vocabulary: fields (kind, getters, help) with their aliases, and shorthands."""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from conntrail.filters.ast import Compare, Expr, Flags, Literal, Not, Value
from conntrail.filters.render import format_expr
from conntrail.model import AF_INET, AF_INET6, PROTO_NUMBERS, CtStatus, EventKind, FlowEvent

Getter = Callable[[FlowEvent], Any]


class Kind(enum.Enum):
    """The value type of a field, which decides value parsing and allowed operators."""

    INT = enum.auto()
    PROTO = enum.auto()
    FAMILY = enum.auto()
    ADDR = enum.auto()
    STATE = enum.auto()
    TEXT = enum.auto()  # a name or text, * and ? globs
    EVENT = enum.auto()
    NAT = enum.auto()
    STATUS = enum.auto()


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One filterable field: its kind, its getter(s) (any may match) and its help line."""

    kind: Kind
    getters: tuple[Getter, ...]
    doc: str
    unit: str = ""  # how an out-of-range number is named: "port 70000 out of range"
    maximum: int = 0


_U8, _U16, _U32, _U64 = 0xFF, 0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF

# ---------------------------------------------------------------------------------------------
# Getters: how each field is read from an event
# ---------------------------------------------------------------------------------------------


def _who(attr: str) -> Getter:
    """Getter of an attribution attribute, None when the event has no attribution."""
    get = operator.attrgetter(attr)

    def getter(event: FlowEvent) -> Any:
        who = event.who
        return None if who is None else get(who)

    return getter


def _process_name(event: FlowEvent) -> str | None:
    """The executable's base name (ECS process.name), else the kernel's comm."""
    who = event.who
    if who is None:
        return None
    if who.exe:
        return who.exe.rsplit("/", 1)[-1]
    return who.comm


def _orig(attr: str) -> Getter:
    """Getter of an original-tuple attribute (attrgetter runs in C)."""
    return operator.attrgetter(f"flow.orig.{attr}")


def _reply(attr: str) -> Getter:
    """Getter of a reply-tuple attribute, None when the flow has no reply tuple."""
    get = operator.attrgetter(attr)

    def getter(event: FlowEvent) -> Any:
        reply = event.flow.reply
        return None if reply is None else get(reply)

    return getter


def _counter(attr: str) -> Getter:
    """Getter summing a counter over both directions, None when there are no counters."""
    get = operator.attrgetter(attr)

    def getter(event: FlowEvent) -> int | None:
        orig, reply = event.flow.counters_orig, event.flow.counters_reply
        if orig is None and reply is None:
            return None
        return (0 if orig is None else get(orig)) + (0 if reply is None else get(reply))

    return getter


def _zone(event: FlowEvent) -> int | None:
    """The flow's zone, falling back to the original tuple's zone."""
    zone = event.flow.zone
    return event.flow.orig.zone if zone is None else zone


# Same mapping as Flow.nat_type, but int() first: the property's `status & mask` goes through
# IntFlag.__and__ (~0.5 µs, measured ~0.6 µs per call against ~0.1 µs here) because the codec
# hands out CtStatus members, too slow for the hot path.
_NAT_BITS = int(CtStatus.SRC_NAT | CtStatus.DST_NAT)
_NAT_TYPES = {0: "none", int(CtStatus.SRC_NAT): "snat", int(CtStatus.DST_NAT): "dnat"}
_NAT_TYPES[_NAT_BITS] = "both"


def _nat_type(event: FlowEvent) -> str:
    """'snat', 'dnat', 'both' or 'none', like Flow.nat_type."""
    return _NAT_TYPES[int(event.flow.status) & _NAT_BITS]


# Flow.state_name costs ~0.4 µs (enum lookup); (proto, state) pairs are few, so cache them.
_STATE_CACHE: dict[tuple[int, int | None], str | None] = {}
_STATE_CACHE_MAX = 1024


def _state(event: FlowEvent) -> str | None:
    """Flow.state_name, cached by (protocol, state number)."""
    flow = event.flow
    key = (flow.orig.proto, flow.proto_state)
    try:
        return _STATE_CACHE[key]
    except KeyError:
        if len(_STATE_CACHE) >= _STATE_CACHE_MAX:
            _STATE_CACHE.clear()
        name = _STATE_CACHE[key] = flow.state_name
        return name


# ---------------------------------------------------------------------------------------------
# Fields
# ---------------------------------------------------------------------------------------------

SPECS: dict[str, FieldSpec] = {
    "proto": FieldSpec(
        Kind.PROTO,
        (_orig("proto"),),
        "protocol name or number (tcp, udp, 6, ...)",
        "protocol",
        _U8,
    ),
    "family": FieldSpec(Kind.FAMILY, (_orig("family"),), "address family: ipv4/ipv6 or 4/6"),
    "src": FieldSpec(Kind.ADDR, (_orig("src"),), "original source address (address or CIDR)"),
    "dst": FieldSpec(Kind.ADDR, (_orig("dst"),), "original destination address"),
    "sport": FieldSpec(Kind.INT, (_orig("sport"),), "original source port", "port", _U16),
    "dport": FieldSpec(Kind.INT, (_orig("dport"),), "original destination port", "port", _U16),
    "reply.src": FieldSpec(Kind.ADDR, (_reply("src"),), "reply source address"),
    "reply.dst": FieldSpec(Kind.ADDR, (_reply("dst"),), "reply destination address"),
    "reply.sport": FieldSpec(Kind.INT, (_reply("sport"),), "reply source port", "port", _U16),
    "reply.dport": FieldSpec(Kind.INT, (_reply("dport"),), "reply destination port", "port", _U16),
    "addr": FieldSpec(
        Kind.ADDR, (_orig("src"), _orig("dst")), "either original address (src or dst)"
    ),
    "port": FieldSpec(
        Kind.INT,
        (_orig("sport"), _orig("dport")),
        "either original port (sport or dport)",
        "port",
        _U16,
    ),
    "icmp.type": FieldSpec(Kind.INT, (_orig("icmp_type"),), "ICMP type", "ICMP type", _U8),
    "icmp.code": FieldSpec(Kind.INT, (_orig("icmp_code"),), "ICMP code", "ICMP code", _U8),
    "icmp.id": FieldSpec(Kind.INT, (_orig("icmp_id"),), "ICMP identifier", "ICMP id", _U16),
    "state": FieldSpec(
        Kind.STATE, (_state,), "protocol state, e.g. ESTABLISHED (TCP, SCTP, DCCP; globs ok)"
    ),
    "status": FieldSpec(
        Kind.STATUS,
        (operator.attrgetter("flow.status"),),
        "status flags, all must be set: status has {SEEN_REPLY, ASSURED}",
    ),
    "mark": FieldSpec(
        Kind.INT,
        (operator.attrgetter("flow.mark"),),
        "connection mark; mark/MASK compares the masked mark",
        "mark",
        _U32,
    ),
    "zone": FieldSpec(Kind.INT, (_zone,), "conntrack zone", "zone", _U16),
    "netns": FieldSpec(
        Kind.TEXT, (operator.attrgetter("netns"),), "network namespace name (* and ? glob)"
    ),
    "event": FieldSpec(
        Kind.EVENT, (operator.attrgetter("kind"),), "event kind: new, update, destroy, dump"
    ),
    "nat": FieldSpec(Kind.NAT, (_nat_type,), "NAT type: snat, dnat, both, none"),
    "ct_id": FieldSpec(Kind.INT, (operator.attrgetter("flow.ct_id"),), "conntrack id", "id", _U32),
    "bytes": FieldSpec(
        Kind.INT,
        (_counter("bytes"),),
        "bytes, both directions (needs accounting)",
        "byte count",
        _U64,
    ),
    "packets": FieldSpec(
        Kind.INT,
        (_counter("packets"),),
        "packets, both directions (needs accounting)",
        "packet count",
        _U64,
    ),
    **{name: FieldSpec(Kind.INT, (_who(attr),), doc, unit, _U32)
       for name, attr, doc, unit in (
           ("process.pid", "pid", "pid of the process that opened the flow", "pid"),
           ("user.id", "uid", "uid of the socket's owner", "uid"),
           ("group.id", "gid", "gid of the socket's owner", "gid"))},
    **{name: FieldSpec(Kind.TEXT, (getter,), doc)
       for name, getter, doc in (
           ("process.name", _process_name, "program name: the executable's base name "
                                           "(globs ok)"),
           ("process.executable", _who("exe"), "executable path (globs ok)"),
           ("process.command_line", _who("cmdline"), "command line (globs ok)"),
           ("service", _who("unit"), "systemd unit or container id, e.g. nginx.service"),
           ("cgroup", _who("cgroup"), "cgroup v2 path, e.g. /system.slice/nginx.service"))},
}
ALIASES = {"host": "addr", "id": "ct_id", "pid": "process.pid", "uid": "user.id",
           "gid": "group.id", "exe": "process.executable", "cmdline": "process.command_line",
           "unit": "service"}

FIELDS: dict[str, str] = {name: spec.doc for name, spec in SPECS.items()}
FIELDS.update({alias: f"alias of {target}" for alias, target in ALIASES.items()})

# ---------------------------------------------------------------------------------------------
# Shorthands: bare words that expand to a comparison
# ---------------------------------------------------------------------------------------------


def _eq(field: str, *values: Value) -> Callable[[int], Expr]:
    """A shorthand expanding to `field == values`."""
    return lambda pos: Compare(field, "==", values, position=pos)


def _has(flag: CtStatus) -> Callable[[int], Expr]:
    """A shorthand expanding to `status has flag`."""
    return lambda pos: Compare("status", "has", (Flags(flag),), position=pos)


SHORTHAND_FACTORIES: dict[str, Callable[[int], Expr]] = {
    **{name: _eq("proto", Literal(number)) for name, number in PROTO_NUMBERS.items()},
    "ipv4": _eq("family", Literal(AF_INET)),
    "ipv6": _eq("family", Literal(AF_INET6)),
    **{kind.label: _eq("event", Literal(kind)) for kind in EventKind},
    "nat": lambda pos: Compare("nat", "!=", (Literal("none"),), position=pos),
    "snat": _eq("nat", Literal("snat"), Literal("both")),
    "dnat": _eq("nat", Literal("dnat"), Literal("both")),
    "assured": _has(CtStatus.ASSURED),
    "seen_reply": _has(CtStatus.SEEN_REPLY),
    "confirmed": _has(CtStatus.CONFIRMED),
    "src_nat": _has(CtStatus.SRC_NAT),
    "dst_nat": _has(CtStatus.DST_NAT),
    "unreplied": lambda pos: Not(_has(CtStatus.SEEN_REPLY)(pos)),
}

SHORTHANDS: dict[str, str] = {
    name: format_expr(factory(0)) for name, factory in SHORTHAND_FACTORIES.items()
}

"""JSON lines: ECS field names for flow events, and a lossless 'record' layout for goldens.

ECS mapping: `source.*`/`destination.*` are the original tuple; under SNAT `source.nat.*` is
the translated source (the reply tuple's destination), under DNAT `destination.nat.*` is the
real destination (the reply tuple's source): together they carry both tuples. What ECS has
no field for goes under `conntrail.*` (conntrack id, status, state, mark, zone, ICMP, netns).
"""

from __future__ import annotations

from typing import Any

import orjson

from conntrail.formats.timefmt import iso_utc
from conntrail.model import (
    FAMILY_NAMES,
    Attribution,
    Counters,
    EventKind,
    Flow,
    FlowEvent,
    FlowTuple,
    LossNotice,
    Record,
    TableSnapshot,
    proto_name,
    status_names,
)

_EVENT_TYPES = {"new": ["connection", "start"], "destroy": ["connection", "end"],
                "update": ["connection", "change"], "dump": ["connection", "info"]}
_ECS_TRANSPORT = {58: "ipv6-icmp"}


_NETWORK_CACHE: dict[tuple[int, int], dict[str, str]] = {}
_CATEGORY = ["network"]  # shared, never mutated: only serialised
_ACTIONS = {kind: (kind.label, _EVENT_TYPES[kind.label]) for kind in EventKind}


def _network_base(family: int, proto: int) -> dict[str, str]:
    """network.type/transport/iana_number for a (family, proto), built once per pair."""
    base = _NETWORK_CACHE.get((family, proto))
    if base is None:
        base = {"type": FAMILY_NAMES.get(family, str(family)),
                "transport": _ECS_TRANSPORT.get(proto, proto_name(proto)),
                "iana_number": str(proto)}
        _NETWORK_CACHE[(family, proto)] = base
    return base


def _endpoint(address: str, port: int | None, counters: Counters | None) -> dict[str, Any]:
    doc: dict[str, Any] = {"ip": address} if port is None else {"ip": address, "port": port}
    if counters is not None:
        doc["bytes"] = counters.bytes
        doc["packets"] = counters.packets
    return doc


def _event_doc(kind: EventKind, flow: Flow) -> dict[str, Any]:
    action, types = _ACTIONS[kind]
    doc: dict[str, Any] = {"kind": "event", "category": _CATEGORY, "type": types,
                           "action": action}
    if flow.start_ns:
        doc["start"] = iso_utc(flow.start_ns)
        if flow.stop_ns:
            doc["end"] = iso_utc(flow.stop_ns)
            doc["duration"] = flow.stop_ns - flow.start_ns
    return doc


def _conntrack_doc(flow: Flow) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": flow.ct_id, "status": status_names(flow.status),
                           "nat": flow.nat_type}
    if flow.proto_state is not None:
        doc["state"] = flow.state_name
    if flow.mark is not None:
        doc["mark"] = flow.mark
    if flow.zone is not None:
        doc["zone"] = flow.zone
    if flow.timeout is not None:
        doc["timeout"] = flow.timeout
    if flow.labels is not None:
        doc["labels"] = f"{flow.labels:#x}"
    if flow.helper is not None:
        doc["helper"] = flow.helper
    if flow.secctx is not None:
        doc["secctx"] = flow.secctx
    return doc


def _icmp_doc(orig: FlowTuple, reply: FlowTuple | None) -> dict[str, Any]:
    doc: dict[str, Any] = {"type": orig.icmp_type, "code": orig.icmp_code, "id": orig.icmp_id}
    if reply is not None:
        doc["reply_type"] = reply.icmp_type
    return doc


def ecs_document(event: FlowEvent) -> dict[str, Any]:
    """The ECS document of one flow event (per-event hot path: kept flat on purpose)."""
    flow = event.flow
    orig, reply = flow.orig, flow.reply
    source = _endpoint(orig.src, orig.sport, flow.counters_orig)
    destination = _endpoint(orig.dst, orig.dport, flow.counters_reply)
    network: dict[str, Any] = _network_base(orig.family, orig.proto)
    if reply is not None:
        if reply.dst != orig.src or reply.dport != orig.sport:
            source["nat"] = _endpoint(reply.dst, reply.dport, None)
        if reply.src != orig.dst or reply.sport != orig.dport:
            destination["nat"] = _endpoint(reply.src, reply.sport, None)
    if flow.counters_orig is not None and flow.counters_reply is not None:
        network = {**network,
                   "bytes": flow.counters_orig.bytes + flow.counters_reply.bytes,
                   "packets": flow.counters_orig.packets + flow.counters_reply.packets}
    conntrail: dict[str, Any] = {"ct": _conntrack_doc(flow)}
    if orig.icmp_type is not None:
        conntrail["icmp"] = _icmp_doc(orig, reply)
    if event.netns:
        conntrail["netns"] = event.netns
    doc = {"@timestamp": iso_utc(event.time_ns), "event": _event_doc(event.kind, flow),
           "network": network, "source": source, "destination": destination,
           "conntrail": conntrail}
    if event.who is not None:
        _add_attribution(doc, conntrail, event.who)
    return doc


def _add_attribution(doc: dict[str, Any], conntrail: dict[str, Any], who: Attribution) -> None:
    """ECS process.*, user.*, group.*, and conntrail.attribution (method, confidence,
    cgroup, unit). ECS keeps user and group ids as strings."""
    process: dict[str, Any] = {key: value for key, value in (
        ("pid", who.pid), ("name", who.exe.rsplit("/", 1)[-1] if who.exe else who.comm),
        ("executable", who.exe), ("command_line", who.cmdline),
        ("start", None if who.started_ns is None else iso_utc(who.started_ns)))
        if value is not None}
    if who.ppid is not None:
        process["parent"] = {"pid": who.ppid}
    if process:
        doc["process"] = process
    if who.uid is not None:
        doc["user"] = {"id": str(who.uid)}
    if who.gid is not None:
        doc["group"] = {"id": str(who.gid)}
    conntrail["attribution"] = {key: value for key, value in (
        ("method", who.method), ("confidence", who.confidence.label),
        ("cgroup", who.cgroup), ("unit", who.unit)) if value is not None}


def loss_document(notice: LossNotice) -> dict[str, Any]:
    """The ECS document announcing lost events."""
    doc: dict[str, Any] = {"@timestamp": iso_utc(notice.received_ns),
                           "event": {"kind": "alert", "action": "events-lost",
                                     "reason": notice.reason},
                           "conntrail": {"lost": notice.lost}}
    if notice.netns:
        doc["conntrail"]["netns"] = notice.netns
    return doc


def record_document(event: FlowEvent) -> dict[str, Any]:
    """Every decoded field, names as in the model: the golden-test and `decode` layout."""
    flow = event.flow
    doc: dict[str, Any] = {"kind": event.kind.label, "netns": event.netns,
                           "received_ns": event.received_ns}
    for name in ("proto_state", "timeout", "mark", "zone", "ct_id", "use",
                 "start_ns", "stop_ns", "event_ns", "secctx", "helper"):
        doc[name] = getattr(flow, name)
    # 128-bit bitmap: hex text, as JSON integers stop at 64 bits in orjson (and 53 in JS).
    doc["labels"] = None if flow.labels is None else f"{flow.labels:#x}"
    doc["status"] = list(status_names(flow.status))
    doc["orig"] = _full_tuple(flow.orig)
    doc["reply"] = None if flow.reply is None else _full_tuple(flow.reply)
    for name in ("counters_orig", "counters_reply"):
        counters: Counters | None = getattr(flow, name)
        doc[name] = None if counters is None else {"packets": counters.packets,
                                                   "bytes": counters.bytes}
    return doc


def _full_tuple(t: FlowTuple) -> dict[str, Any]:
    return t._asdict()


class JsonFormat:
    """A Formatter for one ECS JSON object per line (or the lossless record layout)."""

    def __init__(self, layout: str = "ecs") -> None:
        self._document = record_document if layout == "record" else ecs_document

    def __call__(self, record: Record) -> bytes:
        if isinstance(record, TableSnapshot):
            return b""  # a mark for stateful consumers (history), nothing to print
        if isinstance(record, LossNotice):
            return orjson.dumps(loss_document(record), option=orjson.OPT_APPEND_NEWLINE)
        return orjson.dumps(self._document(record), option=orjson.OPT_APPEND_NEWLINE)

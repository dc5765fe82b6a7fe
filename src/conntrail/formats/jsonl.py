"""JSON lines: ECS field names for flow events, and a lossless 'record' layout for goldens.

ECS mapping: `source.*`/`destination.*` are the original tuple; under SNAT `source.nat.*` is
the translated source (the reply tuple's destination), under DNAT `destination.nat.*` is the
real destination (the reply tuple's source). What ECS has no field for goes under
`conntrail.*`.
"""

from __future__ import annotations

from typing import Any

import orjson

from conntrail.formats.timefmt import iso_utc
from conntrail.model import Counters, CtStatus, FlowEvent, FlowTuple, LossNotice, Record

_EVENT_TYPES = {"new": ["connection", "start"], "destroy": ["connection", "end"],
                "update": ["connection", "change"], "dump": ["connection", "info"]}
_ECS_TRANSPORT = {58: "ipv6-icmp"}


def _status_names(status: CtStatus) -> list[str]:
    return [flag.name for flag in CtStatus if flag in status and flag.name]


def _endpoint(address: str, port: int | None, counters: Counters | None) -> dict[str, Any]:
    doc: dict[str, Any] = {"ip": address}
    if port is not None:
        doc["port"] = port
    if counters is not None:
        doc["bytes"] = counters.bytes
        doc["packets"] = counters.packets
    return doc


def _tuple_doc(t: FlowTuple) -> dict[str, Any]:
    doc: dict[str, Any] = {"src": t.src, "dst": t.dst}
    if t.sport is not None:
        doc["sport"] = t.sport
        doc["dport"] = t.dport
    if t.icmp_type is not None:
        doc["icmp"] = {"type": t.icmp_type, "code": t.icmp_code, "id": t.icmp_id}
    if t.zone is not None:
        doc["zone"] = t.zone
    return doc


def _network(event: FlowEvent) -> dict[str, Any]:
    flow = event.flow
    orig = flow.orig
    doc: dict[str, Any] = {
        "type": orig.family_name,
        "transport": _ECS_TRANSPORT.get(orig.proto, orig.proto_name),
        "iana_number": str(orig.proto),
    }
    if flow.counters_orig is not None and flow.counters_reply is not None:
        doc["bytes"] = flow.counters_orig.bytes + flow.counters_reply.bytes
        doc["packets"] = flow.counters_orig.packets + flow.counters_reply.packets
    return doc


def _event_doc(event: FlowEvent) -> dict[str, Any]:
    action = event.kind.label
    doc: dict[str, Any] = {"kind": "event", "category": ["network"],
                           "type": _EVENT_TYPES[action], "action": action}
    flow = event.flow
    if flow.start_ns:
        doc["start"] = iso_utc(flow.start_ns)
    if flow.stop_ns:
        doc["end"] = iso_utc(flow.stop_ns)
    if flow.duration_ns is not None:
        doc["duration"] = flow.duration_ns
    return doc


def _conntrack_doc(event: FlowEvent) -> dict[str, Any]:
    flow = event.flow
    doc: dict[str, Any] = {"status": _status_names(flow.status), "nat": flow.nat_type}
    optional = {"id": flow.ct_id, "state": flow.state_name, "mark": flow.mark,
                "zone": flow.zone, "timeout": flow.timeout, "use": flow.use,
                "labels": None if flow.labels is None else f"{flow.labels:#x}",
                "helper": flow.helper, "secctx": flow.secctx}
    doc.update({key: value for key, value in optional.items() if value is not None})
    doc["orig"] = _tuple_doc(flow.orig)
    if flow.reply is not None:
        doc["reply"] = _tuple_doc(flow.reply)
    return doc


def _nat(doc: dict[str, Any], address: str, port: int | None) -> None:
    doc["nat"] = {"ip": address} if port is None else {"ip": address, "port": port}


def ecs_document(event: FlowEvent) -> dict[str, Any]:
    """The ECS document of one flow event."""
    flow = event.flow
    orig, reply = flow.orig, flow.reply
    source = _endpoint(orig.src, orig.sport, flow.counters_orig)
    destination = _endpoint(orig.dst, orig.dport, flow.counters_reply)
    if reply is not None and (reply.dst != orig.src or reply.dport != orig.sport):
        _nat(source, reply.dst, reply.dport)
    if reply is not None and (reply.src != orig.dst or reply.sport != orig.dport):
        _nat(destination, reply.src, reply.sport)
    conntrail: dict[str, Any] = {"ct": _conntrack_doc(event)}
    if event.netns:
        conntrail["netns"] = event.netns
    return {"@timestamp": iso_utc(event.time_ns), "event": _event_doc(event),
            "network": _network(event), "source": source, "destination": destination,
            "conntrail": conntrail}


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
    for name in ("proto_state", "timeout", "mark", "zone", "labels", "ct_id", "use",
                 "start_ns", "stop_ns", "secctx", "helper"):
        doc[name] = getattr(flow, name)
    doc["status"] = _status_names(flow.status)
    doc["orig"] = _full_tuple(flow.orig)
    doc["reply"] = None if flow.reply is None else _full_tuple(flow.reply)
    for name in ("counters_orig", "counters_reply"):
        counters: Counters | None = getattr(flow, name)
        doc[name] = None if counters is None else {"packets": counters.packets,
                                                   "bytes": counters.bytes}
    return doc


def _full_tuple(t: FlowTuple) -> dict[str, Any]:
    return {name: getattr(t, name) for name in FlowTuple.__slots__}


class JsonFormat:
    """A Formatter for one ECS JSON object per line (or the lossless record layout)."""

    def __init__(self, layout: str = "ecs") -> None:
        self._document = record_document if layout == "record" else ecs_document

    def __call__(self, record: Record) -> bytes:
        if isinstance(record, LossNotice):
            return orjson.dumps(loss_document(record), option=orjson.OPT_APPEND_NEWLINE)
        return orjson.dumps(self._document(record), option=orjson.OPT_APPEND_NEWLINE)

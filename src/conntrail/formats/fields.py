"""Named fields of a flow event, for text templates: name → (getter, description).

Names follow the filter language where they overlap. conntrack-logger's template names
(`ev.proto`, `ev.src`, `ev.sport`, `ev.dst`, `ev.dport`) are accepted as aliases.
"""

from __future__ import annotations

from collections.abc import Callable

from conntrail.model import FlowEvent, FlowTuple, status_names

Getter = Callable[[FlowEvent], object]


def _opt(value: object) -> object:
    return "-" if value is None else value


def _endpoint(address: str, port: int | None) -> str:
    return address if port is None else f"{address}/{port}"


def _tuple_text(t: FlowTuple) -> str:
    """'src/sport > dst/dport', or for ICMP 'src > dst type=8 code=0 id=7'."""
    text = f"{_endpoint(t.src, t.sport)} > {_endpoint(t.dst, t.dport)}"
    if t.icmp_type is not None:
        text += f" type={t.icmp_type} code={t.icmp_code} id={t.icmp_id}"
    return text


def _counter_sum(event: FlowEvent, attr: str) -> object:
    flow = event.flow
    if flow.counters_orig is None and flow.counters_reply is None:
        return "-"
    total = 0
    for counters in (flow.counters_orig, flow.counters_reply):
        if counters is not None:
            total += getattr(counters, attr)
    return total


def _status(event: FlowEvent) -> str:
    return ",".join(status_names(event.flow.status)) or "-"


def _reply_field(attr: str) -> Getter:
    def get(event: FlowEvent) -> object:
        reply = event.flow.reply
        return "-" if reply is None else _opt(getattr(reply, attr))

    return get


FIELDS: dict[str, tuple[Getter, str]] = {
    "ts": (lambda e: e.time_ns, "event time (kernel stamp when known), per --format-ts"),
    "event": (lambda e: e.kind.label, "new, update, destroy or dump"),
    "family": (lambda e: e.flow.orig.family_name, "ipv4 or ipv6"),
    "proto": (lambda e: e.flow.orig.proto_name, "protocol keyword (tcp, udp, icmp …)"),
    "proto_num": (lambda e: e.flow.orig.proto, "protocol number"),
    "src": (lambda e: e.flow.orig.src, "original source address"),
    "dst": (lambda e: e.flow.orig.dst, "original destination address"),
    "sport": (lambda e: _opt(e.flow.orig.sport), "original source port (or GRE key)"),
    "dport": (lambda e: _opt(e.flow.orig.dport), "original destination port (or GRE key)"),
    "orig": (lambda e: _tuple_text(e.flow.orig), "original tuple as 'src/sport > dst/dport'"),
    "reply": (lambda e: "-" if e.flow.reply is None else _tuple_text(e.flow.reply),
              "reply tuple, same layout"),
    "reply.src": (_reply_field("src"), "reply source (the real server under DNAT)"),
    "reply.dst": (_reply_field("dst"), "reply destination (the public address under SNAT)"),
    "reply.sport": (_reply_field("sport"), "reply source port"),
    "reply.dport": (_reply_field("dport"), "reply destination port (SNAT port)"),
    "icmp.type": (lambda e: _opt(e.flow.orig.icmp_type), "ICMP/ICMPv6 type"),
    "icmp.code": (lambda e: _opt(e.flow.orig.icmp_code), "ICMP/ICMPv6 code"),
    "icmp.id": (lambda e: _opt(e.flow.orig.icmp_id), "ICMP/ICMPv6 echo id"),
    "state": (lambda e: _opt(e.flow.state_name), "TCP/SCTP/DCCP state"),
    "status": (_status, "status flags, comma-separated"),
    "nat": (lambda e: e.flow.nat_type, "snat, dnat, both or none"),
    "mark": (lambda e: _opt(e.flow.mark), "conntrack mark"),
    "zone": (lambda e: _opt(e.flow.zone), "conntrack zone"),
    "labels": (lambda e: _opt(e.flow.labels), "conntrack labels (integer bitmap)"),
    "id": (lambda e: _opt(e.flow.ct_id), "conntrack id"),
    "timeout": (lambda e: _opt(e.flow.timeout), "seconds before the entry expires"),
    "packets": (lambda e: _counter_sum(e, "packets"), "packets, both directions"),
    "bytes": (lambda e: _counter_sum(e, "bytes"), "bytes, both directions"),
    "start": (lambda e: e.flow.start_ns or "-", "kernel start time (ns since epoch)"),
    "stop": (lambda e: e.flow.stop_ns or "-", "kernel stop time (ns since epoch)"),
    "duration": (lambda e: _opt(None if e.flow.duration_ns is None
                                else round(e.flow.duration_ns / 1e9, 6)),
                 "flow lifetime in seconds (DESTROY with timestamps)"),
    "netns": (lambda e: e.netns or "-", "network namespace name"),
}

ALIASES: dict[str, str] = {
    "ev.src": "src", "ev.dst": "dst", "ev.sport": "sport", "ev.dport": "dport",
    "ev.proto": "family_proto",
}
FIELDS["family_proto"] = (lambda e: f"{e.flow.orig.family_name}/{e.flow.orig.proto_name}",
                          "'ipv4/tcp' style (conntrack-logger's ev.proto)")


def _details(event: FlowEvent) -> str:
    """The default line's tail: state, NAT with the reply tuple, mark, zone, counters, netns."""
    flow = event.flow
    parts = []
    if flow.proto_state is not None:
        parts.append(str(flow.state_name))
    if flow.is_nat and flow.reply is not None:
        parts.append(f"{flow.nat_type} reply {_tuple_text(flow.reply)}")
    if flow.mark:
        parts.append(f"mark={flow.mark:#x}")
    if flow.zone:
        parts.append(f"zone={flow.zone}")
    if flow.counters_orig is not None or flow.counters_reply is not None:
        packets, octets = _counter_sum(event, "packets"), _counter_sum(event, "bytes")
        parts.append(f"packets={packets} bytes={octets}")
    duration = flow.duration_ns
    if duration is not None:
        parts.append(f"duration={duration / 1e9:.3f}s")
    if event.netns:
        parts.append(f"netns={event.netns}")
    return " " + " ".join(parts) if parts else ""


FIELDS["details"] = (_details, "state, NAT type and reply tuple when NATed, mark, zone, "
                     "counters, duration, netns (only those present)")


def _who_field(attr: str) -> Getter:
    def get(event: FlowEvent) -> object:
        who = event.who
        return "-" if who is None else _opt(getattr(who, attr))

    return get


def _service(event: FlowEvent) -> object:
    """conntrack-logger's {info.service}: the cgroup path, else the unit."""
    who = event.who
    if who is None:
        return "-"
    return who.cgroup or who.unit or "-"


def _who_lines(event: FlowEvent) -> str:
    """conntrack-logger's second and third lines, when the flow is attributed:
    "\n\t{pid} {uid}:{gid} {service} ::\n\t{cmdline}"; nothing otherwise."""
    who = event.who
    if who is None or (who.uid is None and who.pid is None and who.cmdline is None):
        return ""
    return (f"\n\t{_opt(who.pid)} {_opt(who.uid)}:{_opt(who.gid)} "
            f"{printable(str(_service(event)))} ::"
            f"\n\t{printable(who.cmdline or who.comm or '-')}")


_CONTROL = {code: f"\\x{code:02x}" for code in (*range(32), 127)}
_CONTROL.update({ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"})


def printable(text: str) -> str:
    """Control characters escaped: a command line is the process's to choose, and a newline
    in it must not forge a line of our log."""
    return text.translate(_CONTROL) if not text.isprintable() else text


FIELDS.update({
    "pid": (_who_field("pid"), "pid of the process that opened the flow"),
    "uid": (_who_field("uid"), "uid of the socket's owner"),
    "gid": (_who_field("gid"), "gid of the socket's owner"),
    "comm": (_who_field("comm"), "the process's comm (kernel task name)"),
    "exe": (_who_field("exe"), "the process's executable"),
    "cmdline": (lambda e: printable(str(_who_field("cmdline")(e))),
                "the process's command line (control characters escaped)"),
    "unit": (_who_field("unit"), "systemd unit or container id"),
    "cgroup": (_who_field("cgroup"), "cgroup v2 path"),
    "service": (_service, "cgroup path, else unit (conntrack-logger's info.service)"),
    "method": (lambda e: "-" if e.who is None else e.who.method, "attribution layers used"),
    "confidence": (lambda e: "none" if e.who is None else e.who.confidence.label,
                   "exact, uid-only, inferred or none"),
    "who": (_who_lines, "conntrack-logger's pid/uid:gid/service and cmdline lines, when "
                        "attributed"),
})
ALIASES.update({"info.pid": "pid", "info.uid": "uid", "info.gid": "gid",
                "info.service": "service", "info.cmdline": "cmdline"})

"""ulogd2 JSON lines: flow events as ulogd 2.0.8's `NFCT → IP2STR → JSON` stack writes them.

For setups (logstash, Splunk, jq scripts) written against ulogd2's JSON output. What we
emulate is NFCT in event mode with `hash_enable=0` (the mode that logs NEW as well as
DESTROY); every rule below was read in ulogd2's source and checked against Debian's
ulogd2 2.0.8 (tests/data/ulogd/ holds its real output, tests/integration runs it beside us).

Keys, in ulogd's order: `timestamp`, `dvc` ("Netfilter", JSON's default device),
`orig.ip.protocol`, `orig.l4.sport`/`dport` (TCP, UDP, UDP-Lite, SCTP, DCCP only),
`orig.raw.pktlen`/`pktcount`, the same four `reply.*`, `icmp.code`/`icmp.type` (IPv4 ICMP
only: 2.0.8 has no ICMPv6 keys), `ct.mark`, `ct.id`, `ct.event`, `flow.start.sec`/`usec`,
`flow.end.sec`/`usec`, `oob.family`, `oob.protocol` (always 0 in NFCT), then IP2STR's
strings. Watch the names: JSON prints a key's CIM name when it has one, so the original
addresses are `src_ip` and `dest_ip`, not `orig.ip.saddr.str`; the reply addresses keep
`reply.ip.saddr.str`/`reply.ip.daddr.str`. Every value is a JSON integer except the
addresses and `timestamp`.

Values as ulogd sets them:
- `ct.event` is libnetfilter_conntrack's message type: NEW 1, UPDATE 2, DESTROY 4. ulogd
  logs UPDATE only for table dumps (hash mode), so our UPDATE and DUMP events are 2 too.
- counters, `ct.mark` and `ct.id` are always present: 0 when the kernel did not say (a NEW
  event never carries counters; ulogd reads an unset attribute as 0).
- `flow.start.*` on NEW: the kernel sends no start in NEW events, so ulogd takes its own
  clock; we take the kernel's event stamp, else our receipt time. On DESTROY `flow.end.*`
  is the kernel's stop (nf_conntrack_timestamp=1), else the same fallback, and
  `flow.start.*` is present only with the kernel's start. UPDATE/DUMP carry
  `flow.start.*` when the kernel gave it. Seconds and microseconds, truncated.
- `timestamp` is when the event was received (ulogd: when it wrote the line; it has no
  kernel time for NFCT records), in local time to the second, followed by
  the UTC offset as +HHMM — which 2.0.8 leaves out when the offset is zero (UTC hosts
  get "2026-11-22T07:25:36"). We do the same, so both tools agree on one host.
- addresses are inet_ntop's text (IPv4-mapped IPv6 addresses written dotted, like glibc).

Left out because ulogd has no key for them: netns, zone, status, protocol state, timeout,
labels, ICMP id and reply type, helper, secctx, use count, and the attribution (who).
Hash mode (`hash_enable=1`, NFCT's default) differs from this profile: it logs DESTROY
only, with a start time remembered from the NEW; a stateless formatter cannot do that.
Whitespace differs: jansson writes `", "` and `": "` separators, orjson none; the
documents are equal once parsed.

Loss: ulogd has no such record. So that loss is never silent, a LossNotice becomes one line
with ulogd's `timestamp` and `dvc` plus `conntrail.lost` (a count, or null when the kernel
cannot say), `conntrail.reason` (e.g. "enobufs") and, when known, `conntrail.netns`.
Consumers can pick these lines out by the `conntrail.lost` key. A TableSnapshot mark
produces nothing.
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any

import orjson

from conntrail.model import (
    AF_INET6,
    PORTED_PROTOCOLS,
    Counters,
    EventKind,
    FlowEvent,
    FlowTuple,
    LossNotice,
    Record,
    TableSnapshot,
)

DEVICE = "Netfilter"  # ulogd's JSON `device` default (ULOGD_JSON_DEFAULT_DEVICE)
CT_EVENTS: dict[EventKind, int] = {  # libnetfilter_conntrack's NFCT_T_NEW/UPDATE/DESTROY
    EventKind.NEW: 1, EventKind.UPDATE: 2, EventKind.DESTROY: 4, EventKind.DUMP: 2,
}
_ICMP = 1
_NS = 1_000_000_000
_NO_COUNTERS = Counters(0, 0)
_NEW, _DESTROY = EventKind.NEW, EventKind.DESTROY
_OPTIONS = orjson.OPT_APPEND_NEWLINE
_CACHE_SIZE = 4096

_STAMPS: dict[int, str] = {}
_V6_TEXT: dict[str, str] = {}


def ulogd_timestamp(ns: int) -> str:
    """ulogd 2.0.8's `timestamp`: local time to the second plus the UTC offset (+HHMM),
    or no offset at all when it is zero. Cached per second, as strftime costs ~2 µs."""
    seconds = ns // _NS
    text = _STAMPS.get(seconds)
    if text is None:
        if len(_STAMPS) >= _CACHE_SIZE:
            _STAMPS.clear()
        local = time.localtime(seconds)
        text = time.strftime("%Y-%m-%dT%H:%M:%S", local) + utc_offset(local.tm_gmtoff)
        _STAMPS[seconds] = text
    return text


def utc_offset(gmtoff: int) -> str:
    """The offset suffix as ulogd_output_JSON.c builds it with C arithmetic: hours truncated
    towards zero ("%+03d"), minutes from the absolute value; empty for a zero offset
    (2.0.8 assigns instead of comparing when it tests its cache, leaving an empty string)."""
    if gmtoff == 0:
        return ""
    hours = int(gmtoff / 3600)  # C division truncates; Python's // would floor
    minutes = abs(gmtoff) // 60 % 60
    return f"{hours:+03d}{minutes:02d}"


def inet_ntop6(text: str) -> str:
    """glibc inet_ntop's text of an IPv6 address given in RFC 5952 form: the same, except
    that an IPv4-mapped (::ffff:a.b.c.d) or IPv4-compatible (::a.b.c.d) address ends dotted.
    Only addresses starting with '::' can differ, and only those need calling this."""
    cached = _V6_TEXT.get(text)
    if cached is None:
        if len(_V6_TEXT) >= _CACHE_SIZE:
            _V6_TEXT.clear()
        cached = _V6_TEXT[text] = _glibc_form(ipaddress.IPv6Address(text).packed, text)
    return cached


def _glibc_form(packed: bytes, text: str) -> str:
    """Dotted tail when the first 80 bits are zero and the next 16 are ffff, or the first
    96 are zero and the next 16 are not (glibc's inet_ntop6 rule); else `text` unchanged."""
    if packed[:10] != bytes(10):
        return text
    if packed[10:12] == b"\xff\xff":
        prefix = "::ffff:"
    elif packed[10:12] == b"\0\0" and packed[12:14] != b"\0\0":
        prefix = "::"
    else:
        return text
    return prefix + ".".join(str(byte) for byte in packed[12:])


def ulogd_document(event: FlowEvent) -> dict[str, Any]:
    """The ulogd JSON document of one flow event, keys in ulogd's order.

    The per-event hot path: one flat function filling one dict in order (helper calls and
    the `time_ns` property cost ~0.1 µs each; this runs for every event of the daemon).
    """
    flow = event.flow
    orig, reply = flow.orig, flow.reply
    proto = orig.proto
    seconds = (event.received_ns or event.time_ns) // _NS
    stamp = _STAMPS.get(seconds) or ulogd_timestamp(seconds * _NS)
    doc: dict[str, Any] = {"timestamp": stamp, "dvc": DEVICE, "orig.ip.protocol": proto}
    if proto in PORTED_PROTOCOLS:
        doc["orig.l4.sport"] = orig.sport or 0
        doc["orig.l4.dport"] = orig.dport or 0
    counters = flow.counters_orig or _NO_COUNTERS
    doc["orig.raw.pktlen"] = counters.bytes
    doc["orig.raw.pktcount"] = counters.packets
    if reply is not None:
        doc["reply.ip.protocol"] = reply.proto
        if reply.proto in PORTED_PROTOCOLS:
            doc["reply.l4.sport"] = reply.sport or 0
            doc["reply.l4.dport"] = reply.dport or 0
    counters = flow.counters_reply or _NO_COUNTERS
    doc["reply.raw.pktlen"] = counters.bytes
    doc["reply.raw.pktcount"] = counters.packets
    if proto == _ICMP:
        doc["icmp.code"] = orig.icmp_code or 0
        doc["icmp.type"] = orig.icmp_type or 0
    kind = event.kind
    doc["ct.mark"] = flow.mark or 0
    doc["ct.id"] = flow.ct_id or 0
    doc["ct.event"] = CT_EVENTS[kind]
    # NEW: the kernel's start, else the event's time (ulogd: its clock). Others: kernel's.
    start = flow.start_ns or (flow.event_ns or event.received_ns if kind is _NEW else None)
    if start:
        doc["flow.start.sec"], rest = divmod(start, _NS)
        doc["flow.start.usec"] = rest // 1000
    if kind is _DESTROY:
        end = flow.stop_ns or flow.event_ns or event.received_ns
        if end:
            doc["flow.end.sec"], rest = divmod(end, _NS)
            doc["flow.end.usec"] = rest // 1000
    doc["oob.family"] = orig.family
    doc["oob.protocol"] = 0
    _add_addresses(doc, orig, reply)
    return doc


def _add_addresses(doc: dict[str, Any], orig: FlowTuple, reply: FlowTuple | None) -> None:
    """IP2STR's strings: the original tuple under their CIM names, the reply under its own."""
    src, dst = orig.src, orig.dst
    if orig.family == AF_INET6 and (src[:2] == "::" or dst[:2] == "::"):
        src, dst = inet_ntop6(src), inet_ntop6(dst)
    doc["src_ip"] = src
    doc["dest_ip"] = dst
    if reply is not None:
        src, dst = reply.src, reply.dst
        if reply.family == AF_INET6 and (src[:2] == "::" or dst[:2] == "::"):
            src, dst = inet_ntop6(src), inet_ntop6(dst)
        doc["reply.ip.saddr.str"] = src
        doc["reply.ip.daddr.str"] = dst


def loss_document(notice: LossNotice) -> dict[str, Any]:
    """The line announcing lost events: ulogd's timestamp and dvc, then conntrail.* keys."""
    doc: dict[str, Any] = {"timestamp": ulogd_timestamp(notice.received_ns), "dvc": DEVICE,
                           "conntrail.lost": notice.lost, "conntrail.reason": notice.reason}
    if notice.netns:
        doc["conntrail.netns"] = notice.netns
    return doc


class UlogdFormat:
    """A Formatter for ulogd2's JSON lines (its NFCT → IP2STR → JSON stack), one per event."""

    def __call__(self, record: Record) -> bytes:
        if isinstance(record, FlowEvent):
            return orjson.dumps(ulogd_document(record), option=_OPTIONS)
        if isinstance(record, LossNotice):
            return orjson.dumps(loss_document(record), option=_OPTIONS)
        if isinstance(record, TableSnapshot):
            return b""  # a mark for stateful consumers (history); ulogd has no such record
        raise TypeError(f"not a record: {type(record).__name__}")

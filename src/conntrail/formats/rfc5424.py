"""RFC 5424 syslog messages for records: header, one SD-ELEMENT with the flow, then the MSG.

Pure: no I/O. The sink frames and sends what this builds. A message is returned in two
parts, the HEADER and STRUCTURED-DATA (never cut) and the MSG (which a size limit may cut),
so a transport with a size limit truncates only the free text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from conntrail.formats.timefmt import iso_utc
from conntrail.model import Attribution, Flow, FlowEvent, LossNotice, Record, TableSnapshot
from conntrail.pipeline.stages import Formatter

FACILITIES: dict[str, int] = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
    "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "security": 13,
    "console": 14, "clock": 15, **{f"local{n}": 16 + n for n in range(8)},
}
SEVERITIES: dict[str, int] = {
    "emerg": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5, "info": 6,
    "debug": 7,
}
LOST_SEVERITY = SEVERITIES["warning"]
# 32473 is the Private Enterprise Number RFC 5612 reserves for documentation: fine as a
# default, but a site with its own PEN should set `sd_id` to "conntrail@<its PEN>".
DEFAULT_SD_ID = "conntrail@32473"
NILVALUE = "-"
BOM = b"\xef\xbb\xbf"
# RFC 5424 §6: the longest value each header field may hold.
HOSTNAME_MAX, APP_NAME_MAX, PROCID_MAX, SD_NAME_MAX = 255, 48, 128, 32
_SD_NAME_FORBIDDEN = frozenset('= ]"')

Param = tuple[str, object]


def header_problem(value: str, limit: int) -> str | None:
    """Why `value` cannot be a header field (PRINTUSASCII, 1..limit), or None if it can."""
    if not value:
        return "must not be empty"
    if len(value) > limit:
        return f"must be at most {limit} characters, not {len(value)}"
    if any(not 33 <= ord(char) <= 126 for char in value):
        return "must be printable ASCII without spaces"
    return None


def sd_id_problem(value: str) -> str | None:
    """Why `value` cannot be our SD-ID, or None: a private id is NAME@ENTERPRISE-NUMBER."""
    problem = header_problem(value, SD_NAME_MAX)
    if problem is None and _SD_NAME_FORBIDDEN & set(value):
        problem = "must not contain '=', ']' or '\"'"
    if problem is None:
        name, at, number = value.partition("@")
        if not (name and at and number.isdigit() and number.isascii()):
            problem = ("must be NAME@ENTERPRISE-NUMBER, e.g. \"conntrail@32473\" (ids "
                       "without @ are reserved to IANA)")
    return problem


def escape_value(value: object) -> str:
    """A PARAM-VALUE: `"`, `\\` and `]` escaped with a backslash (RFC 5424 §6.3.3)."""
    # Paths from the kernel may hold undecodable bytes (surrogates): show them as \xNN
    # rather than fail, as SD values must be UTF-8.
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def pri(facility: int, severity: int) -> int:
    """The PRI value: facility * 8 + severity."""
    return facility * 8 + severity


def fit(head: bytes, msg: bytes, limit: int) -> tuple[bytes, bool]:
    """Join head and MSG into at most `limit` bytes by cutting the MSG (on a UTF-8
    character boundary), never the head; True when something was cut."""
    if not msg:
        return head.removesuffix(b" "), False
    if len(head) + len(msg) <= limit:
        return head + msg, False
    end = max(0, limit - len(head))
    # msg[end] is the first byte left out: while it continues a character (10xxxxxx),
    # that character would be split, so leave it out whole.
    while end and (msg[end] & 0xC0) == 0x80:
        end -= 1
    cut = msg[:end]
    if cut in (b"", BOM):  # a lone BOM says nothing
        return head.removesuffix(b" "), True
    return head + cut, True


@dataclass(slots=True)
class Rfc5424Format:
    """Builds RFC 5424 messages: `parts(record)` → (HEADER SP SD SP, MSG), or None."""

    hostname: str
    message: Formatter
    app_name: str = "conntrail"
    procid: str = NILVALUE
    facility: int = FACILITIES["local0"]
    severity: int = SEVERITIES["info"]
    sd_id: str = DEFAULT_SD_ID
    # Off by default: RFC 5424 allows the BOM but receivers tend to keep it as part of the
    # text (rsyslog 8.2302 writes it to its files, seen here), where it trips up grep and
    # parsers; the MSG is UTF-8 either way.
    bom: bool = False
    clock: Callable[[], int] = time.time_ns
    _fields: str = field(init=False, default="")

    def __post_init__(self) -> None:
        for name, value, limit in (("hostname", self.hostname, HOSTNAME_MAX),
                                   ("app_name", self.app_name, APP_NAME_MAX),
                                   ("procid", self.procid, PROCID_MAX)):
            problem = header_problem(value, limit)
            if problem is not None:
                raise ValueError(f"{name} {value!r} {problem}")
        problem = sd_id_problem(self.sd_id)
        if problem is not None:
            raise ValueError(f"sd_id {self.sd_id!r} {problem}")
        self._fields = f"{self.hostname} {self.app_name} {self.procid}"

    def __call__(self, record: Record) -> bytes:
        """The whole message (no framing); b"" for records that make none."""
        parts = self.parts(record)
        if parts is None:
            return b""
        return fit(*parts, limit=1 << 62)[0]

    def parts(self, record: Record) -> tuple[bytes, bytes] | None:
        """(HEADER SP STRUCTURED-DATA SP, MSG); None for a TableSnapshot."""
        if isinstance(record, TableSnapshot):
            return None
        if isinstance(record, LossNotice):
            severity = min(self.severity, LOST_SEVERITY)  # the more severe of the two
            head = self._head(severity, record.received_ns, "LOST", loss_params(record))
        else:
            head = self._head(self.severity, record.time_ns, record.kind.name,
                              flow_params(record))
        return head, self._msg(record)

    def _head(self, severity: int, when_ns: int, msgid: str, params: list[Param]) -> bytes:
        stamp = iso_utc(when_ns or self.clock())
        sd = structured_data(self.sd_id, params)
        return (f"<{pri(self.facility, severity)}>1 {stamp} {self._fields} {msgid} {sd} "
                .encode())

    def _msg(self, record: Record) -> bytes:
        # One line: receivers escape a newline (rsyslog stores "#012#011"), so the text
        # layout's continuation lines ("\n\t" + who) are folded into this one.
        text = self.message(record).removesuffix(b"\n")
        if b"\n" in text:
            text = text.replace(b"\n\t", b" ").replace(b"\n", b" ")
        if self.bom and text:
            return BOM + text
        return text


def structured_data(sd_id: str, params: list[Param]) -> str:
    """One SD-ELEMENT `[id name="value" …]`; params whose value is None are left out."""
    body = "".join([f' {name}="{escape_value(value)}"' for name, value in params
                    if value is not None])
    return f"[{sd_id}{body}]"


def flow_params(event: FlowEvent) -> list[Param]:
    """The flow's SD-PARAMs, in a fixed order; None values are omitted later."""
    flow = event.flow
    orig = flow.orig
    params: list[Param] = [
        ("family", orig.family_name), ("proto", orig.proto_name),
        ("src", orig.src), ("dst", orig.dst), ("sport", orig.sport), ("dport", orig.dport),
        ("icmp_type", orig.icmp_type), ("icmp_code", orig.icmp_code),
        ("icmp_id", orig.icmp_id),
    ]
    params.extend(_reply_params(flow))
    params.extend([("state", flow.state_name), ("ct_id", flow.ct_id), ("mark", flow.mark),
                   ("zone", flow.zone), ("netns", event.netns or None)])
    params.extend(_counter_params(flow))
    if event.who is not None:
        params.extend(_who_params(event.who))
    return params


def _reply_params(flow: Flow) -> Iterator[Param]:
    """The reply tuple, only when NAT changed it (else it is the original, mirrored)."""
    orig, reply = flow.orig, flow.reply
    if reply is None:
        return
    if (reply.src, reply.dst, reply.sport, reply.dport) == (orig.dst, orig.src, orig.dport,
                                                            orig.sport):
        return
    yield from (("nat", flow.nat_type), ("reply_src", reply.src), ("reply_dst", reply.dst),
                ("reply_sport", reply.sport), ("reply_dport", reply.dport))


def _counter_params(flow: Flow) -> Iterator[Param]:
    for direction, counters in (("orig", flow.counters_orig), ("reply", flow.counters_reply)):
        if counters is not None:
            yield f"{direction}_bytes", counters.bytes
            yield f"{direction}_packets", counters.packets


def _who_params(who: Attribution) -> list[Param]:
    return [("uid", who.uid), ("gid", who.gid), ("pid", who.pid), ("exe", who.exe),
            ("unit", who.unit), ("method", who.method), ("confidence", who.confidence.label)]


def loss_params(notice: LossNotice) -> list[Param]:
    """A loss notice's SD-PARAMs: how many (when known), why, where."""
    return [("lost", notice.lost), ("reason", notice.reason), ("netns", notice.netns or None)]

"""RFC 5424 messages: header, structured data and its escaping, MSG, truncation."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.unit.formats.sample import ICMP, PLAIN_UDP6, SNAT_TCP, T0

from conntrail.formats.jsonl import JsonFormat
from conntrail.formats.rfc5424 import (
    BOM,
    FACILITIES,
    SEVERITIES,
    Rfc5424Format,
    escape_value,
    fit,
    header_problem,
    pri,
    sd_id_problem,
    structured_data,
)
from conntrail.formats.text import TextFormat
from conntrail.model import (
    Attribution,
    Confidence,
    EventKind,
    Flow,
    FlowEvent,
    FlowTuple,
    LossNotice,
    TableSnapshot,
)

NOW = 1_800_000_000_123_456_789


def fmt(**options: object) -> Rfc5424Format:
    settings: dict[str, object] = {"hostname": "gw1", "message": TextFormat(),
                                   "procid": "4242", "clock": lambda: NOW, **options}
    return Rfc5424Format(**settings)  # type: ignore[arg-type]


# The SD-ELEMENT grammar of RFC 5424 §6.3, to read back what we wrote.
_ELEMENT = re.compile(r'\[([^ =\]"]+)((?: [^ =\]"]+="(?:[^"\\\]]|\\["\\\]])*")*)\]')
_PARAM = re.compile(r' ([^ =\]"]+)="((?:[^"\\\]]|\\["\\\]])*)"')


def parse_sd(text: str) -> tuple[str, dict[str, str]]:
    match = _ELEMENT.fullmatch(text)
    assert match, f"not one SD-ELEMENT: {text!r}"
    params = {name: re.sub(r'\\(["\\\]])', r"\1", value)
              for name, value in _PARAM.findall(match.group(2))}
    return match.group(1), params


def split(message: bytes) -> tuple[list[str], str, str]:
    """(header fields, SD, MSG) of a message whose SD is one element."""
    text = message.decode()
    header = text.split(" ", 6)
    rest = header.pop()
    end = rest.index("] ") + 1 if "] " in rest else len(rest)
    return header, rest[:end], rest[end + 1:]


def test_a_snat_flow_in_full() -> None:
    assert fmt()(SNAT_TCP).decode() == (
        '<134>1 2026-11-22T02:05:59.361752Z gw1 conntrail 4242 DESTROY [conntrail@32473 '
        'family="ipv4" proto="tcp" src="198.18.1.2" dst="198.18.2.2" sport="40000" '
        'dport="443" nat="snat" reply_src="198.18.2.2" reply_dst="198.18.2.1" '
        'reply_sport="443" reply_dport="61000" state="TIME_WAIT" ct_id="99" mark="42" '
        'netns="qrouter-1" orig_bytes="400" orig_packets="6" reply_bytes="1200" '
        'reply_packets="5"] 2026-11-22T02:05:59.361752Z: ipv4/tcp 198.18.1.2/40000 > '
        "198.18.2.2/443 :: destroy TIME_WAIT snat reply 198.18.2.2/443 > 198.18.2.1/61000 "
        "mark=0x2a packets=11 bytes=1600 duration=1.500s netns=qrouter-1")


def test_without_nat_the_reply_tuple_is_left_out() -> None:
    header, sd, _ = split(fmt()(PLAIN_UDP6))
    assert header[5] == "NEW"
    assert parse_sd(sd) == ("conntrail@32473", {
        "family": "ipv6", "proto": "udp", "src": "2001:db8::1", "dst": "2001:db8::2",
        "sport": "5000", "dport": "53", "ct_id": "7"})


def test_icmp_has_type_code_and_id_instead_of_ports() -> None:
    _, params = parse_sd(split(fmt()(ICMP))[1])
    assert {k: params[k] for k in ("icmp_type", "icmp_code", "icmp_id")} == \
        {"icmp_type": "8", "icmp_code": "0", "icmp_id": "7"}
    assert "sport" not in params and "reply_src" not in params


def test_attribution_params() -> None:
    who = Attribution("labels+ebpf", Confidence.EXACT, uid=1000, gid=100, pid=77,
                      exe="/usr/bin/curl", unit="app.service", comm="curl")
    _, params = parse_sd(split(fmt()(PLAIN_UDP6._replace(who=who)))[1])
    assert {k: params[k] for k in ("uid", "gid", "pid", "exe", "unit", "method",
                                   "confidence")} == {
        "uid": "1000", "gid": "100", "pid": "77", "exe": "/usr/bin/curl",
        "unit": "app.service", "method": "labels+ebpf", "confidence": "exact"}


def test_partial_attribution_leaves_unknowns_out() -> None:
    who = Attribution("socket", Confidence.UID_ONLY, uid=0)
    _, params = parse_sd(split(fmt()(PLAIN_UDP6._replace(who=who)))[1])
    assert params["uid"] == "0" and "pid" not in params and "exe" not in params


@pytest.mark.parametrize("kind", list(EventKind))
def test_msgid_is_the_event_kind(kind: EventKind) -> None:
    assert split(fmt()(PLAIN_UDP6._replace(kind=kind)))[0][5] == kind.name


def test_loss_notice_is_lost_at_warning() -> None:
    message = fmt()(LossNotice("ns1", "enobufs", 5, T0))
    header, sd, msg = split(message)
    assert header[0] == f"<{16 * 8 + 4}>1" and header[5] == "LOST"
    assert parse_sd(sd)[1] == {"lost": "5", "reason": "enobufs", "netns": "ns1"}
    assert "lost 5 events in netns ns1" in msg


def test_loss_notice_keeps_a_more_severe_configured_severity() -> None:
    message = fmt(severity=SEVERITIES["crit"])(LossNotice("", "overrun", None, T0))
    assert message.startswith(b"<130>1 ")
    assert parse_sd(split(message)[1])[1] == {"reason": "overrun"}


def test_table_snapshots_make_no_message() -> None:
    snapshot = TableSnapshot("", 3, T0)
    assert fmt().parts(snapshot) is None
    assert fmt()(snapshot) == b""


def test_time_comes_from_the_clock_when_the_event_has_none() -> None:
    bare = FlowEvent(EventKind.UPDATE, Flow(orig=FlowTuple(2, 6, "192.0.2.1", "192.0.2.2",
                                                           1, 2)))
    assert split(fmt()(bare))[0][1] == "2027-01-15T08:00:00.123456Z"


@pytest.mark.parametrize(("facility", "severity", "expected"), [
    ("kern", "emerg", 0), ("local0", "info", 134), ("local7", "debug", 191),
    ("daemon", "notice", 29), ("authpriv", "err", 83),
])
def test_pri(facility: str, severity: str, expected: int) -> None:
    assert pri(FACILITIES[facility], SEVERITIES[severity]) == expected
    message = fmt(facility=FACILITIES[facility], severity=SEVERITIES[severity])(PLAIN_UDP6)
    assert message.startswith(f"<{expected}>1 ".encode())


def test_nilvalue_procid_and_no_msg() -> None:
    message = fmt(procid="-", message=lambda record: b"")(PLAIN_UDP6)
    header, _, msg = split(message)
    assert header[4] == "-" and msg == ""
    assert message.endswith(b'ct_id="7"]')  # no trailing space without a MSG


def test_bom_only_when_asked() -> None:
    assert split(fmt()(PLAIN_UDP6))[2].startswith("2026")
    _, msg = fmt(bom=True).parts(PLAIN_UDP6) or (b"", b"")
    assert msg.startswith(BOM + b"2026")


def test_multi_line_text_is_folded_into_one_line() -> None:
    who = Attribution("ebpf", Confidence.EXACT, uid=1, gid=2, pid=3, cmdline="curl x")
    message = fmt()(SNAT_TCP._replace(who=who))
    assert b"\n" not in message and b"\t" not in message
    assert message.endswith(b"netns=qrouter-1 3 1:2 - :: curl x")


def test_json_as_the_msg() -> None:
    _, _, msg = split(fmt(message=JsonFormat())(PLAIN_UDP6))
    assert msg.startswith('{"@timestamp":"2026-11-22T02:05:57.861752Z"') and msg.endswith("}")


def test_escaping() -> None:
    assert escape_value('a"b\\c]d') == 'a\\"b\\\\c\\]d'
    assert escape_value("[ok] é") == "[ok\\] é"
    assert escape_value("/bin/\udcff") == "/bin/\\\\udcff"  # undecodable: shown, not fatal


@given(st.dictionaries(st.from_regex(r"[a-z_]{1,32}", fullmatch=True), st.text(), max_size=5))
def test_any_value_reads_back(values: dict[str, str]) -> None:
    values = {name: text.encode("utf-8", "replace").decode() for name, text in values.items()}
    assert parse_sd(structured_data("x@32473", list(values.items()))) == ("x@32473", values)


def test_fit_cuts_only_the_msg_on_a_character_boundary() -> None:
    head, msg = b"<134>1 HEAD [x@1] ", "aé".encode() * 10
    assert fit(head, msg, 1000) == (head + msg, False)
    joined, cut = fit(head, msg, len(head) + 4)  # 'a', then é would be split at byte 4
    assert (joined, cut) == (head + "aéa".encode()[:4], True)
    assert fit(head, msg, len(head) + 2)[0] == head + b"a"
    assert fit(head, msg, len(head) + 1)[0] == head + b"a"


def test_fit_never_cuts_the_head() -> None:
    head = b"<134>1 HEAD [x@1 long=\"" + b"y" * 100 + b"\"] "
    assert fit(head, b"text", 50) == (head.removesuffix(b" "), True)
    assert fit(head, BOM + b"text", len(head) + 3) == (head.removesuffix(b" "), True)
    assert fit(head, b"", 10) == (head.removesuffix(b" "), False)


@pytest.mark.parametrize(("value", "problem"), [
    ("gw1.example.net", None), ("", "must not be empty"), ("two words", "printable ASCII"),
    ("é", "printable ASCII"), ("x" * 49, "at most 48 characters"),
])
def test_header_problems(value: str, problem: str | None) -> None:
    found = header_problem(value, 48)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


@pytest.mark.parametrize(("value", "problem"), [
    ("conntrail@32473", None), ("origin", "NAME@ENTERPRISE-NUMBER"),
    ("x@pen", "NAME@ENTERPRISE-NUMBER"), ("@1", "NAME@ENTERPRISE-NUMBER"),
    ("a=b@1", "must not contain"), ("x" * 30 + "@123", "at most 32"),
])
def test_sd_id_problems(value: str, problem: str | None) -> None:
    found = sd_id_problem(value)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_invalid_header_values_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="hostname 'a b' must be printable ASCII"):
        fmt(hostname="a b")
    with pytest.raises(ValueError, match="sd_id 'meta'"):
        fmt(sd_id="meta")

"""Tests of the filter expression language: parsing, compiled predicates, errors, fuzzing."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conntrail.errors import ConfigError, FilterError
from conntrail.filters import compiler
from conntrail.filters.match import (
    FIELDS,
    SHORTHANDS,
    And,
    Compare,
    Flags,
    Glob,
    IntRange,
    Literal,
    Network,
    Not,
    Or,
    compile_filter,
    compile_predicate,
    format_expr,
    parse,
)
from conntrail.model import (
    AF_INET,
    AF_INET6,
    Counters,
    CtStatus,
    EventKind,
    Flow,
    FlowEvent,
    FlowTuple,
    TcpState,
)

# --------------------------------------------------------------------------------------------
# Events used throughout
# --------------------------------------------------------------------------------------------

ASSURED_STATUS = CtStatus.CONFIRMED | CtStatus.SEEN_REPLY | CtStatus.ASSURED


def tcp4(**flow_kw: Any) -> Flow:
    """An IPv4 TCP flow 198.18.0.1:40000 -> 198.19.0.2:443 with a reply tuple."""
    kw: dict[str, Any] = {
        "orig": FlowTuple(AF_INET, 6, "198.18.0.1", "198.19.0.2", 40000, 443),
        "reply": FlowTuple(AF_INET, 6, "198.19.0.2", "203.0.113.7", 443, 61000),
        "status": ASSURED_STATUS | CtStatus.SRC_NAT,
        "proto_state": int(TcpState.ESTABLISHED),
        "mark": 0x1234,
        "zone": 7,
        "ct_id": 99,
        "counters_orig": Counters(packets=3, bytes=300),
        "counters_reply": Counters(packets=2, bytes=1200),
    }
    kw.update(flow_kw)
    return Flow(**kw)


TCP4 = FlowEvent(EventKind.NEW, tcp4(), "qrouter-1234", 0)
UDP6 = FlowEvent(
    EventKind.DESTROY,
    Flow(
        orig=FlowTuple(AF_INET6, 17, "2001:db8::1", "2001:db8:1::53", 5353, 53),
        reply=FlowTuple(AF_INET6, 17, "2001:db8:1::53", "2001:db8::1", 53, 5353),
        status=CtStatus.CONFIRMED | CtStatus.SEEN_REPLY | CtStatus.DST_NAT,
    ),
    "ns1",
    0,
)
ICMP4 = FlowEvent(
    EventKind.UPDATE,
    Flow(
        orig=FlowTuple(AF_INET, 1, "10.0.0.1", "10.0.0.2", icmp_type=8, icmp_code=0, icmp_id=77),
        status=CtStatus.CONFIRMED,
    ),
    "",
    0,
)
# A TCP flow with no reply tuple, no counters, no mark/zone/id: everything optional absent.
BARE = FlowEvent(
    EventKind.DUMP,
    Flow(orig=FlowTuple(AF_INET, 6, "192.0.2.1", "192.0.2.2", 1000, 22)),
    "ns2",
    0,
)
# Addresses the kernel would never send, to prove they are "no match", not a crash.
JUNK = FlowEvent(EventKind.NEW, Flow(orig=FlowTuple(AF_INET, 6, "not-an-ip", "", 1, 2)), "", 0)
ALL_EVENTS = (TCP4, UDP6, ICMP4, BARE, JUNK)


def matches(text: str, event: FlowEvent) -> bool:
    """Compile text and apply it to event."""
    return compile_filter(text)(event)


# --------------------------------------------------------------------------------------------
# Fields and operators
# --------------------------------------------------------------------------------------------

FIELD_CASES = [
    # proto / family
    ("proto == tcp", TCP4, True),
    ("proto == 6", TCP4, True),
    ("proto == udp", TCP4, False),
    ("proto == TCP", TCP4, True),
    ("proto in {udp, icmp}", ICMP4, True),
    ("proto == icmpv6", ICMP4, False),
    ("family == ipv4", TCP4, True),
    ("family == 4", TCP4, True),
    ("family == 6", UDP6, True),
    ("family == ipv6", TCP4, False),
    # original tuple
    ("src == 198.18.0.1", TCP4, True),
    ("dst == 198.19.0.2", TCP4, True),
    ("dst == 198.18.0.1", TCP4, False),
    ("sport == 40000", TCP4, True),
    ("dport == 443", TCP4, True),
    ("dport == 0x1bb", TCP4, True),
    ("dport == 0x1BB", TCP4, True),
    ("dport == 80", TCP4, False),
    # reply tuple
    ("reply.src == 198.19.0.2", TCP4, True),
    ("reply.dst == 203.0.113.7", TCP4, True),
    ("reply.dst in 203.0.113.0/24", TCP4, True),
    ("reply.sport == 443", TCP4, True),
    ("reply.dport == 61000", TCP4, True),
    ("reply.dport == 40000", TCP4, False),
    # either end
    ("addr == 198.19.0.2", TCP4, True),
    ("addr == 198.18.0.1", TCP4, True),
    ("addr == 203.0.113.7", TCP4, False),
    ("host == 198.18.0.1", TCP4, True),
    ("port == 40000", TCP4, True),
    ("port == 443", TCP4, True),
    ("port == 61000", TCP4, False),
    # icmp
    ("icmp.type == 8", ICMP4, True),
    ("icmp.code == 0", ICMP4, True),
    ("icmp.id == 77", ICMP4, True),
    ("icmp.type == 0", ICMP4, False),
    # state and status
    ("state == ESTABLISHED", TCP4, True),
    ("state == established", TCP4, True),
    ("state == EsTaBlIsHeD", TCP4, True),
    ("state == TIME_WAIT", TCP4, False),
    ("state in {SYN_SENT, ESTABLISHED}", TCP4, True),
    ("state == EST*", TCP4, True),
    ("state == 3", FlowEvent(EventKind.NEW, tcp4(orig=FlowTuple(2, 47, "1.1.1.1", "::"))), True),
    ("status has ASSURED", TCP4, True),
    ("status has assured", TCP4, True),
    ("status has {SEEN_REPLY, ASSURED}", TCP4, True),
    ("status has {SEEN_REPLY, DYING}", TCP4, False),
    ("status has ASSURED", ICMP4, False),
    # mark, zone, netns, event, nat, id
    ("mark == 0x1234", TCP4, True),
    ("mark == 4660", TCP4, True),
    ("mark/0xff == 0x34", TCP4, True),
    ("mark/0xff == 0x12", TCP4, False),
    ("mark/0xff00 >= 0x1200", TCP4, True),
    ("zone == 7", TCP4, True),
    ("zone == 8", TCP4, False),
    ("netns == qrouter-1234", TCP4, True),
    ("netns == qrouter-*", TCP4, True),
    ("netns == qrouter-12?4", TCP4, True),
    ("netns == 'qrouter-*'", TCP4, True),
    ("netns == qdhcp-*", TCP4, False),
    ("netns == ''", ICMP4, True),
    ("netns in {ns1, qdhcp-*}", UDP6, True),
    ("netns in {ns1, qdhcp-*}", TCP4, False),
    ("event == new", TCP4, True),
    ("event == NEW", TCP4, True),
    ("event == destroy", TCP4, False),
    ("event in {update, destroy}", UDP6, True),
    ("nat == snat", TCP4, True),
    ("nat == dnat", UDP6, True),
    ("nat == none", ICMP4, True),
    ("nat == both", TCP4, False),
    ("ct_id == 99", TCP4, True),
    ("id == 99", TCP4, True),
    ("id == 98", TCP4, False),
    # counters: both directions summed
    ("bytes == 1500", TCP4, True),
    ("packets == 5", TCP4, True),
    ("bytes > 1000", TCP4, True),
    ("packets < 5", TCP4, False),
]


@pytest.mark.parametrize(("text", "event", "expected"), FIELD_CASES)
def test_fields(text: str, event: FlowEvent, expected: bool) -> None:
    assert matches(text, event) is expected


def test_counters_of_one_direction_are_summed_alone() -> None:
    event = FlowEvent(EventKind.NEW, tcp4(counters_reply=None))
    assert matches("bytes == 300", event)
    assert matches("packets == 3", event)


def test_zone_falls_back_to_the_tuple_zone() -> None:
    orig = FlowTuple(AF_INET, 6, "1.1.1.1", "2.2.2.2", 1, 2, zone=5)
    assert matches("zone == 5", FlowEvent(EventKind.NEW, tcp4(orig=orig, zone=None)))
    assert matches("zone == 7", FlowEvent(EventKind.NEW, tcp4(orig=orig)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("dport == 443", True),
        ("dport = 443", True),
        ("dport != 443", False),
        ("dport != 80", True),
        ("dport < 443", False),
        ("dport < 444", True),
        ("dport <= 443", True),
        ("dport <= 442", False),
        ("dport > 442", True),
        ("dport > 443", False),
        ("dport >= 443", True),
        ("dport >= 444", False),
        ("dport in {22, 80, 443}", True),
        ("dport in {22, 80}", False),
        ("dport in {22, 80, 443,}", True),
        ("dport == {22, 443}", True),
        ("dport in 400-500", True),
        ("dport in 444-500", False),
        ("dport in 443-443", True),
        ("dport in {1-10, 400-450, 20-30}", True),
        ("dport in {1-100, 5-6, 1000}", False),
        ("dport in {1-500, 5-6}", True),
        ("dport in {100, 443}", True),
        ("dport not in {22, 80}", True),
        ("dport not in 400-500", False),
        ("src in 198.18.0.0/15", True),
        ("src not in 198.18.0.0/15", False),
        ("src in {10.0.0.0/8, 198.18.0.1}", True),
        ("src in {10.0.0.0/8, 198.18.0.2}", False),
        ("src in {10.0.0.0/8, 172.16.0.0/12, 198.16.0.0/12}", True),
        ("src == 198.18.0.0/15", True),
        ("src in 198.18.0.5/15", True),  # host bits ignored, like tcpdump
        ("port > 40000", False),
        ("port >= 40000", True),
        ("port < 444", True),
    ],
)
def test_operators(text: str, expected: bool) -> None:
    assert matches(text, TCP4) is expected


def test_multi_interval_bisect_boundaries() -> None:
    predicate = compile_filter("dport in {10-20, 30, 40-50}")
    hits = {port for port in range(60) if predicate(_with_dport(port))}
    assert hits == set(range(10, 21)) | {30} | set(range(40, 51))


def _with_dport(port: int) -> FlowEvent:
    return FlowEvent(EventKind.NEW, tcp4(orig=FlowTuple(AF_INET, 6, "1.1.1.1", "2.2.2.2", 1, port)))


# --------------------------------------------------------------------------------------------
# Shorthands
# --------------------------------------------------------------------------------------------

SHORTHAND_CASES = [
    ("tcp", TCP4, True),
    ("udp", UDP6, True),
    ("udp", TCP4, False),
    ("icmp", ICMP4, True),
    ("TCP", TCP4, True),
    ("icmpv6", FlowEvent(EventKind.NEW, Flow(orig=FlowTuple(AF_INET6, 58, "::1", "::2"))), True),
    ("sctp", FlowEvent(EventKind.NEW, Flow(orig=FlowTuple(AF_INET, 132, "1.1.1.1", "::2"))), True),
    ("dccp", TCP4, False),
    ("gre", FlowEvent(EventKind.NEW, Flow(orig=FlowTuple(AF_INET, 47, "1.1.1.1", "::"))), True),
    ("udplite", FlowEvent(EventKind.NEW, Flow(orig=FlowTuple(AF_INET, 136, "1.1.1.1", ""))), True),
    ("ipv4", TCP4, True),
    ("ipv4", UDP6, False),
    ("ipv6", UDP6, True),
    ("new", TCP4, True),
    ("update", ICMP4, True),
    ("destroy", UDP6, True),
    ("dump", BARE, True),
    ("dump", TCP4, False),
    ("nat", TCP4, True),
    ("nat", ICMP4, False),
    ("snat", TCP4, True),
    ("snat", UDP6, False),
    ("dnat", UDP6, True),
    ("assured", TCP4, True),
    ("assured", UDP6, False),
    ("seen_reply", UDP6, True),
    ("confirmed", ICMP4, True),
    ("src_nat", TCP4, True),
    ("dst_nat", UDP6, True),
    ("unreplied", ICMP4, True),
    ("unreplied", TCP4, False),
]


@pytest.mark.parametrize(("text", "event", "expected"), SHORTHAND_CASES)
def test_shorthands(text: str, event: FlowEvent, expected: bool) -> None:
    assert matches(text, event) is expected


def test_snat_and_dnat_include_both() -> None:
    both = FlowEvent(EventKind.NEW, tcp4(status=CtStatus.SRC_NAT | CtStatus.DST_NAT))
    assert matches("snat and dnat and nat == both", both)


def test_nat_field_agrees_with_flow_nat_type() -> None:
    for bits in (0, CtStatus.SRC_NAT, CtStatus.DST_NAT, CtStatus.SRC_NAT | CtStatus.DST_NAT):
        flow = tcp4(status=CtStatus(bits) | CtStatus.CONFIRMED)
        assert matches(f"nat == {flow.nat_type}", FlowEvent(EventKind.NEW, flow))


def test_shorthand_expansions() -> None:
    assert parse("tcp") == Compare("proto", "==", (Literal(6),))
    assert parse("ipv6") == Compare("family", "==", (Literal(AF_INET6),))
    assert parse("destroy") == Compare("event", "==", (Literal(EventKind.DESTROY),))
    assert parse("unreplied") == Not(Compare("status", "has", (Flags(CtStatus.SEEN_REPLY),)))
    assert SHORTHANDS["snat"] == "nat in {snat, both}"
    assert SHORTHANDS["tcp"] == "proto == 6"


def test_nat_is_a_field_when_an_operator_follows() -> None:
    assert parse("nat") == Compare("nat", "!=", (Literal("none"),))
    assert parse("nat == dnat") == Compare("nat", "==", (Literal("dnat"),))
    assert parse("nat and tcp") == And((parse("nat"), parse("tcp")))


# --------------------------------------------------------------------------------------------
# Boolean structure and precedence
# --------------------------------------------------------------------------------------------

TCP = Compare("proto", "==", (Literal(6),))
UDP = Compare("proto", "==", (Literal(17),))
DNS = Compare("dport", "==", (Literal(53),))


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        ("tcp or udp and dport == 53", Or((TCP, And((UDP, DNS))))),
        ("tcp || udp && dport == 53", Or((TCP, And((UDP, DNS))))),
        ("(tcp or udp) and dport == 53", And((Or((TCP, UDP)), DNS))),
        ("not tcp and udp", And((Not(TCP), UDP))),
        ("!tcp || udp", Or((Not(TCP), UDP))),
        ("not (tcp or udp)", Not(Or((TCP, UDP)))),
        ("tcp and udp and dport == 53", And((TCP, UDP, DNS))),
        ("tcp and (udp and dport == 53)", And((TCP, UDP, DNS))),
        ("tcp or (udp or dport == 53)", Or((TCP, UDP, DNS))),
        ("TCP AND NOT UDP", And((TCP, Not(UDP)))),
        ("not not tcp", Not(Not(TCP))),
        ("((tcp))", TCP),
        ("tcp&&udp", And((TCP, UDP))),
        ("dport==53||tcp", Or((DNS, TCP))),
    ],
)
def test_precedence(text: str, tree: Any) -> None:
    assert parse(text) == tree


@pytest.mark.parametrize(
    ("text", "event", "expected"),
    [
        ("udp or tcp and dport == 53", TCP4, False),
        ("udp or tcp and dport == 443", TCP4, True),
        ("(udp or tcp) and dport == 443", TCP4, True),
        ("not udp and not icmp", TCP4, True),
        ("not (udp or tcp)", TCP4, False),
        ("!tcp", TCP4, False),
        ("tcp and dport == 443 and not src in 198.18.0.0/15", TCP4, False),
        ("tcp and dport == 443 and not src in 10.0.0.0/8", TCP4, True),
    ],
)
def test_boolean_evaluation(text: str, event: FlowEvent, expected: bool) -> None:
    assert matches(text, event) is expected


def test_long_chains_compile_to_the_right_truth() -> None:
    ports = list(range(1, 40))
    any_port = " or ".join(f"dport == {port}" for port in ports)
    every_not = " and ".join(f"dport != {port}" for port in ports)
    for port in (1, 20, 39, 40, 443):
        event = _with_dport(port)
        assert matches(any_port, event) is (port in ports)
        assert matches(every_not, event) is (port not in ports)


# --------------------------------------------------------------------------------------------
# Address families and parsing of addresses
# --------------------------------------------------------------------------------------------

V4_MAPPED = FlowEvent(
    EventKind.NEW, Flow(orig=FlowTuple(AF_INET6, 6, "::ffff:198.18.0.1", "::1", 1, 2))
)


@pytest.mark.parametrize(
    ("text", "event", "expected"),
    [
        ("src in 0.0.0.0/0", TCP4, True),
        ("src in 0.0.0.0/0", UDP6, False),
        ("src in ::/0", UDP6, True),
        ("src in ::/0", TCP4, False),
        ("src in 198.18.0.0/15", V4_MAPPED, False),
        ("src == 198.18.0.1", V4_MAPPED, False),
        ("src in ::ffff:0:0/96", V4_MAPPED, True),
        ("addr == ::1", V4_MAPPED, True),
        ("addr == 2001:db8::1", UDP6, True),
        ("addr == 2001:0db8:0:0::1", UDP6, True),  # any spelling of the same address
        ("dst in 2001:db8::/32", UDP6, True),
        ("dst in 2001:db8:1::/48", UDP6, True),
        ("dst in 2001:db8:2::/48", UDP6, False),
        ("src in {10.0.0.0/8, 2001:db8::/32}", UDP6, True),
        ("src in {10.0.0.0/8, 2001:db8::/32}", TCP4, False),
        ("ipv6 and host == 2001:db8::1", UDP6, True),
        # numerically 0.0.0.1 == ::1 as integers; the families must still differ
        ("addr == 0.0.0.1", V4_MAPPED, False),
    ],
)
def test_address_families(text: str, event: FlowEvent, expected: bool) -> None:
    assert matches(text, event) is expected


def test_non_canonical_event_address_still_matches() -> None:
    event = FlowEvent(EventKind.NEW, Flow(orig=FlowTuple(AF_INET6, 6, "2001:DB8:0::1", "::2")))
    assert matches("src == 2001:db8::1", event)


def test_ipv6_tokens_stay_whole() -> None:
    assert parse("addr == ::1") == Compare("addr", "==", (_net("::1/128"),))
    assert parse("src in 2001:db8::/32") == Compare("src", "==", (_net("2001:db8::/32"),))
    assert parse("src in {::1,::2}") == Compare("src", "==", (_net("::1/128"), _net("::2/128")))


def _net(text: str) -> Network:
    return Network(ipaddress.ip_network(text))


def test_address_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiler, "_ADDR_CACHE_MAX", 8)
    compiler._ADDR_CACHE.clear()
    predicate = compile_filter("src in 10.0.0.0/8")
    for index in range(100):
        flow = Flow(orig=FlowTuple(AF_INET, 6, f"10.0.0.{index}", "1.1.1.1", 1, 2))
        assert predicate(FlowEvent(EventKind.NEW, flow))
        assert len(compiler._ADDR_CACHE) <= 8
    compiler._ADDR_CACHE.clear()


# --------------------------------------------------------------------------------------------
# Absent values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("reply.src == 192.0.2.2", False),
        ("reply.src != 192.0.2.2", True),
        ("reply.src in 0.0.0.0/0", False),
        ("reply.src not in 0.0.0.0/0", True),
        ("reply.sport == 22", False),
        ("reply.sport != 22", True),
        ("reply.dport <= 65535", False),
        ("reply.dport >= 0", False),
        ("reply.dport in 0-65535", False),
        ("reply.dport not in 0-65535", True),
        ("bytes > 0", False),
        ("bytes == 0", False),
        ("bytes != 0", True),
        ("packets <= 10", False),
        ("mark == 0", False),
        ("mark != 0", True),
        ("mark/0xff == 0", False),
        ("zone == 0", False),
        ("id >= 0", False),
        ("icmp.type == 8", False),
        ("icmp.type != 8", True),
        ("state == NONE", False),
        ("state != NONE", True),
        ("state == *", False),
    ],
)
def test_absent_values_fail_all_but_not_equal(text: str, expected: bool) -> None:
    assert matches(text, BARE) is expected


def test_icmp_has_no_ports() -> None:
    assert not matches("port <= 65535", ICMP4)
    assert not matches("dport in 0-65535", ICMP4)
    assert matches("port != 0", ICMP4)


def test_junk_addresses_match_nothing() -> None:
    assert not matches("src in 0.0.0.0/0", JUNK)
    assert not matches("addr in ::/0", JUNK)
    assert matches("src != 1.2.3.4", JUNK)


# --------------------------------------------------------------------------------------------
# Errors: always FilterError(path='filter'), with a position
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("dprt == 22", "unknown field 'dprt' at position 0 (did you mean 'dport'?)"),
        ("tcp and dportt == 1", "unknown field 'dportt' at position 8 (did you mean 'dport'?)"),
        ("tpc", "unknown field 'tpc' at position 0 (did you mean 'tcp'?)"),
        ("dport == ", "expected a value after '==' at position 9"),
        ("dport ==", "expected a value after '==' at position 8"),
        ("dport == and tcp", "expected a value after '==' at position 9"),
        ("dport in {}", "expected a value after '{' at position 10"),
        ("dport in {1,", "expected a value after ',' at position 12"),
        ("dport in {1 2}", "expected ',' or '}' in the set, found '2' at position 12"),
        ("src in 10.0.0.0/33", "invalid CIDR '10.0.0.0/33' at position 7"),
        ("src == 10.0.0.256", "invalid address '10.0.0.256' at position 7"),
        ("src == localhost", "invalid address 'localhost' at position 7"),
        ("dport == 70000", "port 70000 out of range (0-65535) at position 9"),
        ("dport in 1-70000", "port 70000 out of range (0-65535) at position 9"),
        ("dport in 2000-1000", "empty range '2000-1000' at position 9"),
        ("dport == http", "expected a number for 'dport', found 'http' at position 9"),
        ("dport == -1", "expected a number for 'dport', found '-1' at position 9"),
        ("icmp.type == 256", "ICMP type 256 out of range (0-255) at position 13"),
        ("proto == 256", "protocol 256 out of range (0-255) at position 9"),
        ("proto == tpc", "unknown protocol 'tpc' at position 9 (did you mean 'tcp'?)"),
        ("family == ipv5", "unknown family 'ipv5' (use ipv4 or ipv6) at position 10"),
        (
            "state == establshed",
            "unknown state 'establshed' at position 9 (did you mean 'ESTABLISHED'?)",
        ),
        ("event == destory", "unknown event 'destory' at position 9 (did you mean 'destroy'?)"),
        ("nat == snta", "unknown NAT type 'snta' at position 7 (did you mean 'snat'?)"),
        (
            "status has asured",
            "unknown status flag 'asured' at position 11 (did you mean 'ASSURED'?)",
        ),
        (
            "status == ASSURED",
            "field 'status' is tested with 'has', e.g. 'status has ASSURED' at position 7",
        ),
        ("dport has 1", "operator 'has' applies only to 'status', not 'dport' at position 6"),
        ("src < 1.2.3.4", "operator '<' needs a numeric field, not 'src' at position 4"),
        ("netns > a", "operator '>' needs a numeric field, not 'netns' at position 6"),
        ("dport < {1, 2}", "operator '<' takes a single number, not a set at position 6"),
        ("dport < 1-2", "operator '<' takes a single number, not a range at position 8"),
        ("dport", "expected an operator after 'dport', found the end of the filter at position 5"),
        ("dport 22", "expected an operator after 'dport', found '22' at position 6"),
        ("dport not 22", "expected an operator after 'dport', found 'not' at position 6"),
        ("tcp udp", "expected 'and', 'or' or the end of the filter, found 'udp' at position 4"),
        (
            "(tcp",
            "expected ')' for the '(' at position 0, found the end of the filter at position 4",
        ),
        ("tcp)", "expected 'and', 'or' or the end of the filter, found ')' at position 3"),
        ("tcp and", "expected a field or a shorthand, found the end of the filter at position 7"),
        ("and", "expected a field or a shorthand, found 'and' at position 0"),
        ("== 1", "expected a field or a shorthand, found '==' at position 0"),
        ("'tcp'", "expected a field or a shorthand, found string 'tcp' at position 0"),
        ('netns == "ns1', "unterminated string at position 9"),
        ("tcp & udp", "unexpected character '&' at position 4 (did you mean '&&'?)"),
        ("tcp | udp", "unexpected character '|' at position 4 (did you mean '||'?)"),
        ("dport == 22;", "unexpected character ';' at position 11"),
        ("", "empty filter expression at position 0"),
        ("   ", "empty filter expression at position 0"),
        ("nat/0xff == 1", "field 'nat' takes no mask at position 0"),
        ("mark/zz == 1", "invalid mask 'zz' for 'mark' at position 0"),
        ("mark/ == 1", "invalid mask '' for 'mark' at position 0"),
        ("mark == 0x100000000", "mark 0x100000000 out of range (0-4294967295) at position 8"),
        ("(" * 100 + "tcp" + ")" * 100, "expression nested more than 64 deep at position 64"),
        ("not " * 100 + "tcp", "expression nested more than 64 deep at position 256"),
    ],
)
def test_errors(text: str, reason: str) -> None:
    with pytest.raises(FilterError) as info:
        compile_filter(text)
    assert info.value.path == "filter"
    assert info.value.reason == reason
    assert str(info.value) == f"filter: {reason}"
    assert isinstance(info.value, ConfigError)


def test_huge_numbers_are_out_of_range_not_a_crash() -> None:
    with pytest.raises(FilterError, match="out of range"):
        parse("bytes == " + "9" * 5000)


def test_non_text_is_rejected() -> None:
    with pytest.raises(FilterError, match="must be text"):
        parse(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "tree",
    [
        Compare("nope", "==", (Literal(1),)),
        Compare("dport", "==", ()),
        Compare("dport", "==", (Literal("443"),)),
        Compare("dport", "==", (Network(ipaddress.ip_network("::/0")),)),
        Compare("src", "==", (Literal("1.2.3.4"),)),
        Compare("dport", "has", (Literal(1),)),
        Compare("status", "==", (Flags(CtStatus.ASSURED),)),
        Compare("dport", "<", (IntRange(1, 2),)),
        Compare("state", "<", (Literal("ESTABLISHED"),)),
        Compare("dport", "~", (Literal(1),)),
        Compare("netns", "==", (IntRange(1, 2),)),
        Compare("netns", "==", (Literal("a"),), mask=0xFF),
        Not("tcp"),  # type: ignore[arg-type]
        And((TCP, "udp")),  # type: ignore[arg-type]
    ],
)
def test_malformed_trees_raise_filter_error(tree: Any) -> None:
    with pytest.raises(FilterError):
        compile_predicate(tree)


def test_empty_and_or_are_true_and_false() -> None:
    assert compile_predicate(And(()))(TCP4) is True
    assert compile_predicate(Or(()))(TCP4) is False


# --------------------------------------------------------------------------------------------
# AST shape and formatting
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        ("dport in {22, 1000-2000}", Compare("dport", "==", (Literal(22), IntRange(1000, 2000)))),
        ("dport not in {22}", Compare("dport", "!=", (Literal(22),))),
        ("host == 1.2.3.4", Compare("addr", "==", (_net("1.2.3.4/32"),))),
        ("id == 5", Compare("ct_id", "==", (Literal(5),))),
        ("netns == qrouter-*", Compare("netns", "==", (Glob("qrouter-*"),))),
        ('netns == "a b"', Compare("netns", "==", (Literal("a b"),))),
        ("state == syn_*", Compare("state", "==", (Glob("SYN_*"),))),
        ("mark/0xff == 1", Compare("mark", "==", (Literal(1),), mask=0xFF)),
        ("family == 4", Compare("family", "==", (Literal(AF_INET),))),
        (
            "status has {seen_reply, assured}",
            Compare("status", "has", (Flags(CtStatus.SEEN_REPLY | CtStatus.ASSURED),)),
        ),
    ],
)
def test_ast(text: str, tree: Any) -> None:
    assert parse(text) == tree


def test_compare_remembers_its_position() -> None:
    tree = parse("tcp and  dport == 1")
    assert isinstance(tree, And)
    assert [operand.position for operand in tree.operands if isinstance(operand, Compare)] == [
        0,
        9,
    ]


@pytest.mark.parametrize(
    ("text", "formatted"),
    [
        (
            "tcp and dport == 443 and not src in 198.18.0.0/15",
            "proto == 6 and dport == 443 and not src in 198.18.0.0/15",
        ),
        (
            "(tcp or udp) and not (dport in {1, 2-3})",
            "(proto == 6 or proto == 17) and not dport in {1, 2-3}",
        ),
        ("netns == 'and'", 'netns == "and"'),
        ("netns == 'say \"hi\"'", "netns == 'say \"hi\"'"),
        ("family == 6 and event == NEW", "family == ipv6 and event == new"),
        ("status has {ASSURED, SEEN_REPLY}", "status has {SEEN_REPLY, ASSURED}"),
        ("mark/255 != 1", "mark/0xff != 1"),
        ("host != 10.0.0.0/8", "addr not in 10.0.0.0/8"),
    ],
)
def test_format_expr(text: str, formatted: str) -> None:
    assert format_expr(parse(text)) == formatted
    assert parse(formatted) == parse(text)


def test_fields_documented() -> None:
    expected = {
        "proto",
        "family",
        "src",
        "dst",
        "sport",
        "dport",
        "reply.src",
        "reply.dst",
        "reply.sport",
        "reply.dport",
        "addr",
        "host",
        "port",
        "icmp.type",
        "icmp.code",
        "icmp.id",
        "state",
        "status",
        "mark",
        "zone",
        "netns",
        "event",
        "nat",
        "ct_id",
        "id",
        "bytes",
        "packets",
        "process.pid",
        "pid",
        "process.name",
        "process.executable",
        "exe",
        "process.command_line",
        "cmdline",
        "user.id",
        "uid",
        "group.id",
        "gid",
        "service",
        "unit",
        "cgroup",
    }
    assert set(FIELDS) == expected
    assert all(isinstance(doc, str) and doc and "\n" not in doc for doc in FIELDS.values())


def test_every_field_parses() -> None:
    samples = {
        "addr": "1.2.3.4",
        "host": "::1",
        "src": "1.2.3.4",
        "dst": "1.2.3.4",
        "reply.src": "1.2.3.4",
        "reply.dst": "1.2.3.4",
        "state": "ESTABLISHED",
        "netns": "x",
        "event": "new",
        "nat": "none",
        "proto": "tcp",
        "family": "ipv4",
    }
    for name in FIELDS:
        if name == "status":
            continue
        predicate = compile_filter(f"{name} != {samples.get(name, '1')}")
        for event in ALL_EVENTS:
            assert isinstance(predicate(event), bool)


# --------------------------------------------------------------------------------------------
# Fuzzing: any text compiles or raises FilterError; compiled predicates never raise
# --------------------------------------------------------------------------------------------

TOKENS = [
    "and",
    "or",
    "not",
    "&&",
    "||",
    "!",
    "(",
    ")",
    "{",
    "}",
    ",",
    "==",
    "=",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "in",
    "has",
    "tcp",
    "udp",
    "icmp",
    "ipv4",
    "ipv6",
    "nat",
    "snat",
    "new",
    "assured",
    "unreplied",
    "dport",
    "sport",
    "port",
    "src",
    "dst",
    "addr",
    "reply.src",
    "reply.dport",
    "icmp.type",
    "state",
    "status",
    "mark",
    "mark/0xff",
    "zone",
    "netns",
    "event",
    "id",
    "bytes",
    "packets",
    "proto",
    "family",
    "22",
    "443",
    "0x1bb",
    "70000",
    "1000-2000",
    "10.0.0.0/8",
    "198.18.0.1",
    "::1",
    "2001:db8::/32",
    "10.0.0.0/33",
    "ESTABLISHED",
    "SEEN_REPLY",
    "qrouter-*",
    "ns?",
    '"a b"',
    "'x*'",
    "destroy",
    "snat",
    "both",
    "none",
    "4",
    "6",
    "-",
    "/",
    "*",
    "&",
    "|",
    '"',
    "'",
    ":",
    "é",
    "\x00",
    "",
]
FUZZ = settings(max_examples=400, deadline=None)


def _compiles_or_filter_error(text: str) -> None:
    try:
        predicate = compile_filter(text)
    except FilterError as error:
        assert error.path == "filter"
        assert "position" in error.reason or "malformed" not in error.reason
        return
    for event in (*ALL_EVENTS, V4_MAPPED):
        assert isinstance(predicate(event), bool)


@FUZZ
@given(st.text(max_size=80))
def test_fuzz_arbitrary_text(text: str) -> None:
    _compiles_or_filter_error(text)


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=14), st.sampled_from([" ", ""]))
def test_fuzz_token_soup(tokens: list[str], separator: str) -> None:
    _compiles_or_filter_error(separator.join(tokens))


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=14))
def test_fuzz_format_round_trip(tokens: list[str]) -> None:
    text = " ".join(tokens)
    try:
        tree = parse(text)
    except FilterError:
        return
    assert parse(format_expr(tree)) == tree
    for event in ALL_EVENTS:
        assert compile_filter(format_expr(tree))(event) is compile_predicate(tree)(event)


CLAUSES = [
    "tcp",
    "udp",
    "ipv6",
    "dport == 443",
    "dport in 400-500",
    "port < 1024",
    "bytes > 1000",
    "src in 198.18.0.0/15",
    "addr == 2001:db8::1",
    "reply.dport == 61000",
    "netns == q*",
    "state == ESTABLISHED",
    "assured",
    "unreplied",
    "snat",
    "nat",
    "mark/0xff == 0x34",
    "event in {new, dump}",
    "icmp.type == 8",
    "zone == 7",
]


def _reference(tree: Any, event: FlowEvent) -> bool:
    """Evaluate and/or/not directly, compiling only the leaves, to check the combinators."""
    if isinstance(tree, And):
        return all(_reference(operand, event) for operand in tree.operands)
    if isinstance(tree, Or):
        return any(_reference(operand, event) for operand in tree.operands)
    if isinstance(tree, Not):
        return not _reference(tree.operand, event)
    return compile_predicate(tree)(event)


@st.composite
def boolean_text(draw: st.DrawFn, depth: int = 0) -> str:
    """A random well-formed boolean combination of CLAUSES."""
    if depth > 3 or draw(st.booleans()):
        return draw(st.sampled_from(CLAUSES))
    kind = draw(st.sampled_from(["and", "or", "not"]))
    if kind == "not":
        return f"not ({draw(boolean_text(depth + 1))})"
    parts = draw(st.lists(boolean_text(depth + 1), min_size=2, max_size=6))
    return "(" + f" {kind} ".join(parts) + ")"


@FUZZ
@given(boolean_text())
def test_fuzz_combinators_match_reference(text: str) -> None:
    tree = parse(text)
    predicate = compile_predicate(tree)
    for event in (*ALL_EVENTS, V4_MAPPED):
        assert predicate(event) is _reference(tree, event)

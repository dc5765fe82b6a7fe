"""Compiled layout templates give exactly what the generic walker gives, or step aside."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.unit.netlink.builders import (
    ATTRS_START,
    be64,
    counters,
    ct_message,
    labels,
    nest,
    protoinfo,
    scalar32,
    timestamp,
    tuple_attr,
)
from tests.unit.netlink.corpus import all_messages

from conntrail.model import AF_INET, AF_INET6, EventKind, FlowEvent
from conntrail.netlink import conntrack
from conntrail.netlink.conntrack import CtAttr, ProtoInfoAttr, decode_datagram, decode_flow
from conntrail.netlink.template import compile_template
from conntrail.netlink.wire import pack_attr

HELPERS: dict[str, object] = {"_v4": conntrack._ipv4, "_v6": conntrack._ipv6,
                              "_status": conntrack._status}


def _is_flow_message(message: bytes) -> bool:
    """ctnetlink NEW or DELETE (nlmsg type 0x0100 / 0x0102, little-endian on the wire)."""
    return message[5] == 1 and message[4] in (0, 2)


def _both_ways(message: bytes) -> tuple[FlowEvent | None, FlowEvent]:
    """(template result or None, walker result) for one ctnetlink message."""
    end = len(message)
    generic = FlowEvent(EventKind.NEW, decode_flow(message, ATTRS_START, end), "ns", 7)
    template = compile_template(message, ATTRS_START, end, HELPERS)
    if template is None:
        return None, generic
    assert template.headers(message, ATTRS_START) == template.signature
    built = template.build(template.values(message, ATTRS_START), EventKind.NEW, "ns", 7)
    return built, generic


def test_every_corpus_message_agrees() -> None:
    compiled = 0
    for message in all_messages():
        if not _is_flow_message(message):
            continue
        built, generic = _both_ways(message)
        if built is not None:
            compiled += 1
            assert built == generic
    assert compiled == 124  # every flow message of the corpus has a modelled layout


def test_datagram_path_uses_templates_and_agrees() -> None:
    messages = [m for m in all_messages() if _is_flow_message(m)]
    first = [decode_datagram(m, "n", 1) for m in messages]  # learns
    assert conntrack._TEMPLATES
    again = [decode_datagram(m, "n", 1) for m in messages]  # uses the templates
    assert again == first


def test_template_refuses_a_different_layout() -> None:
    base = tuple_attr(CtAttr.TUPLE_ORIG, AF_INET, 17, "198.18.0.1", "198.18.0.2", 1, 2)
    message = ct_message(base + scalar32(CtAttr.ID, 5) + scalar32(CtAttr.MARK, 1))
    template = compile_template(message, ATTRS_START, len(message), HELPERS)
    assert template is not None
    swapped = ct_message(base + scalar32(CtAttr.MARK, 1) + scalar32(CtAttr.ID, 5))
    assert len(swapped) == len(message)
    assert template.headers(swapped, ATTRS_START) != template.signature


def test_strings_are_left_to_the_walker() -> None:
    helper = nest(CtAttr.HELP, pack_attr(1, b"ftp\0"))
    message = ct_message(tuple_attr(CtAttr.TUPLE_ORIG, AF_INET, 6, "198.18.0.1",
                                    "198.18.0.2", 1, 21) + helper)
    assert compile_template(message, ATTRS_START, len(message), HELPERS) is None


def _addresses(family: int) -> st.SearchStrategy[str]:
    bits = 32 if family == AF_INET else 128
    factory = ipaddress.IPv4Address if family == AF_INET else ipaddress.IPv6Address
    return st.integers(0, 2**bits - 1).map(lambda n: str(factory(n)))


@st.composite
def _messages(draw: st.DrawFn) -> bytes:
    family = draw(st.sampled_from([AF_INET, AF_INET6]))
    proto = draw(st.sampled_from([6, 17, 132, 136, 1, 58]))
    src, dst, nat = draw(_addresses(family)), draw(_addresses(family)), draw(_addresses(family))
    ports = draw(st.tuples(*[st.integers(0, 65535)] * 3))
    icmp = (draw(st.integers(0, 255)), draw(st.integers(0, 255)), ports[0])
    ported = proto not in (1, 58)

    def tuple_of(which: int, a: str, b: str, sport: int, dport: int) -> bytes:
        if ported:
            return tuple_attr(which, family, proto, a, b, sport, dport)
        return tuple_attr(which, family, proto, a, b, icmp=icmp)

    attrs = tuple_of(CtAttr.TUPLE_ORIG, src, dst, ports[0], ports[1])
    attrs += tuple_of(CtAttr.TUPLE_REPLY, dst, nat, ports[1], ports[2])
    optional = [
        scalar32(CtAttr.ID, draw(st.integers(0, 2**32 - 1))),
        scalar32(CtAttr.STATUS, draw(st.integers(0, 2**16 - 1))),
        scalar32(CtAttr.TIMEOUT, draw(st.integers(0, 2**32 - 1))),
        scalar32(CtAttr.MARK, draw(st.integers(0, 2**32 - 1))),
        protoinfo(ProtoInfoAttr.TCP, draw(st.integers(0, 9))),
        counters(CtAttr.COUNTERS_ORIG, draw(st.integers(0, 2**64 - 1)), 5),
        counters(CtAttr.COUNTERS_REPLY, 3, draw(st.integers(0, 2**32 - 1)), bits=32),
        timestamp(draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**63))),
        labels(draw(st.integers(0, 2**128 - 1))),
        pack_attr(CtAttr.TIMESTAMP_EVENT, be64(draw(st.integers(0, 2**64 - 1)))),
    ]
    chosen = draw(st.lists(st.sampled_from(optional), max_size=len(optional) + 3))
    return ct_message(attrs + b"".join(chosen))


@settings(max_examples=400, deadline=None)
@given(_messages())
def test_random_messages_agree(message: bytes) -> None:
    """Repeated attributes are allowed here: the template must then step aside."""
    built, generic = _both_ways(message)
    assert built is None or built == generic


def test_repeated_attributes_are_left_to_the_walker() -> None:
    orig = tuple_attr(CtAttr.TUPLE_ORIG, AF_INET, 6, "198.18.0.1", "198.18.0.2", 1, 2)
    for extra in (protoinfo(ProtoInfoAttr.TCP, 1) + protoinfo(ProtoInfoAttr.DCCP, 4),
                  orig, counters(CtAttr.COUNTERS_ORIG, 1, 2) * 2):
        message = ct_message(orig + extra)
        assert compile_template(message, ATTRS_START, len(message), HELPERS) is None

"""Properties of the ctnetlink codec, checked with Hypothesis.

(a) no input makes decode_datagram fail other than with DecodeError;
(b) dump requests survive encode → decode;
(c) several messages in one datagram decode as they do one by one;
(d) the fixed-layout fast path and the generic attribute walker agree.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st
from tests.unit.netlink.builders import ct_message, nest, tuple_members
from tests.unit.netlink.corpus import all_datagrams, all_messages
from tests.unit.netlink.recorded import ci

from conntrail.errors import DecodeError
from conntrail.model import AF_INET, AF_INET6, FlowEvent, FlowTuple
from conntrail.netlink.conntrack import (
    Control,
    DumpRequest,
    _fast_tuple,
    decode_datagram,
    decode_dump_request,
    decode_tuple,
    encode_dump_request,
)
from conntrail.netlink.wire import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, pack_attr, split_messages

U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)


def decodes_or_refuses(data: bytes) -> None:
    """decode_datagram returns flow events and control messages, or raises DecodeError."""
    try:
        items = decode_datagram(data, "fuzz", 1)
    except DecodeError as exc:
        assert 0 <= exc.offset <= len(data), (exc.offset, len(data))
        return
    assert isinstance(items, list)
    assert all(isinstance(item, FlowEvent | Control) for item in items)


# --- (a) any bytes ------------------------------------------------------------------------

@ci(500)
@given(st.binary(max_size=600))
def test_random_bytes_decode_or_refuse(data: bytes) -> None:
    decodes_or_refuses(data)


@st.composite
def mutated_datagrams(draw: st.DrawFn) -> bytes:
    """A real corpus datagram with bytes flipped, cut short, or a slice removed."""
    data = bytearray(draw(st.sampled_from(all_datagrams())))
    for _ in range(draw(st.integers(0, 6))):
        index = draw(st.integers(0, len(data) - 1))
        data[index] ^= draw(st.integers(1, 255))
    cut = draw(st.sampled_from(["none", "truncate", "remove"]))
    if cut == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    elif cut == "remove":
        start = draw(st.integers(0, len(data)))
        data[start:start + draw(st.integers(1, 16))] = b""
    return bytes(data)


@ci(2000)
@given(mutated_datagrams())
def test_mutated_corpus_datagrams_decode_or_refuse(data: bytes) -> None:
    decodes_or_refuses(data)


# Well-framed messages of random attribute trees: they pass the framing and reach every
# attribute decoder, with payloads of every awkward length.
ATTR_TYPES = st.integers(0, 27)
LEAF = st.builds(pack_attr, ATTR_TYPES, st.binary(max_size=20))


def _nested(children: st.SearchStrategy[list[bytes]]) -> st.SearchStrategy[bytes]:
    return st.builds(lambda t, c, flag: pack_attr(t, b"".join(c), nested=flag), ATTR_TYPES,
                     children, st.booleans())


ATTR_TREES = st.recursive(LEAF, lambda kids: _nested(st.lists(kids, max_size=4)),
                          max_leaves=12)


@st.composite
def structured_messages(draw: st.DrawFn) -> bytes:
    """A ctnetlink NEW or DELETE message with random attributes (and often a valid tuple)."""
    attrs = b"".join(draw(st.lists(ATTR_TREES, max_size=6)))
    if draw(st.booleans()):
        attrs = nest(1, tuple_members(AF_INET, 6, "198.18.0.1", "198.18.0.2", 1, 2)) + attrs
    msg_type = draw(st.sampled_from([0x100, 0x102]))
    return ct_message(attrs, msg_type=msg_type, flags=draw(st.sampled_from([0, 0x600, 2])))


@ci(1500)
@given(structured_messages())
def test_random_attribute_trees_decode_or_refuse(data: bytes) -> None:
    decodes_or_refuses(data)


# --- (b) dump requests round trip ------------------------------------------------------------

@st.composite
def dump_requests(draw: st.DrawFn) -> DumpRequest:
    """Any dump request: family AF_UNSPEC/INET/INET6, seq, optional mark, mask, zone."""
    return DumpRequest(draw(st.sampled_from([0, AF_INET, AF_INET6])), draw(U32),
                       draw(st.none() | U32), draw(st.none() | U32), draw(st.none() | U16))


@ci(300)
@given(dump_requests())
def test_dump_request_round_trip(request: DumpRequest) -> None:
    data = encode_dump_request(request)
    (header,) = list(split_messages(data))
    assert header.flags == NLM_F_REQUEST | NLM_F_DUMP | NLM_F_ACK and header.seq == request.seq
    # As the kernel reads it: a mask without a mark means nothing, a mark alone is exact.
    mask = None
    if request.mark is not None:
        mask = 0xFFFFFFFF if request.mark_mask is None else request.mark_mask
    expected = DumpRequest(request.family, request.seq, request.mark, mask, request.zone)
    decoded = decode_dump_request(data)
    assert decoded == expected
    assert encode_dump_request(decoded) == data


# --- (c) splitting ---------------------------------------------------------------------------

@ci(300)
@given(st.lists(st.sampled_from(all_messages()), min_size=2, max_size=8))
def test_concatenated_messages_decode_as_separate_ones(messages: list[bytes]) -> None:
    separately = [item for message in messages for item in decode_datagram(message, "n", 5)]
    assert decode_datagram(b"".join(messages), "n", 5) == separately


# --- (d) fast path and generic path agree ----------------------------------------------------

PORTED = st.sampled_from([6, 17, 132, 136, 33])
V4_ADDRESSES = st.ip_addresses(v=4).map(str)
V6_ADDRESSES = st.ip_addresses(v=6).map(lambda address: ipaddress.IPv6Address(address).compressed)


@st.composite
def ported_tuples(draw: st.DrawFn) -> FlowTuple:
    """An IPv4 or IPv6 tuple of a protocol with ports."""
    family = draw(st.sampled_from([AF_INET, AF_INET6]))
    addresses = V4_ADDRESSES if family == AF_INET else V6_ADDRESSES
    return FlowTuple(family, draw(PORTED), draw(addresses), draw(addresses), draw(U16),
                     draw(U16))


@ci(500)
@given(ported_tuples(), st.binary(max_size=12), st.integers(0, 40), st.binary(max_size=8))
def test_fast_path_and_generic_path_agree(expected: FlowTuple, before: bytes, unknown: int,
                                          trailing: bytes) -> None:
    members = tuple_members(expected.family, expected.proto, expected.src, expected.dst,
                            expected.sport, expected.dport)
    # Somewhere inside a larger buffer, as in a datagram: offsets are absolute.
    data = before + members + b"\xff" * 3
    start, end = len(before), len(before) + len(members)
    assert _fast_tuple(data, start, end) == expected, "the fast path should take this layout"
    assert decode_tuple(data, start, end) == expected
    # A trailing unknown member changes the size: the fast path declines, the walker answers.
    slow = members + pack_attr(4 + unknown, trailing)
    slow_data = before + slow
    assert _fast_tuple(slow_data, len(before), len(slow_data)) is None
    assert decode_tuple(slow_data, len(before), len(slow_data)) == expected

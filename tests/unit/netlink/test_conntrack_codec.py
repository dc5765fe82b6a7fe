"""ctnetlink codec on hand-built messages: what a test kernel cannot produce, and bad input.

Real kernel output is covered by the golden corpus (test_golden.py); here the messages are
built with `pack_attr`/`pack_message` in the kernel's layout, so every offset is known exactly.
"""

from __future__ import annotations

import json
import struct
import sys

import pytest
from tests.unit.netlink.builders import (
    ATTRS_START,
    CT_DELETE,
    CT_GET,
    CT_NEW,
    CTA_HELP_NAME,
    CTA_PROTOINFO_DCCP_HANDSHAKE_SEQ,
    CTA_PROTOINFO_DCCP_ROLE,
    CTA_PROTOINFO_TCP_FLAGS_ORIGINAL,
    CTA_PROTOINFO_TCP_WSCALE_ORIGINAL,
    CTA_SECCTX_NAME,
    CTA_TIMESTAMP_PAD,
    EVENT_NEW_FLAGS,
    NLMSG_HEADER_SIZE,
    be16,
    be32,
    be64,
    both_tuples,
    counters,
    ct_message,
    ip_members,
    labels,
    nest,
    proto_members,
    protoinfo,
    raw_attr,
    raw_header,
    scalar32,
    timestamp,
    tuple_attr,
    tuple_members,
    u8,
)

from conntrail.errors import DecodeError
from conntrail.formats.jsonl import JsonFormat, ecs_document, record_document
from conntrail.model import (
    AF_INET,
    AF_INET6,
    Counters,
    CtStatus,
    EventKind,
    Flow,
    FlowEvent,
    FlowTuple,
)
from conntrail.netlink.conntrack import (
    Control,
    CountersAttr,
    CtAttr,
    IpAttr,
    ProtoAttr,
    ProtoInfoAttr,
    TimestampAttr,
    TupleAttr,
    _fast_tuple,
    decode_datagram,
    decode_dump_request,
    decode_flow,
    decode_tuple,
)
from conntrail.netlink.wire import (
    NLM_F_MULTI,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_NOOP,
    NLMSG_OVERRUN,
    pack_attr,
    pack_message,
)

V4_CLIENT, V4_SERVER = "198.18.1.2", "198.18.2.2"
V6_CLIENT, V6_SERVER = "2001:db8:1::2", "2001:db8:2::2"
BASE_STATUS = CtStatus.CONFIRMED | CtStatus.SEEN_REPLY | CtStatus.ASSURED


def only_event(data: bytes) -> FlowEvent:
    """The single flow event a datagram must hold."""
    items = decode_datagram(data, "ns1", 42)
    assert len(items) == 1 and isinstance(items[0], FlowEvent), items
    return items[0]


def decode_error(data: bytes) -> DecodeError:
    """The DecodeError that decoding `data` must raise."""
    with pytest.raises(DecodeError) as info:
        decode_datagram(data)
    return info.value


# --- what this kernel cannot produce ----------------------------------------------------------

def test_dccp_with_ports_and_state() -> None:
    attrs = (both_tuples(AF_INET, 33, V4_CLIENT, V4_SERVER, 41000, 5001)
             + scalar32(CtAttr.STATUS, BASE_STATUS)
             + protoinfo(ProtoInfoAttr.DCCP, 4, pack_attr(CTA_PROTOINFO_DCCP_ROLE, u8(1)),
                         pack_attr(CTA_PROTOINFO_DCCP_HANDSHAKE_SEQ, be64(0x1000000001))))
    flow = only_event(ct_message(attrs, flags=0)).flow
    assert flow.orig == FlowTuple(AF_INET, 33, V4_CLIENT, V4_SERVER, 41000, 5001)
    assert flow.reply == FlowTuple(AF_INET, 33, V4_SERVER, V4_CLIENT, 5001, 41000)
    assert flow.proto_state == 4 and flow.state_name == "OPEN"


def test_dccp_ipv6_tuple_takes_the_fast_path() -> None:
    members = tuple_members(AF_INET6, 33, V6_CLIENT, V6_SERVER, 41000, 5001)
    assert _fast_tuple(members, 0, len(members)) == FlowTuple(AF_INET6, 33, V6_CLIENT,
                                                              V6_SERVER, 41000, 5001)


def test_gre_keys_are_reported_as_ports() -> None:
    # nf_conntrack_proto_gre: tuple_to_nlattr = nf_ct_port_tuple_to_nlattr (keys as ports).
    attrs = both_tuples(AF_INET, 47, V4_CLIENT, V4_SERVER, 0xABCD, 0x1234)
    flow = only_event(ct_message(attrs)).flow
    assert (flow.orig.sport, flow.orig.dport) == (0xABCD, 0x1234)
    assert (flow.reply is not None and (flow.reply.sport, flow.reply.dport) == (0x1234, 0xABCD))
    assert flow.orig.icmp_type is None and flow.state_name is None


def test_helper_and_security_context() -> None:
    attrs = (both_tuples(AF_INET, 6, V4_CLIENT, V4_SERVER, 40000, 21)
             + nest(CtAttr.HELP, pack_attr(CTA_HELP_NAME, b"ftp\0"))
             + nest(CtAttr.SECCTX,
                    pack_attr(CTA_SECCTX_NAME, b"system_u:object_r:unlabeled_t:s0\0")))
    flow = only_event(ct_message(attrs)).flow
    assert flow.helper == "ftp"
    assert flow.secctx == "system_u:object_r:unlabeled_t:s0"


def test_32_bit_counters() -> None:
    attrs = (both_tuples(AF_INET, 17, V4_CLIENT, V4_SERVER, 5000, 53)
             + counters(CtAttr.COUNTERS_ORIG, 7, 420, bits=32)
             + counters(CtAttr.COUNTERS_REPLY, 0xFFFFFFFF, 0xFFFFFFFE, bits=32))
    flow = only_event(ct_message(attrs, msg_type=CT_DELETE, flags=0)).flow
    assert flow.counters_orig == Counters(7, 420)
    assert flow.counters_reply == Counters(0xFFFFFFFF, 0xFFFFFFFE)


def test_tuple_zone_and_flow_zone() -> None:
    attrs = (tuple_attr(CtAttr.TUPLE_ORIG, AF_INET, 17, V4_CLIENT, V4_SERVER, 5000, 53,
                        zone=9)
             + tuple_attr(CtAttr.TUPLE_REPLY, AF_INET, 17, V4_SERVER, V4_CLIENT, 53, 5000)
             + pack_attr(CtAttr.ZONE, be16(7)))
    flow = only_event(ct_message(attrs)).flow
    assert flow.orig == FlowTuple(AF_INET, 17, V4_CLIENT, V4_SERVER, 5000, 53, zone=9)
    assert flow.reply is not None and flow.reply.zone is None
    assert flow.zone == 7


def test_icmpv6_tuple() -> None:
    attrs = (tuple_attr(CtAttr.TUPLE_ORIG, AF_INET6, 58, V6_CLIENT, V6_SERVER,
                        icmp=(128, 0, 0x1234))
             + tuple_attr(CtAttr.TUPLE_REPLY, AF_INET6, 58, V6_SERVER, V6_CLIENT,
                          icmp=(129, 0, 0x1234)))
    flow = only_event(ct_message(attrs, family=AF_INET6)).flow
    assert flow.orig == FlowTuple(AF_INET6, 58, V6_CLIENT, V6_SERVER, icmp_type=128,
                                  icmp_code=0, icmp_id=0x1234)
    assert flow.reply is not None and flow.reply.icmp_type == 129


FULL_ATTRS = (both_tuples(AF_INET, 6, V4_CLIENT, V4_SERVER, 40000, 443)
              + scalar32(CtAttr.STATUS, BASE_STATUS)
              + protoinfo(ProtoInfoAttr.TCP, 3,
                          pack_attr(CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, u8(7)),
                          pack_attr(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, be16(0x0A0A)))
              + scalar32(CtAttr.TIMEOUT, 431999)
              + scalar32(CtAttr.MARK, 0x2A)
              + counters(CtAttr.COUNTERS_ORIG, 6, 400)
              + counters(CtAttr.COUNTERS_REPLY, 5, 1200)
              + scalar32(CtAttr.USE, 1)
              + scalar32(CtAttr.ID, 0xDEADBEEF)
              + pack_attr(CtAttr.ZONE, be16(7))
              + timestamp(1_000, 2_000)
              + labels(1 << 5))

FULL_FLOW = Flow(orig=FlowTuple(AF_INET, 6, V4_CLIENT, V4_SERVER, 40000, 443),
                 reply=FlowTuple(AF_INET, 6, V4_SERVER, V4_CLIENT, 443, 40000),
                 status=BASE_STATUS, proto_state=3, timeout=431999, mark=0x2A, zone=7,
                 labels=1 << 5, ct_id=0xDEADBEEF, use=1, counters_orig=Counters(6, 400),
                 counters_reply=Counters(5, 1200), start_ns=1_000, stop_ns=2_000)


def test_every_common_attribute() -> None:
    event = only_event(ct_message(FULL_ATTRS, msg_type=CT_DELETE, flags=0))
    assert event == FlowEvent(EventKind.DESTROY, FULL_FLOW, "ns1", 42)


# --- unknown attributes are skipped ----------------------------------------------------------

def test_unknown_and_unhandled_attributes_are_skipped() -> None:
    odd_tuple = nest(
        CtAttr.TUPLE_ORIG,
        nest(TupleAttr.IP, ip_members(AF_INET, V4_CLIENT, V4_SERVER), pack_attr(30, b"??")),
        nest(TupleAttr.PROTO, proto_members(6, 40000, 443), pack_attr(40, be32(1))),
        pack_attr(9, b"\x01\x02\x03"))
    noisy = (pack_attr(0, b"unspec")
             + odd_tuple
             + tuple_attr(CtAttr.TUPLE_REPLY, AF_INET, 6, V4_SERVER, V4_CLIENT, 443, 40000)
             + nest(CtAttr.TUPLE_MASTER, tuple_members(AF_INET, 6, "198.18.9.9", V4_SERVER,
                                                       1, 2))
             + nest(CtAttr.NAT_SRC, pack_attr(1, be32(0)))
             + nest(CtAttr.SEQ_ADJ_ORIG, pack_attr(1, be32(5)), pack_attr(2, be32(6)))
             + scalar32(CtAttr.SECMARK, 3)
             + scalar32(CtAttr.MARK_MASK, 0xFF)
             + pack_attr(CtAttr.LABELS_MASK, bytes(16))
             + nest(CtAttr.SYNPROXY, pack_attr(1, be32(1)))
             + scalar32(CtAttr.STATUS_MASK, 0xFFFF)
             + pack_attr(60, b"future attribute")
             + nest(61, pack_attr(1, be64(1)))
             + scalar32(CtAttr.STATUS, BASE_STATUS)
             + nest(CtAttr.PROTOINFO, nest(9, pack_attr(1, u8(99))),
                    nest(ProtoInfoAttr.TCP, pack_attr(9, b"x"), pack_attr(1, u8(3))))
             + nest(CtAttr.COUNTERS_ORIG, pack_attr(5, b""),
                    pack_attr(CountersAttr.PACKETS, be64(6)),
                    pack_attr(CountersAttr.BYTES, be64(400)), pack_attr(9, b"xx"))
             + nest(CtAttr.TIMESTAMP, pack_attr(CTA_TIMESTAMP_PAD, b""),
                    pack_attr(TimestampAttr.START, be64(1_000)), pack_attr(9, b"")))
    flow = only_event(ct_message(noisy)).flow
    expected = Flow(orig=FlowTuple(AF_INET, 6, V4_CLIENT, V4_SERVER, 40000, 443),
                    reply=FlowTuple(AF_INET, 6, V4_SERVER, V4_CLIENT, 443, 40000),
                    status=BASE_STATUS, proto_state=3, counters_orig=Counters(6, 400),
                    start_ns=1_000)
    assert flow == expected


def test_other_subsystems_and_message_types_are_skipped() -> None:
    expectation = pack_message((2 << 8) | 0, 0, 0, b"\x02\x00\x00\x00" + pack_attr(1, b"x"))
    stats = pack_message((1 << 8) | 4, 0, 0, b"\x02\x00\x00\x00" + scalar32(1, 5))
    unknown_control = pack_message(15, 0, 0, b"")
    event = ct_message(both_tuples(AF_INET, 17, V4_CLIENT, V4_SERVER, 1, 2))
    items = decode_datagram(expectation + stats + unknown_control + event)
    assert [type(item) for item in items] == [FlowEvent]


# --- unusual order: the fast path declines, the generic path answers the same -----------------

def _reordered_tuples() -> list[tuple[str, bytes]]:
    ip_v4 = ip_members(AF_INET, V4_CLIENT, V4_SERVER)
    proto = proto_members(6, 40000, 443)
    dst_first = (pack_attr(IpAttr.V4_DST, bytes([198, 18, 2, 2]))
                 + pack_attr(IpAttr.V4_SRC, bytes([198, 18, 1, 2])))
    ports_first = (pack_attr(ProtoAttr.DST_PORT, be16(443))
                   + pack_attr(ProtoAttr.SRC_PORT, be16(40000))
                   + pack_attr(ProtoAttr.NUM, u8(6)))
    return [
        ("proto nest before ip nest", nest(TupleAttr.PROTO, proto) + nest(TupleAttr.IP, ip_v4)),
        ("destination before source", nest(TupleAttr.IP, dst_first)
         + nest(TupleAttr.PROTO, proto)),
        ("ports before protocol", nest(TupleAttr.IP, ip_v4) + nest(TupleAttr.PROTO, ports_first)),
        ("nests without NLA_F_NESTED", pack_attr(TupleAttr.IP, ip_v4)
         + pack_attr(TupleAttr.PROTO, proto)),
        ("trailing unknown member", tuple_members(AF_INET, 6, V4_CLIENT, V4_SERVER, 40000, 443,
                                                  extra=pack_attr(9, b""))),
    ]


@pytest.mark.parametrize("members", [m for _, m in _reordered_tuples()],
                         ids=[name for name, _ in _reordered_tuples()])
def test_unusual_order_declines_fast_path_with_same_answer(members: bytes) -> None:
    canonical = tuple_members(AF_INET, 6, V4_CLIENT, V4_SERVER, 40000, 443)
    expected = FlowTuple(AF_INET, 6, V4_CLIENT, V4_SERVER, 40000, 443)
    assert _fast_tuple(canonical, 0, len(canonical)) == expected
    assert _fast_tuple(members, 0, len(members)) is None
    assert decode_tuple(members, 0, len(members)) == expected


def test_unusual_top_level_order() -> None:
    reply_first = (scalar32(CtAttr.ID, 0xDEADBEEF)
                   + tuple_attr(CtAttr.TUPLE_REPLY, AF_INET, 6, V4_SERVER, V4_CLIENT, 443, 40000)
                   + labels(1 << 5) + timestamp(1_000, 2_000)
                   + counters(CtAttr.COUNTERS_REPLY, 5, 1200)
                   + counters(CtAttr.COUNTERS_ORIG, 6, 400)
                   + pack_attr(CtAttr.ZONE, be16(7)) + scalar32(CtAttr.USE, 1)
                   + scalar32(CtAttr.MARK, 0x2A) + scalar32(CtAttr.TIMEOUT, 431999)
                   + protoinfo(ProtoInfoAttr.TCP, 3)
                   + tuple_attr(CtAttr.TUPLE_ORIG, AF_INET, 6, V4_CLIENT, V4_SERVER, 40000, 443)
                   + scalar32(CtAttr.STATUS, BASE_STATUS))
    message = ct_message(reply_first)
    assert decode_flow(message, ATTRS_START, len(message)) == FULL_FLOW


# --- malformed input: DecodeError at the exact offset of the bad header ----------------------

GOOD = ct_message(both_tuples(AF_INET, 17, V4_CLIENT, V4_SERVER, 5000, 53))
ORIG_TUPLE = tuple_attr(CtAttr.TUPLE_ORIG, AF_INET, 17, V4_CLIENT, V4_SERVER, 5000, 53)


def test_truncated_nlmsghdr() -> None:
    error = decode_error(b"\x14\x00\x00\x00\x00\x01")
    assert error.offset == 0
    error = decode_error(GOOD + b"\x14\x00\x00\x00\x00\x01\x00\x00")
    assert error.offset == len(GOOD)


@pytest.mark.parametrize("length", [0, 8, 15, 200])
def test_nlmsghdr_length_invalid(length: int) -> None:
    bad = raw_header(length, CT_NEW) + bytes(24)
    error = decode_error(GOOD + bad)
    assert error.offset == len(GOOD)
    assert error.msg_type == CT_NEW


def test_truncated_nfgenmsg() -> None:
    error = decode_error(raw_header(18, CT_NEW) + b"\x02\x00")
    assert error.offset == NLMSG_HEADER_SIZE
    assert error.msg_type == CT_NEW


def test_attribute_length_beyond_end() -> None:
    bad = raw_attr(200, CtAttr.MARK, be32(1))
    error = decode_error(ct_message(ORIG_TUPLE + bad))
    assert error.offset == ATTRS_START + len(ORIG_TUPLE)
    assert error.msg_type == CT_NEW


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_attribute_length_below_header(length: int) -> None:
    bad = raw_attr(length, CtAttr.MARK, b"\0\0\0\0")
    error = decode_error(ct_message(ORIG_TUPLE + bad))
    assert error.offset == ATTRS_START + len(ORIG_TUPLE)


def test_mark_of_three_bytes() -> None:
    status = scalar32(CtAttr.STATUS, BASE_STATUS)
    error = decode_error(ct_message(ORIG_TUPLE + status + pack_attr(CtAttr.MARK, b"\0\0\x2a")))
    assert error.offset == ATTRS_START + len(ORIG_TUPLE) + len(status)
    assert "CTA_MARK" in error.reason


def test_tuple_missing_its_proto() -> None:
    status = scalar32(CtAttr.STATUS, BASE_STATUS)
    no_proto = nest(CtAttr.TUPLE_ORIG,
                    nest(TupleAttr.IP, ip_members(AF_INET, V4_CLIENT, V4_SERVER)))
    error = decode_error(ct_message(status + no_proto))
    assert error.offset == ATTRS_START + len(status)
    assert "proto" in error.reason


def test_tuple_missing_its_addresses() -> None:
    no_ip = nest(CtAttr.TUPLE_ORIG, nest(TupleAttr.PROTO, proto_members(17, 1, 2)))
    error = decode_error(ct_message(no_ip))
    assert error.offset == ATTRS_START


def test_bad_attribute_inside_nests_reports_absolute_offset() -> None:
    # CTA_TUPLE_ORIG at 20, its CTA_TUPLE_IP at 24, CTA_IP_V4_SRC at 28 claiming 40 bytes.
    inner = raw_attr(40, IpAttr.V4_SRC, bytes([198, 18, 1, 2]))
    bad_tuple = nest(CtAttr.TUPLE_ORIG, nest(TupleAttr.IP, inner),
                     nest(TupleAttr.PROTO, proto_members(17, 1, 2)))
    error = decode_error(ct_message(bad_tuple))
    assert error.offset == ATTRS_START + 8


def test_short_address_inside_nest() -> None:
    short = pack_attr(IpAttr.V4_SRC, b"\xc6\x12\x01")
    bad_tuple = nest(CtAttr.TUPLE_ORIG,
                     nest(TupleAttr.IP, short, pack_attr(IpAttr.V4_DST, bytes(4))),
                     nest(TupleAttr.PROTO, proto_members(17, 1, 2)))
    error = decode_error(ct_message(bad_tuple))
    assert error.offset == ATTRS_START + 8


@pytest.mark.parametrize(("attr", "payload", "depth"), [
    (CtAttr.COUNTERS_ORIG, pack_attr(CountersAttr.PACKETS, be32(1)), 4),
    (CtAttr.TIMESTAMP, pack_attr(TimestampAttr.STOP, be32(1)), 4),
    (CtAttr.PROTOINFO, nest(ProtoInfoAttr.TCP, pack_attr(1, b"")), 8),
])
def test_short_members_of_nests(attr: int, payload: bytes, depth: int) -> None:
    error = decode_error(ct_message(ORIG_TUPLE + nest(attr, payload)))
    assert error.offset == ATTRS_START + len(ORIG_TUPLE) + depth


def test_error_in_second_message_reports_datagram_offset() -> None:
    bad = ct_message(ORIG_TUPLE + pack_attr(CtAttr.MARK, b"\0\0\x2a"))
    error = decode_error(GOOD + bad)
    assert error.offset == len(GOOD) + ATTRS_START + len(ORIG_TUPLE)


def test_message_without_original_tuple() -> None:
    error = decode_error(ct_message(scalar32(CtAttr.STATUS, BASE_STATUS)))
    assert error.offset == ATTRS_START  # the start of the attributes that lack it
    assert error.msg_type == CT_NEW


def test_trailing_bytes_shorter_than_an_attribute_are_ignored() -> None:
    # Like the kernel's nla_for_each_attr: fewer than 4 bytes cannot hold an attribute.
    message = ct_message(both_tuples(AF_INET, 17, V4_CLIENT, V4_SERVER, 5000, 53) + b"\0\0")
    assert isinstance(decode_datagram(message)[0], FlowEvent)


# --- control messages and event kinds ---------------------------------------------------------

def test_done_error_ack_overrun_noop() -> None:
    request = raw_header(36, CT_GET, 0x305, 77, 0)
    datagram = (pack_message(NLMSG_DONE, NLM_F_MULTI, 77, struct.pack("=i", 0))
                + pack_message(NLMSG_ERROR, 0, 78, struct.pack("=i", -16) + request)
                + pack_message(NLMSG_ERROR, 0x100, 79, struct.pack("=i", 0) + request)
                + pack_message(NLMSG_OVERRUN, 0, 80, b"")
                + pack_message(NLMSG_NOOP, 0, 81, b""))
    assert decode_datagram(datagram) == [Control("done", 77), Control("error", 78, 16),
                                         Control("ack", 79, 0), Control("overrun", 80)]


def test_truncated_nlmsgerr() -> None:
    error = decode_error(GOOD + pack_message(NLMSG_ERROR, 0, 1, b"\xf0\xff"))
    assert error.offset == len(GOOD) + NLMSG_HEADER_SIZE
    assert error.msg_type == NLMSG_ERROR


def test_dump_replies_then_done_keep_their_order() -> None:
    attrs = both_tuples(AF_INET, 17, V4_CLIENT, V4_SERVER, 5000, 53)
    datagram = (ct_message(attrs, flags=NLM_F_MULTI, seq=9, pid=1234)
                + ct_message(attrs, flags=NLM_F_MULTI, seq=9, pid=1234)
                + pack_message(NLMSG_DONE, NLM_F_MULTI, 9, struct.pack("=i", 0), 1234))
    items = decode_datagram(datagram)
    assert [getattr(item, "kind", None) for item in items] == [
        EventKind.DUMP, EventKind.DUMP, "done"]


@pytest.mark.parametrize(("msg_type", "flags", "seq", "kind"), [
    (CT_NEW, EVENT_NEW_FLAGS, 0, EventKind.NEW),
    (CT_NEW, 0, 0, EventKind.UPDATE),
    (CT_DELETE, 0, 0, EventKind.DESTROY),
    (CT_NEW, NLM_F_MULTI, 5, EventKind.DUMP),
    (CT_NEW, 0, 5, EventKind.DUMP),  # a GET reply for one entry
])
def test_event_kind(msg_type: int, flags: int, seq: int, kind: EventKind) -> None:
    data = ct_message(both_tuples(AF_INET, 6, V4_CLIENT, V4_SERVER, 1, 2), msg_type=msg_type,
                      flags=flags, seq=seq)
    assert only_event(data).kind is kind


def test_dump_request_decoder_refuses_other_messages() -> None:
    with pytest.raises(DecodeError) as info:
        decode_dump_request(GOOD)
    assert info.value.offset == 0


# --- labels: the kernel's bitmap is 128 bits ---------------------------------------------------

LABELS_5_AND_100 = (1 << 100) | (1 << 5)


def test_labels_beyond_64_bits_decode() -> None:
    attrs = both_tuples(AF_INET, 17, V4_CLIENT, V4_SERVER, 1, 2) + labels(LABELS_5_AND_100)
    flow = only_event(ct_message(attrs)).flow
    assert flow.labels == LABELS_5_AND_100
    assert ecs_document(FlowEvent(EventKind.NEW, flow))["conntrail"]["ct"]["labels"] == \
        hex(LABELS_5_AND_100)


def test_labels_beyond_64_bits_render_in_record_layout() -> None:
    """orjson refuses integers past 64 bits: the record layout must render labels as text
    (it once passed the raw int and crashed on `ct label set 100`)."""
    flow = Flow(orig=FlowTuple(AF_INET, 17, V4_CLIENT, V4_SERVER, 1, 2),
                labels=LABELS_5_AND_100)
    event = FlowEvent(EventKind.NEW, flow)
    assert record_document(event)["labels"] is not None
    rendered = json.loads(JsonFormat("record")(event))["labels"]
    value = int(rendered, 16) if isinstance(rendered, str) else rendered
    assert value == LABELS_5_AND_100


@pytest.mark.skipif(sys.byteorder != "little", reason="bitmap words in host order")
def test_labels_words_are_host_order_longs() -> None:
    raw = (1 << 5).to_bytes(8, "little") + (1 << 36).to_bytes(8, "little")
    attrs = both_tuples(AF_INET, 17, V4_CLIENT, V4_SERVER, 1, 2) + pack_attr(CtAttr.LABELS, raw)
    assert only_event(ct_message(attrs)).flow.labels == (1 << 100) | (1 << 5)

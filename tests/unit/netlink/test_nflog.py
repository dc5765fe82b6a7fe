"""nfnetlink_log codec: recorded kernel datagrams, hand-built headers, bad input, properties.

tests/data/nflog/*.hex are real datagrams recorded on kernel 6.18 (their headers say which
rules, processes and uids made them); each has a golden `<case>.json`, one line per decoded
packet with its `packet_tuple`. After a deliberate decoder change rewrite the goldens with
`python3 -m pytest tests/unit/netlink/test_nflog.py --regen-golden` and review the diff.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.unit.netlink.builders import be16, be32, nest, tuple_attr
from tests.unit.netlink.recorded import DATA_ROOT, ci, datagrams

from conntrail.errors import DecodeError
from conntrail.model import AF_INET, AF_INET6, Flow, FlowTuple
from conntrail.netlink.conntrack import CtAttr
from conntrail.netlink.nflog import (
    TYPE_CONFIG,
    TYPE_PACKET,
    CfgCmd,
    CfgFlag,
    CopyMode,
    Hook,
    NflogConfig,
    NflogPacket,
    NfulaAttr,
    NfulaCfg,
    PacketTuple,
    decode_packet,
    decode_packets,
    encode_bind,
    encode_config,
    encode_unbind,
    packet_tuple,
)
from conntrail.netlink.nftables import decode_acks
from conntrail.netlink.wire import (
    NFGENMSG,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSGHDR,
    iter_attrs,
    pack_attr,
    pack_message,
    split_messages,
)

DATA = DATA_ROOT / "nflog"
recording = functools.partial(datagrams, DATA)  # a recording's datagrams, by name
PACKET_CASES = sorted(path.stem for path in DATA.glob("*.hex") if path.stem != "config_answers")
ATTRS = NLMSGHDR.size + NFGENMSG.size  # first attribute of a one-message datagram: 20




def as_json(packet: NflogPacket) -> str:
    """One golden line: every field (bytes as hex), plus the packet's tuple."""
    doc: dict[str, Any] = {}
    for name, value in packet._asdict().items():
        if isinstance(value, bytes):
            doc[name] = value.hex()
        elif isinstance(value, Flow):
            doc[name] = {"ct_id": value.ct_id, "orig": value.orig._asdict()}
        elif name == "unknown":
            doc[name] = [[attr, raw.hex()] for attr, raw in value]
        else:
            doc[name] = value
    family = packet.ip_family
    found = packet_tuple(packet.payload, family) if packet.payload and family else None
    doc["tuple"] = found._asdict() if found is not None else None
    return json.dumps(doc, sort_keys=True)


# --- recorded datagrams ------------------------------------------------------------------------

@pytest.fixture
def regen_golden(request: pytest.FixtureRequest) -> bool:
    """True when run with --regen-golden (tests/conftest.py)."""
    return bool(request.config.getoption("--regen-golden"))


@pytest.mark.parametrize("name", PACKET_CASES)
def test_recording_matches_golden(name: str, regen_golden: bool) -> None:
    actual = [as_json(packet) for datagram in recording(name)
              for packet in decode_packets(datagram)]
    golden = DATA / f"{name}.json"
    if regen_golden:
        golden.write_text("".join(line + "\n" for line in actual), encoding="utf-8")
    assert golden.exists(), f"{golden.name} missing: run with --regen-golden to create it"
    assert actual == golden.read_text(encoding="utf-8").splitlines()


def test_the_recordings_cover_every_case() -> None:
    assert set(PACKET_CASES) == {
        "udp_ipv4", "udp_ipv6", "tcp_ipv4", "tcp_ipv6", "icmp_ipv4", "icmpv6_ipv6",
        "dstopts_ipv6", "prerouting_ipv4", "batch_ipv4"}


@pytest.mark.parametrize(("name", "expected"), [
    ("udp_ipv4", PacketTuple(AF_INET, 17, "198.18.0.1", "198.18.0.2", 35149, 53)),
    ("udp_ipv6", PacketTuple(AF_INET6, 17, "2001:db8::1", "2001:db8::2", 43412, 53)),
    ("tcp_ipv4", PacketTuple(AF_INET, 6, "198.18.0.1", "198.18.0.2", 40632, 8080)),
    ("tcp_ipv6", PacketTuple(AF_INET6, 6, "2001:db8::1", "2001:db8::2", 57446, 8080)),
    ("icmp_ipv4", PacketTuple(AF_INET, 1, "198.18.0.1", "198.18.0.2", None, None, 8, 0,
                              56414)),
    ("icmpv6_ipv6", PacketTuple(AF_INET6, 58, "2001:db8::1", "2001:db8::2", None, None, 128,
                                0, 56415)),
    ("dstopts_ipv6", PacketTuple(AF_INET6, 17, "2001:db8::1", "2001:db8::2", 53980, 53)),
])
def test_output_records_carry_ids_and_the_clients_tuple(name: str,
                                                        expected: PacketTuple) -> None:
    """The ports and ids are those the clients printed (see each recording's header)."""
    [datagram] = recording(name)
    [packet] = decode_packets(datagram)
    assert (packet.group, packet.hook, packet.prefix, packet.outdev) == \
        (6317, Hook.LOCAL_OUT, "conntrail", 2)
    assert (packet.uid, packet.gid) == ((0, 0) if name == "dstopts_ipv6" else (4242, 4343))
    assert packet.timestamp_ns is None  # nfnetlink_log stamps only prerouting..forward
    assert packet.ct is None and packet.ct_id is None
    assert packet.family == expected.family == packet.ip_family
    assert packet.hw_protocol == (0x0800 if expected.family == AF_INET else 0x86DD)
    assert packet.payload is not None
    assert packet_tuple(packet.payload, expected.family) == expected


def test_a_prerouting_record_has_link_layer_attributes_and_no_ids() -> None:
    [datagram] = recording("prerouting_ipv4")
    [packet] = decode_packets(datagram)
    assert packet.hook == Hook.PRE_ROUTING and packet.prefix == "in" and packet.mark == 42
    assert (packet.uid, packet.gid, packet.outdev, packet.indev) == (None, None, None, 2)
    assert packet.hwaddr == bytes.fromhex("020000000002")  # the sender's MAC
    assert (packet.hwtype, packet.hwlen) == (1, 14)  # ARPHRD_ETHER, an Ethernet header
    assert packet.hwheader == bytes.fromhex("020000000001" "020000000002" "0800")
    assert packet.timestamp_ns is not None and packet.timestamp_ns % 1000 == 0  # from µs


def test_a_batch_is_three_messages_then_done() -> None:
    [datagram] = recording("batch_ipv4")
    types = [header.msg_type for header in split_messages(datagram)]
    assert types == [TYPE_PACKET] * 3 + [NLMSG_DONE]
    packets = decode_packets(datagram)
    assert [p.seq for p in packets] == [8, 9, 10]
    found = [packet_tuple(p.payload or b"", AF_INET) for p in packets]
    assert [t.dport if t else None for t in found] == [53, 54, 55]


def test_sequence_numbers_count_every_record_of_the_group() -> None:
    order = ["udp_ipv4", "udp_ipv6", "tcp_ipv4", "tcp_ipv6", "icmp_ipv4", "icmpv6_ipv6",
             "dstopts_ipv6", "prerouting_ipv4"]
    assert [decode_packets(recording(name)[0])[0].seq for name in order] == list(range(8))


# --- configuration requests and the kernel's answers ---------------------------------------

def test_the_kernel_answers_to_configuration() -> None:
    answers = [decode_acks(datagram) for datagram in recording("config_answers")]
    assert [[(a.seq, a.errno) for a in acks] for acks in answers] == [
        [(100, 95)],  # CONNTRACK flag: EOPNOTSUPP without NETFILTER_NETLINK_GLUE_CT
        [(101, 0)], [(102, 19)],  # unbinding a group nobody bound: ENODEV
        [(103, 0)]]


@pytest.mark.parametrize(("index", "request_bytes"), [
    (0, encode_bind(6317, 100, NflogConfig(flags=CfgFlag.SEQ | CfgFlag.CONNTRACK))),
    (2, encode_unbind(6318, 102)),
])
def test_refused_requests_come_back_byte_for_byte(index: int, request_bytes: bytes) -> None:
    """An error answer echoes the whole request: the kernel read exactly our bytes."""
    answer = recording("config_answers")[index]
    assert answer[NLMSGHDR.size + 4:] == request_bytes


def test_bind_request_layout() -> None:
    data = encode_bind(6317, 7, NflogConfig(copy_range=96, nlbufsiz=65536))
    [header] = split_messages(data)
    assert (header.msg_type, header.flags, header.seq) == (TYPE_CONFIG,
                                                          NLM_F_REQUEST | NLM_F_ACK, 7)
    assert NFGENMSG.unpack_from(data, header.start) == (0, 0, 6317)
    attrs = {attr: data[start:end] for attr, start, end
             in iter_attrs(data, header.start + NFGENMSG.size, header.end)}
    assert attrs == {
        NfulaCfg.CMD: bytes([CfgCmd.BIND]),
        NfulaCfg.MODE: struct.pack("!IBx", 96, CopyMode.PACKET),
        NfulaCfg.FLAGS: be16(CfgFlag.SEQ),
        NfulaCfg.QTHRESH: be32(1), NfulaCfg.TIMEOUT: be32(0), NfulaCfg.NLBUFSIZ: be32(65536),
    }


def test_config_without_command_or_settings() -> None:
    data = encode_config(5, 1)
    assert len(data) == NLMSGHDR.size + NFGENMSG.size
    with pytest.raises(ValueError, match="65536"):
        encode_config(65536, 1)


# --- hand-built packets: attributes this kernel or these rules do not produce -----------------

def message(*attrs: bytes, family: int = AF_INET, group: int = 9) -> bytes:
    """One NFULNL_MSG_PACKET holding `attrs`."""
    return pack_message(TYPE_PACKET, 0, 0, NFGENMSG.pack(family, 0, group) + b"".join(attrs))


def test_conntrack_vlan_sequence_and_unknown_attributes() -> None:
    """NFULA_CT (nfnetlink_conntrack attributes), VLAN, global sequence, L2 header, physdev
    and an attribute from a newer kernel: everything is decoded or kept."""
    ct = (tuple_attr(CtAttr.TUPLE_ORIG, AF_INET, 6, "198.18.0.1", "198.18.0.2", 40000, 80)
          + pack_attr(CtAttr.ID, be32(0xC0FFEE)))
    data = message(
        pack_attr(NfulaAttr.PACKET_HDR, struct.pack("!HBx", 0x0800, Hook.LOCAL_OUT)),
        pack_attr(NfulaAttr.CT, ct, nested=True),
        pack_attr(NfulaAttr.CT_INFO, be32(2)),
        nest(NfulaAttr.VLAN, pack_attr(1, be16(0x8100)), pack_attr(2, be16(42)),
             pack_attr(9, b"??")),
        pack_attr(NfulaAttr.SEQ_GLOBAL, be32(77)),
        pack_attr(NfulaAttr.L2HDR, b"\x01\x02\x03"),
        pack_attr(NfulaAttr.IFINDEX_PHYSINDEV, be32(5)),
        pack_attr(NfulaAttr.IFINDEX_PHYSOUTDEV, be32(6)),
        pack_attr(NfulaAttr.PREFIX, b"x\0junk"),
        pack_attr(99, b"new!"))
    [packet] = decode_packets(data)
    assert packet.ct is not None and packet.ct_id == 0xC0FFEE
    assert packet.ct.orig == FlowTuple(AF_INET, 6, "198.18.0.1", "198.18.0.2", 40000, 80)
    assert (packet.ct_info, packet.vlan_proto, packet.vlan_tci) == (2, 0x8100, 42)
    assert (packet.seq_global, packet.l2hdr, packet.physindev, packet.physoutdev) == \
        (77, b"\x01\x02\x03", 5, 6)
    assert packet.prefix == "x" and packet.unknown == ((99, b"new!"),)


def test_the_ethertype_gives_the_family_of_a_bridge_record() -> None:
    data = message(pack_attr(NfulaAttr.PACKET_HDR, struct.pack("!HBx", 0x86DD, 0)),
                   family=7)  # NFPROTO_BRIDGE
    [packet] = decode_packets(data)
    assert packet.family == 7 and packet.ip_family == AF_INET6
    assert NflogPacket(0, 7).ip_family is None


def test_other_messages_are_skipped() -> None:
    done = pack_message(NLMSG_DONE, 0, 0, b"\0" * 4)
    assert decode_packets(done + message()) == [NflogPacket(9, AF_INET)]


@pytest.mark.parametrize(("data", "offset", "reason"), [
    (message()[:NLMSGHDR.size + 2], 0, "nlmsghdr length"),
    (pack_message(TYPE_PACKET, 0, 0, b"\0\0"), NLMSGHDR.size, "truncated nfgenmsg"),
    (message(pack_attr(NfulaAttr.UID, b"\0\0")), ATTRS, "NFULA_UID: length 2 < 4"),
    (message(pack_attr(NfulaAttr.MARK, be32(1)), pack_attr(NfulaAttr.TIMESTAMP, b"\0" * 8)),
     ATTRS + 8, "NFULA_TIMESTAMP: length 8 < 16"),
    (message(pack_attr(NfulaAttr.PACKET_HDR, b"\0")), ATTRS, "PACKET_HDR: length 1 < 4"),
    (message(pack_attr(NfulaAttr.HWADDR, b"\0" * 4)), ATTRS, "HWADDR: length 4 < 12"),
    (message(nest(NfulaAttr.VLAN, pack_attr(2, b"\0"))), ATTRS + 4, "VLAN_TCI: length 1"),
    (message(pack_attr(NfulaAttr.CT, pack_attr(CtAttr.ID, be32(1)), nested=True)),
     ATTRS + 4, "without CTA_TUPLE_ORIG"),
    (message(struct.pack("=HH", 40, NfulaAttr.UID)), ATTRS, "attribute type 11: length 40"),
])
def test_malformed_input_names_the_offset(data: bytes, offset: int, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason) as info:
        decode_packets(data)
    assert info.value.offset == offset


def test_decode_packet_reads_one_message_in_place() -> None:
    data = b"\xff" * 8 + message(pack_attr(NfulaAttr.UID, be32(1000)))
    start = 8 + NLMSGHDR.size
    assert decode_packet(data, start, len(data)).uid == 1000


# --- packet headers ------------------------------------------------------------------------------

def ipv4(proto: int, body: bytes, *, src: str = "198.18.0.1", dst: str = "198.18.0.2",
         options: bytes = b"", frag: int = 0) -> bytes:
    """An IPv4 header (with `options`) then `body`."""
    ihl = 5 + len(options) // 4
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(options) + len(body), 1,
                         frag, 64, proto, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return header + options + body


def ipv6(next_header: int, body: bytes, *, src: str = "2001:db8::1",
         dst: str = "2001:db8::2") -> bytes:
    """An IPv6 header then `body` (extension headers included by the caller)."""
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), next_header, 64,
                       socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + body


def ports(sport: int, dport: int) -> bytes:
    """The first 8 bytes of a TCP/UDP/SCTP/DCCP header: ports, then anything."""
    return struct.pack("!HH", sport, dport) + b"\0" * 4


def icmp(icmp_type: int, code: int, ident: int) -> bytes:
    """An echo-style ICMP header."""
    return struct.pack("!BBHHH", icmp_type, code, 0, ident, 1)


def ext(next_header: int, units: int, unit: int = 8, hdrlen: int | None = None) -> bytes:
    """An IPv6 extension header `units` * `unit` bytes long."""
    size = units * unit
    length = hdrlen if hdrlen is not None else units - 1
    return bytes([next_header, length]) + b"\0" * (size - 2)


V4 = ("198.18.0.1", "198.18.0.2")
V6 = ("2001:db8::1", "2001:db8::2")


@pytest.mark.parametrize(("payload", "family", "expected"), [
    (ipv4(6, ports(40000, 80)), AF_INET, PacketTuple(AF_INET, 6, *V4, 40000, 80)),
    (ipv4(17, ports(5353, 53), options=b"\x01" * 8), AF_INET,
     PacketTuple(AF_INET, 17, *V4, 5353, 53)),
    (ipv4(132, ports(1, 2)), AF_INET, PacketTuple(AF_INET, 132, *V4, 1, 2)),  # SCTP
    (ipv4(136, ports(3, 4)), AF_INET, PacketTuple(AF_INET, 136, *V4, 3, 4)),  # UDP-Lite
    (ipv4(33, ports(5, 6)), AF_INET, PacketTuple(AF_INET, 33, *V4, 5, 6)),  # DCCP
    (ipv4(1, icmp(8, 0, 777)), AF_INET, PacketTuple(AF_INET, 1, *V4, None, None, 8, 0, 777)),
    (ipv4(47, b"\0" * 4), AF_INET, PacketTuple(AF_INET, 47, *V4, 0, 0)),  # GRE: keys 0
    (ipv4(50, b"\0" * 8), AF_INET, PacketTuple(AF_INET, 50, *V4)),  # ESP: generic
    (ipv4(2, b"\0" * 8), AF_INET, PacketTuple(AF_INET, 2, *V4)),  # IGMP: generic
    (ipv4(6, ports(1, 2), frag=0x2000), AF_INET,  # first fragment (MF set): has the ports
     PacketTuple(AF_INET, 6, *V4, 1, 2)),
    (ipv4(6, b"", frag=0x0010), AF_INET, None),  # a later fragment
    (ipv6(6, ports(40000, 443)), AF_INET6, PacketTuple(AF_INET6, 6, *V6, 40000, 443)),
    (ipv6(58, icmp(128, 0, 9)), AF_INET6,
     PacketTuple(AF_INET6, 58, *V6, None, None, 128, 0, 9)),
    (ipv6(0, ext(43, 1) + ext(60, 2) + ext(17, 1) + ports(7, 8)), AF_INET6,  # HBH, RH, DO
     PacketTuple(AF_INET6, 17, *V6, 7, 8)),
    (ipv6(44, bytes([6, 0, 0, 0]) + b"\0" * 4 + ports(9, 10)), AF_INET6,  # first fragment
     PacketTuple(AF_INET6, 6, *V6, 9, 10)),
    (ipv6(44, bytes([6, 0, 0, 8]) + b"\0" * 4), AF_INET6, None),  # offset 1: later fragment
    (ipv6(51, ext(17, 3, unit=4, hdrlen=1) + ports(11, 12)), AF_INET6,  # AH: (1 + 2) * 4
     PacketTuple(AF_INET6, 17, *V6, 11, 12)),
    (ipv6(59, b""), AF_INET6, None),  # no next header
    (ipv6(50, b"\0" * 8), AF_INET6, PacketTuple(AF_INET6, 50, *V6)),
    (ipv4(6, ports(1, 2)), 7, None),  # not an IP family
])
def test_packet_tuple(payload: bytes, family: int, expected: PacketTuple | None) -> None:
    assert packet_tuple(payload, family) == expected


@pytest.mark.parametrize(("payload", "family", "offset", "reason"), [
    (b"\x45" * 10, AF_INET, 0, "truncated IPv4 header: 10 bytes"),
    (ipv6(6, b"")[:40], AF_INET, 0, "IPv4 packet with IP version 6"),
    (b"\x44" + ipv4(6, ports(1, 2))[1:], AF_INET, 0, "IPv4 header length 16"),
    (ipv4(6, b"\0\0"), AF_INET, 20, "truncated protocol 6 header: 2 bytes"),
    (ipv4(1, b"\0\0"), AF_INET, 20, "truncated ICMP header"),
    (ipv4(6, ports(1, 2), options=b"\x01" * 40)[:50], AF_INET, 60, "protocol 6 header: 0"),
    (b"\x60" * 39, AF_INET6, 0, "truncated IPv6 header: 39 bytes"),
    (ipv4(6, ports(1, 2)) + b"\0" * 40, AF_INET6, 0, "IPv6 packet with IP version 4"),
    (ipv6(0, b"\0" * 4), AF_INET6, 40, "truncated IPv6 extension header 0"),
    (ipv6(0, ext(60, 1) + ext(17, 1))[:50], AF_INET6, 48, "extension header 60"),
    (ipv6(0, ext(0, 1) * 9), AF_INET6, 104, "more than 8 IPv6 extension headers"),
    (ipv6(17, b"\0"), AF_INET6, 40, "truncated protocol 17 header: 1 bytes"),
])
def test_bad_headers_raise_with_the_offset(payload: bytes, family: int, offset: int,
                                           reason: str) -> None:
    with pytest.raises(DecodeError, match=reason) as info:
        packet_tuple(payload, family)
    assert info.value.offset == offset


def test_a_packet_tuple_equals_the_conntrack_tuple_without_zone() -> None:
    flow = FlowTuple(AF_INET6, 6, "2001:db8::1", "2001:db8::2", 40000, 443, zone=3)
    found = packet_tuple(ipv6(6, ports(40000, 443)), AF_INET6)
    assert found == flow[:9] and hash(found) == hash(flow[:9])


# --- properties --------------------------------------------------------------------------------

@ci(400)
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_packets(data)


@ci(400)
@given(st.binary(max_size=200))
def test_any_packet_attributes_decode_or_raise_decode_error(body: bytes) -> None:
    """Random attribute bytes behind a valid header reach every attribute decoder."""
    with contextlib.suppress(DecodeError):
        decode_packets(message(body))


_RECORDED = [datagram for name in PACKET_CASES for datagram in recording(name)]


@ci(400)
@given(st.sampled_from(_RECORDED), st.data())
def test_mutated_recordings_decode_or_raise_decode_error(datagram: bytes,
                                                         data: st.DataObject) -> None:
    raw = bytearray(datagram)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        for packet in decode_packets(bytes(raw[:cut])):
            if packet.payload is not None:
                packet_tuple(packet.payload, packet.ip_family or AF_INET)
    except DecodeError:
        pass


@ci(600)
@given(st.sampled_from([AF_INET, AF_INET6]), st.binary(max_size=120))
def test_any_payload_gives_a_tuple_none_or_decode_error(family: int, tail: bytes) -> None:
    for payload in (tail, (b"\x45" if family == AF_INET else b"\x60") + tail):
        try:
            found = packet_tuple(payload, family)
        except DecodeError:
            continue
        assert found is None or found.family == family


@ci(200)
@given(st.sampled_from([6, 17, 132]), st.integers(0, 65535), st.integers(0, 65535),
       st.lists(st.sampled_from([0, 43, 60]), max_size=4))
def test_ipv6_ports_are_found_behind_extension_headers(proto: int, sport: int, dport: int,
                                                       chain: list[int]) -> None:
    kinds = [*chain, proto]
    body = b"".join(ext(kinds[i + 1], 1 + i % 2) for i in range(len(chain)))
    found = packet_tuple(ipv6(kinds[0], body + ports(sport, dport)), AF_INET6)
    assert found == PacketTuple(AF_INET6, proto, *V6, sport, dport)


def test_builders_are_what_the_kernel_sends() -> None:
    """The hand-built IPv4 UDP header matches the recorded one field for field."""
    [datagram] = recording("udp_ipv4")
    [packet] = decode_packets(datagram)
    assert packet.payload is not None
    built = ipv4(17, struct.pack("!HHHH", 35149, 53, 12, 0) + b"ping")
    assert packet_tuple(built, AF_INET) == packet_tuple(packet.payload, AF_INET)

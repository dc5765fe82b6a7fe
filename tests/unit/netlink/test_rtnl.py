"""rtnetlink address codec: a recorded kernel dump, hand-built bad input, and properties.

tests/data/rtnl/addr_dump.hex is a real RTM_GETADDR (AF_UNSPEC) reply recorded on kernel 6.18
in a throwaway namespace (its header says how); the malformed messages are built here in the
kernel's layout so every offset is known exactly.
"""

from __future__ import annotations

import errno
import functools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.unit.netlink.recorded import DATA_ROOT, ci, datagrams

from conntrail.errors import DecodeError
from conntrail.kernel.localview import broadcasts
from conntrail.model import AF_INET, AF_INET6, AF_UNSPEC
from conntrail.netlink.conntrack import _ipv4, _ipv6
from conntrail.netlink.rtnl import (
    IFADDRMSG,
    AddrDump,
    IfaAttr,
    IfAddress,
    IfaFlag,
    RtmType,
    RtScope,
    address_text,
    decode_addr_dump,
    encode_getaddr_request,
)
from conntrail.netlink.wire import (
    NLM_F_DUMP,
    NLM_F_MULTI,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGHDR,
    align4,
    pack_attr,
    pack_message,
    split_messages,
)

DATA = DATA_ROOT / "rtnl"
recording = functools.partial(datagrams, DATA)  # a recording's datagrams, by name
HEADER = NLMSGHDR.size  # 16
ATTRS = HEADER + IFADDRMSG.size  # first attribute of a one-message datagram: 24
AF_MCTP = 45




def newaddr(attrs: bytes, family: int = AF_INET, prefixlen: int = 24, flags: int = 0x80,
            scope: int = 0, ifindex: int = 2) -> bytes:
    """An RTM_NEWADDR dump message as the kernel sends it."""
    payload = IFADDRMSG.pack(family, prefixlen, flags, scope, ifindex) + attrs
    return pack_message(RtmType.NEWADDR, NLM_F_MULTI, 1, payload, pid=4242)


def done(error: int = 0) -> bytes:
    """NLMSG_DONE of a dump; its int payload is the (negative) errno that ended it."""
    return pack_message(NLMSG_DONE, NLM_F_MULTI, 1, struct.pack("=i", -error), pid=4242)


def raw_header(length: int, msg_type: int) -> bytes:
    """An nlmsghdr with any length, even a wrong one."""
    return NLMSGHDR.pack(length, msg_type, NLM_F_MULTI, 1, 4242)


V4 = bytes([198, 18, 0, 1])
V4_ATTRS = pack_attr(IfaAttr.ADDRESS, V4) + pack_attr(IfaAttr.LOCAL, V4)


def refused(data: bytes) -> DecodeError:
    """The DecodeError that decoding `data` must raise."""
    with pytest.raises(DecodeError) as info:
        decode_addr_dump(data)
    return info.value


# --- the recorded kernel reply ---------------------------------------------------------------

RECORDED = [
    IfAddress(AF_INET, 8, 1, RtScope.HOST, "127.0.0.1", None, IfaFlag.PERMANENT, None),
    IfAddress(AF_INET, 24, 2, RtScope.UNIVERSE, "198.18.0.1", "198.18.0.255", IfaFlag.PERMANENT,
              None),
    IfAddress(AF_INET, 32, 2, RtScope.UNIVERSE, "198.18.3.1", None, IfaFlag.PERMANENT,
              "198.18.3.2"),
    IfAddress(AF_INET, 24, 2, RtScope.UNIVERSE, "198.18.0.9", "198.18.0.255",
              IfaFlag.PERMANENT | IfaFlag.SECONDARY, None),
    IfAddress(AF_INET6, 128, 1, RtScope.HOST, "::1", None, IfaFlag.PERMANENT, None),
    IfAddress(AF_INET6, 128, 2, RtScope.UNIVERSE, "2001:db8:5::1", None,
              IfaFlag.PERMANENT | IfaFlag.NODAD, "2001:db8:5::2"),
    IfAddress(AF_INET6, 64, 2, RtScope.UNIVERSE, "2001:db8::1", None,
              IfaFlag.PERMANENT | IfaFlag.NODAD, None),
    IfAddress(AF_INET6, 64, 2, RtScope.LINK, "fe80::ff:fe00:1", None, IfaFlag.PERMANENT, None),
]


def test_recorded_dump_decodes_to_every_address() -> None:
    first, last = recording("addr_dump")
    assert decode_addr_dump(first) == AddrDump(RECORDED, False, 0)
    assert decode_addr_dump(last) == AddrDump([], True, 0)


def test_recorded_point_to_point_keeps_local_not_peer() -> None:
    """IFA_ADDRESS is the peer there (if_addr.h); the kernel sends it *after* IFA_LOCAL for
    IPv6 and before it for IPv4: the order must not matter."""
    (first, _) = recording("addr_dump")
    by_address = {item.address: item for item in decode_addr_dump(first).addresses}
    assert by_address["198.18.3.1"].peer == "198.18.3.2"
    assert by_address["2001:db8:5::1"].peer == "2001:db8:5::2"
    assert "198.18.3.2" not in by_address and "2001:db8:5::2" not in by_address


def test_recorded_messages_split_over_datagrams_decode_the_same() -> None:
    first, _ = recording("addr_dump")
    one_by_one: list[IfAddress] = []
    for header in split_messages(first):
        message = first[header.start - HEADER:header.end]
        message += b"\0" * (align4(len(message)) - len(message))
        one_by_one.extend(decode_addr_dump(message).addresses)
    assert one_by_one == RECORDED


def test_broadcasts_follow_the_kernel_local_table() -> None:
    """fib_add_ifaddr: explicit brd, plus the network broadcast of primary addresses below /31
    (lo's 127.0.0.1/8 gives 127.255.255.255, as `ip route show table local` lists)."""
    assert broadcasts(RECORDED) == {"198.18.0.255", "127.255.255.255"}


def test_broadcast_without_brd_and_exclusions() -> None:
    def v4(address: str, prefixlen: int, flags: int = 0x80, peer: str | None = None,
           brd: str | None = None) -> IfAddress:
        return IfAddress(AF_INET, prefixlen, 2, 0, address, brd, flags, peer)

    assert broadcasts([v4("198.18.0.1", 24)]) == {"198.18.0.255"}
    assert broadcasts([v4("198.18.0.1", 31), v4("198.18.1.1", 32)]) == set()
    assert broadcasts([v4("198.18.0.9", 24, flags=0x81)]) == set()  # secondary: none of its own
    assert broadcasts([v4("198.18.0.9", 24, flags=0x81, brd="198.18.0.255")]) == {"198.18.0.255"}
    assert broadcasts([v4("198.18.7.1", 24, peer="198.18.8.2")]) == {"198.18.8.255"}  # peer's
    assert broadcasts([v4("0.1.2.3", 8)]) == set()  # zeronet
    assert broadcasts([IfAddress(AF_INET6, 64, 2, 0, "2001:db8::1", None, 0x80, None)]) == set()


# --- requests and control messages -----------------------------------------------------------

def test_getaddr_request_bytes() -> None:
    expected = bytes.fromhex("18000000" "1600" "0103" "07000000" "00000000"  # nlmsghdr
                             "00" "00" "00" "00" "00000000")  # ifaddrmsg, AF_UNSPEC
    assert encode_getaddr_request(7) == expected
    (header,) = split_messages(expected)
    assert header.flags == NLM_F_REQUEST | NLM_F_DUMP and header.msg_type == RtmType.GETADDR
    assert encode_getaddr_request(7, AF_INET6)[HEADER] == AF_INET6
    assert encode_getaddr_request(7)[HEADER] == AF_UNSPEC


def test_error_and_aborted_dump_report_errno() -> None:
    ack_error = pack_message(NLMSG_ERROR, 0, 1, struct.pack("=i", -errno.EPERM) + bytes(16))
    assert decode_addr_dump(ack_error) == AddrDump([], True, errno.EPERM)
    message = newaddr(V4_ATTRS)
    assert decode_addr_dump(message + done(errno.EINTR)) == AddrDump(
        [IfAddress(AF_INET, 24, 2, 0, "198.18.0.1", None, 0x80, None)], True, errno.EINTR)
    bare_done = pack_message(NLMSG_DONE, NLM_F_MULTI, 1, b"")
    assert decode_addr_dump(bare_done) == AddrDump([], True, 0)


def test_other_families_and_message_types_are_skipped() -> None:
    mctp = newaddr(pack_attr(IfaAttr.LOCAL, b"\x08") + pack_attr(IfaAttr.ADDRESS, b"\x08"),
                   family=AF_MCTP)
    link = pack_message(16, NLM_F_MULTI, 1, bytes(16))  # RTM_NEWLINK: not ours
    result = decode_addr_dump(mctp + link + newaddr(V4_ATTRS))
    assert [item.address for item in result.addresses] == ["198.18.0.1"]
    assert not result.done


def test_ifa_flags_attribute_replaces_the_byte() -> None:
    attrs = V4_ATTRS + pack_attr(IfaAttr.FLAGS, struct.pack("=I", 0x280))
    (address,) = decode_addr_dump(newaddr(attrs, flags=0x80)).addresses
    assert address.flags == IfaFlag.PERMANENT | IfaFlag.NOPREFIXROUTE


def test_unknown_attributes_are_skipped() -> None:
    attrs = pack_attr(60, b"future") + V4_ATTRS + pack_attr(IfaAttr.LABEL, b"eth0\0")
    (address,) = decode_addr_dump(newaddr(attrs)).addresses
    assert address.address == "198.18.0.1"


def test_address_only_without_local() -> None:
    raw = bytes.fromhex("20010db8000000000000000000000001")
    (address,) = decode_addr_dump(newaddr(pack_attr(IfaAttr.ADDRESS, raw),
                                          family=AF_INET6)).addresses
    assert (address.address, address.peer) == ("2001:db8::1", None)


# --- malformed input: DecodeError at the exact offset ----------------------------------------

def test_truncated_nlmsghdr() -> None:
    good = newaddr(V4_ATTRS)
    assert refused(good + b"\x18\x00\x00\x00\x14\x00").offset == len(good)


def test_truncated_ifaddrmsg() -> None:
    error = refused(raw_header(20, RtmType.NEWADDR) + b"\x02\x18\x80\x00")
    assert (error.offset, error.msg_type) == (HEADER, RtmType.NEWADDR)
    assert "truncated ifaddrmsg: 4 bytes < 8" in str(error)


@pytest.mark.parametrize(("attr", "payload"), [(IfaAttr.LOCAL, b"\xc6\x12\x00"),
                                               (IfaAttr.ADDRESS, bytes(16)),
                                               (IfaAttr.BROADCAST, b"\xff" * 5)])
def test_address_attribute_of_the_wrong_size(attr: IfaAttr, payload: bytes) -> None:
    error = refused(newaddr(V4_ATTRS + pack_attr(attr, payload)))
    assert error.offset == ATTRS + len(V4_ATTRS)
    assert f"IFA_{attr.name}: length {len(payload)} != 4 for family 2" in str(error)


def test_short_ifa_flags() -> None:
    error = refused(newaddr(pack_attr(IfaAttr.FLAGS, b"\x80\x00") + V4_ATTRS))
    assert error.offset == ATTRS
    assert "IFA_FLAGS: length 2 < 4" in str(error)


def test_attribute_length_beyond_the_message() -> None:
    bad = struct.pack("=HH", 40, IfaAttr.LOCAL) + V4
    error = refused(newaddr(V4_ATTRS + bad))
    assert (error.offset, error.msg_type) == (ATTRS + len(V4_ATTRS), RtmType.NEWADDR)


def test_message_without_an_address() -> None:
    good = newaddr(V4_ATTRS)
    error = refused(good + newaddr(pack_attr(IfaAttr.LABEL, b"lo\0")))
    assert error.offset == len(good) + HEADER
    assert "without IFA_LOCAL or IFA_ADDRESS" in str(error)


def test_truncated_recording_names_the_cut() -> None:
    first, _ = recording("addr_dump")
    headers = list(split_messages(first))
    cut = headers[3].start  # inside the fourth message, just after its nlmsghdr
    error = refused(first[:cut + 2])
    assert error.offset == headers[3].start - HEADER


def test_truncated_nlmsgerr() -> None:
    error = refused(pack_message(NLMSG_ERROR, 0, 1, b"\xff\xff"))
    assert error.offset == HEADER


# --- properties ------------------------------------------------------------------------------

def decodes_or_refuses(data: bytes) -> None:
    """decode_addr_dump returns a well-typed AddrDump, or DecodeError within the data."""
    try:
        result = decode_addr_dump(data)
    except DecodeError as exc:
        assert 0 <= exc.offset <= len(data), (exc.offset, len(data))
        return
    assert all(isinstance(item, IfAddress) for item in result.addresses)
    assert result.done or result.errno == 0


@ci(500)
@given(st.binary(max_size=400))
def test_random_bytes_decode_or_refuse(data: bytes) -> None:
    decodes_or_refuses(data)


@ci(1500)
@given(st.data())
def test_mutated_recording_decodes_or_refuses(data: st.DataObject) -> None:
    raw = bytearray(b"".join(recording("addr_dump")))
    for _ in range(data.draw(st.integers(0, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    raw = raw[:data.draw(st.integers(0, len(raw)))]
    decodes_or_refuses(bytes(raw))


ATTR = st.builds(pack_attr, st.sampled_from([*IfaAttr, 0, 40]), st.binary(max_size=20))


@ci(1000)
@given(st.sampled_from([AF_INET, AF_INET6, AF_MCTP, 0]), st.lists(ATTR, max_size=6))
def test_random_attributes_decode_or_refuse(family: int, attrs: list[bytes]) -> None:
    decodes_or_refuses(newaddr(b"".join(attrs), family=family))


@ci(300)
@given(st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16))
def test_address_text_is_the_conntrack_codecs(v4: bytes, v6: bytes) -> None:
    """Inventory code compares these strings with flow addresses: they must be identical."""
    assert address_text(AF_INET, v4) == _ipv4(v4)
    assert address_text(AF_INET6, v6) == _ipv6(v6)
    attrs = pack_attr(IfaAttr.LOCAL, v6)
    (address,) = decode_addr_dump(newaddr(attrs, family=AF_INET6)).addresses
    assert address.address == _ipv6(v6)


@ci(200)
@given(st.integers(0, 0xFFFFFFFF), st.sampled_from([AF_UNSPEC, AF_INET, AF_INET6]))
def test_request_round_trip(seq: int, family: int) -> None:
    data = encode_getaddr_request(seq, family)
    (header,) = split_messages(data)
    assert (header.msg_type, header.flags, header.seq) == (RtmType.GETADDR,
                                                           NLM_F_REQUEST | NLM_F_DUMP, seq)
    assert IFADDRMSG.unpack_from(data, header.start) == (family, 0, 0, 0, 0)

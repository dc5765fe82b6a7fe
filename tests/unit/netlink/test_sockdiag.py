"""inet_diag codec: recorded kernel dumps and lookups, hand-built bad input, and properties.

tests/data/sockdiag/*.hex are real SOCK_DIAG_BY_FAMILY replies recorded on kernel 6.18 in a
throwaway namespace (their headers say which sockets were open and what was asked); the
lookup_* and port_dump_* ones answer `encode_lookup_request` / `encode_port_dump_request` for
sockets made in cgroup v2 /ctt-record (id 139).
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
from conntrail.model import AF_INET, AF_INET6
from conntrail.netlink.conntrack import _ipv4, _ipv6
from conntrail.netlink.sockdiag import (
    ALL_STATES,
    INET_DIAG_BC_OP,
    INET_DIAG_BC_S_EQ,
    INET_DIAG_MSG,
    INET_DIAG_NOCOOKIE,
    INET_DIAG_REQ_BYTECODE,
    INET_DIAG_REQ_V2,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPPROTO_UDPLITE,
    SOCK_DIAG_BY_FAMILY,
    DetailReply,
    DiagDump,
    InetDiagAttr,
    InetSocket,
    SocketDetail,
    TcpState,
    decode_diag_details,
    decode_diag_dump,
    encode_diag_request,
    encode_lookup_request,
    encode_port_dump_request,
    states_mask,
)
from conntrail.netlink.wire import (
    NLM_F_DUMP,
    NLM_F_MULTI,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGHDR,
    iter_attrs,
    pack_attr,
    pack_message,
    split_messages,
)

DATA = DATA_ROOT / "sockdiag"
recording = functools.partial(datagrams, DATA)  # a recording's datagrams, by name
HEADER = NLMSGHDR.size  # 16
ATTRS = HEADER + INET_DIAG_MSG.size  # first attribute of a one-message datagram: 88
RECORDINGS = sorted(path.stem for path in DATA.glob("*.hex"))




def diag_msg(family: int = AF_INET, state: int = TcpState.LISTEN, sport: int = 8080,
             dport: int = 0, src: bytes = bytes([198, 18, 0, 1]), dst: bytes = b"",
             uid: int = 1000, inode: int = 77, attrs: bytes = b"",
             flags: int = NLM_F_MULTI) -> bytes:
    """One inet_diag_msg reply message in the kernel's layout (a lookup's: flags=0)."""
    payload = INET_DIAG_MSG.pack(family, state, 0, 0, struct.pack("!H", sport),
                                 struct.pack("!H", dport), src.ljust(16, b"\0"),
                                 dst.ljust(16, b"\0"), 0, 1, 2, 0, 0, 0, uid, inode) + attrs
    return pack_message(SOCK_DIAG_BY_FAMILY, flags, 7, payload, pid=4242)


def refused(data: bytes) -> DecodeError:
    """The DecodeError that decoding `data` must raise."""
    with pytest.raises(DecodeError) as info:
        decode_diag_dump(data)
    return info.value


# --- the recorded kernel replies (inodes as recorded) ----------------------------------------

LISTEN_V4 = InetSocket(AF_INET, TcpState.LISTEN, 8080, 0, "198.18.0.1", "0.0.0.0", 0, 354074)
EXPECTED = {
    "tcp_listen_v4": [LISTEN_V4],
    "tcp_listen_v6": [InetSocket(AF_INET6, TcpState.LISTEN, 8443, 0, "::", "::", 0, 354075)],
    "tcp_all_v4": [LISTEN_V4, InetSocket(AF_INET, TcpState.ESTABLISHED, 8080, 40000,
                                         "198.18.0.1", "198.18.0.2", 0, 354080)],
    "udp_all_v4": [
        InetSocket(AF_INET, TcpState.CLOSE, 5353, 0, "0.0.0.0", "0.0.0.0", 0, 354076),
        InetSocket(AF_INET, TcpState.ESTABLISHED, 6000, 53, "198.18.0.1", "198.18.0.2", 0,
                   354078),
    ],
    # 1<<CLOSE selects only unconnected UDP: the connected [2001:db8::1]:6001 is not there.
    "udp_close_v6": [InetSocket(AF_INET6, TcpState.CLOSE, 5354, 0, "2001:db8::1", "::", 0,
                                354077)],
}


CGROUP = 139  # /ctt-record, where the lookup recordings' sockets were made
CLIENT = InetSocket(AF_INET, TcpState.ESTABLISHED, 52994, 8080, "198.18.0.1", "198.18.0.1", 0,
                    638692)
LISTENER = InetSocket(AF_INET, TcpState.LISTEN, 8080, 0, "198.18.0.1", "0.0.0.0", 0, 638691)
BOUND = InetSocket(AF_INET, TcpState.CLOSE, 5353, 0, "0.0.0.0", "0.0.0.0", 0, 638694)
CONNECTED_V6 = InetSocket(AF_INET6, TcpState.ESTABLISHED, 6001, 53, "2001:db8::1",
                          "2001:db8::2", 0, 638695)
LOOKUPS = {  # one datagram each: the answer, or NLMSG_ERROR
    "lookup_tcp_v4": DetailReply([SocketDetail(CLIENT, CGROUP)], True, 0),
    # no connection 198.18.0.2:1 → 198.18.0.1:8080: the kernel answers the port's listener
    "lookup_tcp_listener": DetailReply([SocketDetail(LISTENER, CGROUP)], True, 0),
    # the UDP lookup is the receive path's: an unconnected socket answers for any peer
    "lookup_udp_bound": DetailReply([SocketDetail(BOUND, CGROUP)], True, 0),
    "lookup_udp6_connected": DetailReply([SocketDetail(CONNECTED_V6, CGROUP)], True, 0),
    "lookup_missing": DetailReply([], True, errno.ENOENT),
}


def test_every_recording_has_expectations() -> None:
    assert set(RECORDINGS) == {*EXPECTED, *LOOKUPS, "port_dump_udp", "bad_protocol"}


@pytest.mark.parametrize("name", sorted(LOOKUPS))
def test_recorded_lookup(name: str) -> None:
    (only,) = recording(name)
    assert decode_diag_details(only) == LOOKUPS[name]


def test_recorded_port_dump_holds_only_that_port() -> None:
    first, last = recording("port_dump_udp")
    assert decode_diag_details(first) == DetailReply([SocketDetail(BOUND, CGROUP)], False, 0)
    assert decode_diag_details(last) == DetailReply([], True, 0)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_dump_details_agree_with_the_dump(name: str) -> None:
    """The detail decoder sees the same sockets; these were made in the root cgroup (id 1)."""
    first, last = recording(name)
    details = decode_diag_details(first)
    assert [d.socket for d in details.sockets] == EXPECTED[name]
    assert {d.cgroup_id for d in details.sockets} == {1}
    assert decode_diag_details(last) == DetailReply([], True, 0)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_dump(name: str) -> None:
    first, last = recording(name)
    assert decode_diag_dump(first) == DiagDump(EXPECTED[name], False, 0)
    assert decode_diag_dump(last) == DiagDump([], True, 0)


def test_recorded_refusal_comes_as_nlmsg_done_with_errno() -> None:
    """The kernel answers a dump for a protocol without inet_diag handler with NLMSG_DONE
    carrying -ENOENT, not with NLMSG_ERROR."""
    (only,) = recording("bad_protocol")
    (header,) = split_messages(only)
    assert header.msg_type == NLMSG_DONE
    assert decode_diag_dump(only) == DiagDump([], True, errno.ENOENT)


def test_recorded_messages_carry_attributes_unasked() -> None:
    """idiag_ext was 0, yet 6.18 appends SHUTDOWN, MARK, CGROUP_ID, SOCKOPT (and SKV6ONLY for
    IPv6): the decoder walks them for framing and skips them."""
    first, _ = recording("tcp_listen_v6")
    (header,) = split_messages(first)
    kinds = [kind for kind, _, _ in iter_attrs(first, header.start + INET_DIAG_MSG.size,
                                               header.end)]
    assert kinds == [8, 11, 15, 21, 22]


# --- requests --------------------------------------------------------------------------------

def test_request_bytes() -> None:
    expected = bytes.fromhex(
        "48000000" "1400" "0103" "09000000" "00000000"  # nlmsghdr: 72 bytes, SOCK_DIAG_BY_FAMILY
        "0a" "06" "00" "00" "00040000"  # AF_INET6, TCP, no ext, pad, states 1<<LISTEN
        "0000" "0000" + "00" * 32 + "00000000" "ffffffff" "ffffffff")  # sockid: no cookie
    assert encode_diag_request(AF_INET6, IPPROTO_TCP, states_mask(TcpState.LISTEN), 9) \
        == expected


def test_states_mask() -> None:
    assert states_mask(TcpState.LISTEN) == 0x400
    assert states_mask(TcpState.CLOSE) == 0x80
    assert states_mask(TcpState.ESTABLISHED, TcpState.CLOSE) == 0x82
    assert states_mask() == 0


@ci(200)
@given(st.sampled_from([AF_INET, AF_INET6]), st.sampled_from([IPPROTO_TCP, IPPROTO_UDP]),
       st.integers(0, ALL_STATES), st.integers(0, 0xFFFFFFFF), st.integers(0, 255))
def test_request_round_trip(family: int, protocol: int, states: int, seq: int, ext: int) -> None:
    data = encode_diag_request(family, protocol, states, seq, ext)
    (header,) = split_messages(data)
    assert (header.msg_type, header.flags, header.seq) == (SOCK_DIAG_BY_FAMILY,
                                                           NLM_F_REQUEST | NLM_F_DUMP, seq)
    assert header.end - header.start == INET_DIAG_REQ_V2.size
    fields = INET_DIAG_REQ_V2.unpack_from(data, header.start)
    assert fields[:5] == (family, protocol, ext, 0, states)
    assert fields[-2:] == (INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)


def test_lookup_request_bytes_tcp_puts_the_local_end_in_src() -> None:
    expected = bytes.fromhex(
        "48000000" "1400" "0100" "05000000" "00000000"  # nlmsghdr: NLM_F_REQUEST only
        "02" "06" "00" "00" "ffffffff"  # AF_INET, TCP, no ext, every state
        "cf52" "1f90"  # sport 53074 (local), dport 8080
        "c6120001" + "00" * 12 + "c6120002" + "00" * 12  # src local, dst peer
        + "00000000" "ffffffff" "ffffffff")
    assert encode_lookup_request(AF_INET, IPPROTO_TCP, "198.18.0.1", 53074, "198.18.0.2",
                                 8080, 5) == expected


@pytest.mark.parametrize("protocol", [IPPROTO_UDP, IPPROTO_UDPLITE])
def test_lookup_request_udp_puts_the_peer_in_src(protocol: int) -> None:
    data = encode_lookup_request(AF_INET6, protocol, "2001:db8::1", 6001, "2001:db8::2", 53, 1)
    fields = INET_DIAG_REQ_V2.unpack_from(data, HEADER)
    assert fields[5:9] == (struct.pack("!H", 53), struct.pack("!H", 6001),
                           bytes.fromhex("20010db8000000000000000000000002"),
                           bytes.fromhex("20010db8000000000000000000000001"))


def test_lookup_request_takes_packed_addresses() -> None:
    text = encode_lookup_request(AF_INET, IPPROTO_TCP, "198.18.0.1", 1, "198.18.0.2", 2, 3)
    raw = encode_lookup_request(AF_INET, IPPROTO_TCP, bytes([198, 18, 0, 1]), 1,
                                bytes([198, 18, 0, 2]), 2, 3)
    assert text == raw


@pytest.mark.parametrize(("family", "local"), [(AF_INET, "2001:db8::1"), (AF_INET6, "198.18.0.1"),
                                               (AF_INET, "not an address"), (1, "198.18.0.1")])
def test_lookup_request_refuses_a_wrong_address(family: int, local: str) -> None:
    with pytest.raises(ValueError, match=r"address|family"):
        encode_lookup_request(family, IPPROTO_TCP, local, 1, local, 2, 3)


def test_port_dump_request_bytes() -> None:
    data = encode_port_dump_request(AF_INET, IPPROTO_UDP, ALL_STATES, 5353, 4)
    (header,) = split_messages(data)
    assert (header.flags, header.seq) == (NLM_F_REQUEST | NLM_F_DUMP, 4)
    assert INET_DIAG_REQ_V2.unpack_from(data, header.start)[:5] == (AF_INET, IPPROTO_UDP, 0, 0,
                                                                    ALL_STATES)
    ((kind, start, end),) = iter_attrs(data, header.start + INET_DIAG_REQ_V2.size, header.end)
    # S_EQ: yes = 8 (the end: accept), no = 12 (past the end: reject), operand 5353 host order
    assert kind == INET_DIAG_REQ_BYTECODE
    assert data[start:end] == INET_DIAG_BC_OP.pack(INET_DIAG_BC_S_EQ, 8, 12) \
        + INET_DIAG_BC_OP.pack(0, 0, 5353)


@ci(300)
@given(st.sampled_from([AF_INET, AF_INET6]), st.sampled_from([IPPROTO_TCP, IPPROTO_UDP]),
       st.binary(min_size=16, max_size=16), st.integers(0, 0xFFFF),
       st.binary(min_size=16, max_size=16), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF))
def test_lookup_request_round_trip(family: int, protocol: int, local: bytes, lport: int,
                                   remote: bytes, rport: int, seq: int) -> None:
    size = 4 if family == AF_INET else 16
    data = encode_lookup_request(family, protocol, local[:size], lport, remote[:size], rport,
                                 seq)
    (header,) = split_messages(data)
    assert (header.msg_type, header.flags, header.seq) == (SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST,
                                                           seq)
    fields = INET_DIAG_REQ_V2.unpack_from(data, header.start)
    ends = [(struct.pack("!H", lport), local[:size].ljust(16, b"\0")),
            (struct.pack("!H", rport), remote[:size].ljust(16, b"\0"))]
    if protocol == IPPROTO_UDP:
        ends.reverse()
    assert (fields[5], fields[7], fields[6], fields[8]) == (*ends[0], *ends[1])
    assert fields[:5] == (family, protocol, 0, 0, ALL_STATES)
    assert fields[-2:] == (INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)


# --- hand-built messages ---------------------------------------------------------------------

def test_cgroup_id_is_read_and_a_lookup_reply_is_complete() -> None:
    attrs = (pack_attr(InetDiagAttr.SHUTDOWN, b"\0") + pack_attr(InetDiagAttr.CGROUP_ID,
                                                                  struct.pack("=Q", 2**40 + 5)))
    reply = decode_diag_details(diag_msg(attrs=attrs, flags=0))
    assert reply.done and reply.errno == 0
    assert reply.sockets[0].cgroup_id == 2**40 + 5


def test_no_attributes_no_cgroup_id() -> None:
    """TIME_WAIT and request sockets come without attributes."""
    reply = decode_diag_details(diag_msg(state=TcpState.TIME_WAIT, inode=0, uid=0))
    assert reply == DetailReply([SocketDetail(InetSocket(AF_INET, TcpState.TIME_WAIT, 8080, 0,
                                                         "198.18.0.1", "0.0.0.0", 0, 0), None)],
                                False, 0)


def test_short_cgroup_id_attribute() -> None:
    attrs = pack_attr(8, b"\0") + pack_attr(InetDiagAttr.CGROUP_ID, bytes(4))
    with pytest.raises(DecodeError) as info:
        decode_diag_details(diag_msg(attrs=attrs))
    assert info.value.offset == ATTRS + 8
    assert "INET_DIAG_CGROUP_ID: length 4 < 8" in str(info.value)


def test_error_reply() -> None:
    error = pack_message(NLMSG_ERROR, 0, 7, struct.pack("=i", -errno.EINVAL) + bytes(16))
    assert decode_diag_dump(diag_msg() + error) == DiagDump(
        [InetSocket(AF_INET, 10, 8080, 0, "198.18.0.1", "0.0.0.0", 1000, 77)], True,
        errno.EINVAL)


def test_extensions_and_other_types_are_skipped() -> None:
    attrs = pack_attr(21, bytes(8)) + pack_attr(99, b"future")
    other = pack_message(NLMSG_DONE + 40, NLM_F_MULTI, 7, bytes(8))
    result = decode_diag_dump(other + diag_msg(attrs=attrs, uid=0xFFFFFFFE, inode=2**32 - 1))
    assert result.sockets == [InetSocket(AF_INET, 10, 8080, 0, "198.18.0.1", "0.0.0.0",
                                         0xFFFFFFFE, 2**32 - 1)]


def test_ipv6_and_mapped_addresses() -> None:
    mapped = bytes(10) + b"\xff\xff" + bytes([198, 18, 0, 2])
    own = bytes.fromhex("20010db8000000000000000000000001")
    (sock,) = decode_diag_dump(diag_msg(AF_INET6, TcpState.ESTABLISHED, 443, 65535, own,
                                        mapped)).sockets
    assert (sock.src, sock.dst, sock.sport, sock.dport) == ("2001:db8::1", _ipv6(mapped),
                                                           443, 65535)


# --- malformed input: DecodeError at the exact offset ----------------------------------------

def test_truncated_inet_diag_msg() -> None:
    good = diag_msg()
    short = NLMSGHDR.pack(HEADER + 40, SOCK_DIAG_BY_FAMILY, NLM_F_MULTI, 7, 0) + bytes(40)
    error = refused(good + short)
    assert (error.offset, error.msg_type) == (len(good) + HEADER, SOCK_DIAG_BY_FAMILY)
    assert "truncated inet_diag_msg: 40 bytes < 72" in str(error)


def test_unknown_family() -> None:
    error = refused(diag_msg(family=1))
    assert error.offset == HEADER
    assert "family 1" in str(error)


def test_attribute_beyond_the_message() -> None:
    bad = struct.pack("=HH", 64, 8) + b"\0\0\0\0"
    error = refused(diag_msg(attrs=pack_attr(8, b"\0") + bad))
    assert error.offset == ATTRS + 8


def test_truncated_recording_names_the_message() -> None:
    first, _ = recording("udp_all_v4")
    second = list(split_messages(first))[1]
    error = refused(first[:second.start + 30])
    assert error.offset == second.start - HEADER


# --- properties ------------------------------------------------------------------------------

def decodes_or_refuses(data: bytes) -> None:
    """decode_diag_dump and decode_diag_details return well-typed replies, or DecodeError
    within the data, and agree on the sockets when both decode."""
    result: DiagDump | None = None
    try:
        result = decode_diag_dump(data)
    except DecodeError as exc:
        assert 0 <= exc.offset <= len(data), (exc.offset, len(data))
    else:
        assert all(isinstance(item, InetSocket) for item in result.sockets)
        assert result.done or result.errno == 0
    try:
        details = decode_diag_details(data)
    except DecodeError as exc:
        assert 0 <= exc.offset <= len(data), (exc.offset, len(data))
        return
    assert all(isinstance(item, SocketDetail) for item in details.sockets)
    if result is not None:  # details may stop early (a lookup reply) or refuse a bad cgroup id
        assert [d.socket for d in details.sockets] == result.sockets[:len(details.sockets)]


@ci(500)
@given(st.binary(max_size=400))
def test_random_bytes_decode_or_refuse(data: bytes) -> None:
    decodes_or_refuses(data)


@ci(1500)
@given(st.sampled_from(RECORDINGS), st.data())
def test_mutated_recordings_decode_or_refuse(name: str, data: st.DataObject) -> None:
    raw = bytearray(b"".join(recording(name)))
    for _ in range(data.draw(st.integers(0, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    raw = raw[:data.draw(st.integers(0, len(raw)))]
    decodes_or_refuses(bytes(raw))


@ci(500)
@given(st.sampled_from([AF_INET, AF_INET6]), st.integers(0, 255), st.integers(0, 0xFFFF),
       st.integers(0, 0xFFFF), st.binary(min_size=16, max_size=16),
       st.binary(min_size=16, max_size=16), st.integers(0, 0xFFFFFFFF),
       st.integers(0, 0xFFFFFFFF))
def test_any_socket_round_trips(family: int, state: int, sport: int, dport: int, src: bytes,
                                dst: bytes, uid: int, inode: int) -> None:
    """Every field comes back; address text is exactly the conntrack codec's."""
    (sock,) = decode_diag_dump(diag_msg(family, state, sport, dport, src, dst, uid,
                                        inode)).sockets
    text = _ipv4 if family == AF_INET else _ipv6
    size = 4 if family == AF_INET else 16
    assert sock == InetSocket(family, state, sport, dport, text(src[:size]), text(dst[:size]),
                              uid, inode)

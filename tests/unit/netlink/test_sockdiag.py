"""inet_diag codec: recorded kernel dumps, hand-built bad input, and properties.

tests/data/sockdiag/*.hex are real SOCK_DIAG_BY_FAMILY replies recorded on kernel 6.18 in a
throwaway namespace (their headers say which sockets were open and what was asked).
"""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conntrail.errors import DecodeError
from conntrail.model import AF_INET, AF_INET6
from conntrail.netlink.conntrack import _ipv4, _ipv6
from conntrail.netlink.sockdiag import (
    ALL_STATES,
    INET_DIAG_MSG,
    INET_DIAG_NOCOOKIE,
    INET_DIAG_REQ_V2,
    IPPROTO_TCP,
    IPPROTO_UDP,
    SOCK_DIAG_BY_FAMILY,
    DiagDump,
    InetSocket,
    TcpState,
    decode_diag_dump,
    encode_diag_request,
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
from conntrail.recording import parse_lines

DATA = Path(__file__).resolve().parents[2] / "data" / "sockdiag"
HEADER = NLMSGHDR.size  # 16
ATTRS = HEADER + INET_DIAG_MSG.size  # first attribute of a one-message datagram: 88
RECORDINGS = sorted(path.stem for path in DATA.glob("*.hex"))


def recording(name: str) -> list[bytes]:
    """The datagrams of a tests/data/sockdiag recording, in order."""
    with (DATA / f"{name}.hex").open(encoding="ascii") as handle:
        return [item.data for item in parse_lines(handle)]


def ci(max_examples: int) -> settings:
    """Bounded examples, no deadline (busy machines)."""
    return settings(max_examples=max_examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def diag_msg(family: int = AF_INET, state: int = TcpState.LISTEN, sport: int = 8080,
             dport: int = 0, src: bytes = bytes([198, 18, 0, 1]), dst: bytes = b"",
             uid: int = 1000, inode: int = 77, attrs: bytes = b"") -> bytes:
    """One inet_diag_msg reply message in the kernel's layout."""
    payload = INET_DIAG_MSG.pack(family, state, 0, 0, struct.pack("!H", sport),
                                 struct.pack("!H", dport), src.ljust(16, b"\0"),
                                 dst.ljust(16, b"\0"), 0, 1, 2, 0, 0, 0, uid, inode) + attrs
    return pack_message(SOCK_DIAG_BY_FAMILY, NLM_F_MULTI, 7, payload, pid=4242)


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


def test_every_recording_has_expectations() -> None:
    assert set(RECORDINGS) == {*EXPECTED, "bad_protocol"}


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


# --- hand-built messages ---------------------------------------------------------------------

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
    """decode_diag_dump returns a well-typed DiagDump, or DecodeError within the data."""
    try:
        result = decode_diag_dump(data)
    except DecodeError as exc:
        assert 0 <= exc.offset <= len(data), (exc.offset, len(data))
        return
    assert all(isinstance(item, InetSocket) for item in result.sockets)
    assert result.done or result.errno == 0


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

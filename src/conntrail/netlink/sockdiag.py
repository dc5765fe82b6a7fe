"""inet_diag codec: SOCK_DIAG_BY_FAMILY requests to bytes, inet_diag_msg replies to records.

Layouts follow linux/sock_diag.h (SOCK_DIAG_BY_FAMILY) and linux/inet_diag.h (struct
inet_diag_req_v2, inet_diag_sockid, inet_diag_msg, inet_diag_bc_op, INET_DIAG_* attributes);
socket states are enum of include/net/tcp_states.h (not a uapi header; UDP uses the same
numbers). Ports and addresses are network order, everything else host order. Address text is
the conntrack codec's.

Two request shapes: dumps (`encode_diag_request`, `encode_port_dump_request` with a kernel-side
local-port filter) and the exact lookup of one socket by its 4-tuple (`encode_lookup_request`,
no NLM_F_DUMP), answered by one inet_diag_msg or NLMSG_ERROR -ENOENT. `decode_diag_details`
decodes either reply with the attributes process attribution reads (INET_DIAG_CGROUP_ID).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from typing import NamedTuple

from conntrail.errors import DecodeError
from conntrail.model import AF_INET, AF_INET6
from conntrail.netlink.rtnl import address_text, dump_status
from conntrail.netlink.wire import (
    NLM_F_DUMP,
    NLM_F_MULTI,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    MessageHeader,
    iter_attrs,
    pack_attr,
    pack_message,
    split_messages,
)

SOCK_DIAG_BY_FAMILY = 20  # sock_diag.h: request and reply type
INET_DIAG_NOCOOKIE = 0xFFFFFFFF  # inet_diag.h: idiag_cookie value meaning "no cookie"
IPPROTO_TCP = 6  # linux/in.h
IPPROTO_UDP = 17
IPPROTO_UDPLITE = 136
INET_DIAG_REQ_BYTECODE = 1  # inet_diag.h, enum INET_DIAG_REQ_*: request attribute
INET_DIAG_BC_S_EQ = 11  # inet_diag.h, enum INET_DIAG_BC_*: local port == next op's `no`


class InetDiagAttr(enum.IntEnum):
    """Reply attributes (linux/inet_diag.h, enum INET_DIAG_*) this codec names; 6.18 appends
    SHUTDOWN, MARK (to CAP_NET_ADMIN), CGROUP_ID and SOCKOPT (and SKV6ONLY on IPv6) to every
    full socket unasked. CGROUP_ID cannot be asked for in idiag_ext (8 bits, ids <= 8)."""

    SHUTDOWN = 8
    SKV6ONLY = 11
    PAD = 14
    MARK = 15
    CGROUP_ID = 21  # u64: the socket's cgroup v2 id (the cgroup directory's inode number)
    SOCKOPT = 22


class TcpState(enum.IntEnum):
    """Socket states (include/net/tcp_states.h); UDP sockets are CLOSE or, once connected,
    ESTABLISHED."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12
    BOUND_INACTIVE = 13


ALL_STATES = 0xFFFFFFFF  # idiag_states: every state


def states_mask(*states: TcpState) -> int:
    """The idiag_states bitmask selecting `states` (bit n = state n)."""
    mask = 0
    for state in states:
        mask |= 1 << state
    return mask


# struct inet_diag_req_v2: family, protocol, ext, pad, states, then struct inet_diag_sockid
# (sport, dport: be16; src, dst: 16 bytes; if; cookie[2]).
INET_DIAG_REQ_V2 = struct.Struct("=BBBBI2s2s16s16sIII")
# struct inet_diag_msg: family, state, timer, retrans, inet_diag_sockid, then expires,
# rqueue, wqueue, uid, inode.
INET_DIAG_MSG = struct.Struct("=BBBB2s2s16s16sIIIIIIII")
INET_DIAG_BC_OP = struct.Struct("=BBH")  # struct inet_diag_bc_op: code, yes, no
_U64 = struct.Struct("=Q")
_PORT = struct.Struct("!H")

_ADDRESS_SIZES = {AF_INET: 4, AF_INET6: 16}


class InetSocket(NamedTuple):
    """One socket of an inet_diag dump (struct inet_diag_msg without its attributes)."""

    family: int  # AF_INET or AF_INET6 (a dual-stack socket is AF_INET6, v4 peers mapped)
    state: int  # TcpState value
    sport: int
    dport: int  # 0 for listening and unconnected sockets
    src: str
    dst: str
    uid: int
    inode: int


class DiagDump(NamedTuple):
    """What one datagram of a SOCK_DIAG_BY_FAMILY dump reply holds."""

    sockets: list[InetSocket]
    done: bool  # NLMSG_DONE or NLMSG_ERROR seen: nothing more will come for this request
    errno: int  # positive errno when the kernel refused or aborted the dump, else 0


class SocketDetail(NamedTuple):
    """One inet_diag_msg with the attributes process attribution reads."""

    socket: InetSocket
    cgroup_id: int | None  # INET_DIAG_CGROUP_ID; None when absent (TIME_WAIT and request
    # sockets carry no attributes, nor do kernels without CONFIG_SOCK_CGROUP_DATA)


class DetailReply(NamedTuple):
    """What one datagram of a SOCK_DIAG_BY_FAMILY reply (lookup or dump) holds."""

    sockets: list[SocketDetail]
    done: bool  # the request is answered: NLMSG_DONE/ERROR, or a lookup's single message
    errno: int  # positive errno when the kernel refused (ENOENT: no such socket), else 0


def encode_diag_request(family: int, protocol: int, states: int, seq: int,
                        ext: int = 0) -> bytes:
    """SOCK_DIAG_BY_FAMILY with NLM_F_DUMP: every `protocol` socket of `family` whose state
    bit is set in `states` (see `states_mask`); `ext` asks for INET_DIAG_* extensions."""
    payload = INET_DIAG_REQ_V2.pack(family, protocol, ext, 0, states, b"\0\0", b"\0\0",
                                    bytes(16), bytes(16), 0, INET_DIAG_NOCOOKIE,
                                    INET_DIAG_NOCOOKIE)
    return pack_message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, payload)


def encode_lookup_request(family: int, protocol: int, local: str | bytes, lport: int,
                          remote: str | bytes, rport: int, seq: int, ext: int = 0) -> bytes:
    """SOCK_DIAG_BY_FAMILY without NLM_F_DUMP: the one `protocol` socket whose local end is
    local:lport and whose peer is remote:rport (addresses as text or packed bytes).

    The kernel looks the socket up as its receive path would, so the answer may be a socket
    that matches less than the whole tuple: a TCP listener when no connection matches
    (inet_diag_find_one_icsk → inet_lookup), an unconnected or wildcard-bound UDP socket
    (udp_dump_one → __udp4_lib_lookup/__udp6_lib_lookup). The UDP handler passes idiag_src as
    the packet's *source*, i.e. the peer ("src and dst are swapped for historical reasons",
    net/ipv4/udp_diag.c), so for UDP and UDP-Lite the peer goes into idiag_src; TCP takes the
    local end there. Checked on 6.18: the other order answers ENOENT.
    """
    size = _ADDRESS_SIZES.get(family)
    if size is None:
        raise ValueError(f"family {family} is not AF_INET/AF_INET6")
    local_raw, remote_raw = _packed(family, local), _packed(family, remote)
    if protocol in (IPPROTO_UDP, IPPROTO_UDPLITE):
        src, sport, dst, dport = remote_raw, rport, local_raw, lport
    else:
        src, sport, dst, dport = local_raw, lport, remote_raw, rport
    payload = INET_DIAG_REQ_V2.pack(family, protocol, ext, 0, ALL_STATES,
                                    _PORT.pack(sport), _PORT.pack(dport), src.ljust(16, b"\0"),
                                    dst.ljust(16, b"\0"), 0, INET_DIAG_NOCOOKIE,
                                    INET_DIAG_NOCOOKIE)
    return pack_message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, payload)


def encode_port_dump_request(family: int, protocol: int, states: int, lport: int, seq: int,
                             ext: int = 0) -> bytes:
    """A dump like `encode_diag_request`, filtered in the kernel to sockets whose local port is
    `lport`: INET_DIAG_REQ_BYTECODE with one INET_DIAG_BC_S_EQ op (its operand is the next
    op's `no`, host order), jumping past the end on a match and beyond it otherwise."""
    header = INET_DIAG_REQ_V2.pack(family, protocol, ext, 0, states, b"\0\0", b"\0\0",
                                   bytes(16), bytes(16), 0, INET_DIAG_NOCOOKIE,
                                   INET_DIAG_NOCOOKIE)
    size = INET_DIAG_BC_OP.size
    bytecode = (INET_DIAG_BC_OP.pack(INET_DIAG_BC_S_EQ, 2 * size, 3 * size)
                + INET_DIAG_BC_OP.pack(0, 0, lport))
    return pack_message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq,
                        header + pack_attr(INET_DIAG_REQ_BYTECODE, bytecode))


def _packed(family: int, address: str | bytes) -> bytes:
    """The family's raw address; ValueError when it is not one of that family."""
    raw = address if isinstance(address, bytes) else ipaddress.ip_address(address).packed
    if len(raw) != _ADDRESS_SIZES[family]:
        raise ValueError(f"address {address!r} is not of family {family}")
    return raw


def decode_inet_diag(data: bytes | memoryview, header: MessageHeader) -> InetSocket:
    """One inet_diag_msg; its attributes are checked for framing and otherwise skipped."""
    return decode_socket_detail(data, header).socket


def decode_socket_detail(data: bytes | memoryview, header: MessageHeader) -> SocketDetail:
    """One inet_diag_msg and its INET_DIAG_CGROUP_ID; other attributes are checked for framing
    and skipped."""
    start, end, msg_type = header.start, header.end, header.msg_type
    if end - start < INET_DIAG_MSG.size:
        raise DecodeError(start, f"truncated inet_diag_msg: {end - start} bytes "
                          f"< {INET_DIAG_MSG.size}", msg_type)
    values = INET_DIAG_MSG.unpack_from(data, start)
    family = values[0]
    size = _ADDRESS_SIZES.get(family)
    if size is None:
        raise DecodeError(start, f"inet_diag_msg of family {family}, not AF_INET/AF_INET6",
                          msg_type)
    cgroup_id: int | None = None
    for attr, a_start, a_end in iter_attrs(data, start + INET_DIAG_MSG.size, end, msg_type):
        if attr == InetDiagAttr.CGROUP_ID:
            if a_end - a_start < _U64.size:
                raise DecodeError(a_start - 4, f"attribute INET_DIAG_CGROUP_ID: length "
                                  f"{a_end - a_start} < {_U64.size}", msg_type)
            cgroup_id = int(_U64.unpack_from(data, a_start)[0])
    sport, dport = values[4], values[5]
    sock = InetSocket(family, values[1], (sport[0] << 8) | sport[1], (dport[0] << 8) | dport[1],
                      address_text(family, values[6][:size]),
                      address_text(family, values[7][:size]), values[14], values[15])
    return SocketDetail(sock, cgroup_id)


def decode_diag_dump(data: bytes | memoryview) -> DiagDump:
    """Decode one datagram of a SOCK_DIAG_BY_FAMILY dump reply; other types are skipped."""
    sockets: list[InetSocket] = []
    for header in split_messages(data):
        if header.msg_type == SOCK_DIAG_BY_FAMILY:
            sockets.append(decode_inet_diag(data, header))
        elif header.msg_type in (NLMSG_DONE, NLMSG_ERROR):
            return DiagDump(sockets, True, dump_status(data, header))
    return DiagDump(sockets, False, 0)


def decode_diag_details(data: bytes | memoryview) -> DetailReply:
    """Decode one datagram of a SOCK_DIAG_BY_FAMILY reply with each socket's cgroup id: a
    dump's (NLM_F_MULTI messages, then NLMSG_DONE) or an exact lookup's (one message without
    NLM_F_MULTI, or NLMSG_ERROR). Other message types are skipped."""
    sockets: list[SocketDetail] = []
    for header in split_messages(data):
        if header.msg_type == SOCK_DIAG_BY_FAMILY:
            sockets.append(decode_socket_detail(data, header))
            if not header.flags & NLM_F_MULTI:
                return DetailReply(sockets, True, 0)
        elif header.msg_type in (NLMSG_DONE, NLMSG_ERROR):
            return DetailReply(sockets, True, dump_status(data, header))
    return DetailReply(sockets, False, 0)

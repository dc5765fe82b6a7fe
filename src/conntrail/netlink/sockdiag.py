"""inet_diag codec: SOCK_DIAG_BY_FAMILY dump requests to bytes, inet_diag_msg replies to records.

Layouts follow linux/sock_diag.h (SOCK_DIAG_BY_FAMILY) and linux/inet_diag.h (struct
inet_diag_req_v2, inet_diag_sockid, inet_diag_msg); socket states are enum of
include/net/tcp_states.h (not a uapi header; UDP uses the same numbers). Ports and addresses
are network order, everything else host order. Address text is the conntrack codec's.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from conntrail.errors import DecodeError
from conntrail.model import AF_INET, AF_INET6
from conntrail.netlink.rtnl import address_text, dump_status
from conntrail.netlink.wire import (
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    MessageHeader,
    iter_attrs,
    pack_message,
    split_messages,
)

SOCK_DIAG_BY_FAMILY = 20  # sock_diag.h: request and reply type
INET_DIAG_NOCOOKIE = 0xFFFFFFFF  # inet_diag.h: idiag_cookie value meaning "no cookie"
IPPROTO_TCP = 6  # linux/in.h
IPPROTO_UDP = 17


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


def encode_diag_request(family: int, protocol: int, states: int, seq: int,
                        ext: int = 0) -> bytes:
    """SOCK_DIAG_BY_FAMILY with NLM_F_DUMP: every `protocol` socket of `family` whose state
    bit is set in `states` (see `states_mask`); `ext` asks for INET_DIAG_* extensions."""
    payload = INET_DIAG_REQ_V2.pack(family, protocol, ext, 0, states, b"\0\0", b"\0\0",
                                    bytes(16), bytes(16), 0, INET_DIAG_NOCOOKIE,
                                    INET_DIAG_NOCOOKIE)
    return pack_message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, payload)


def decode_inet_diag(data: bytes | memoryview, header: MessageHeader) -> InetSocket:
    """One inet_diag_msg; its attributes are checked for framing and otherwise skipped."""
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
    for _ in iter_attrs(data, start + INET_DIAG_MSG.size, end, msg_type):
        pass  # INET_DIAG_* extensions: not needed yet (process attribution will read them)
    sport, dport = values[4], values[5]
    return InetSocket(family, values[1], (sport[0] << 8) | sport[1], (dport[0] << 8) | dport[1],
                      address_text(family, values[6][:size]),
                      address_text(family, values[7][:size]), values[14], values[15])


def decode_diag_dump(data: bytes | memoryview) -> DiagDump:
    """Decode one datagram of a SOCK_DIAG_BY_FAMILY dump reply; other types are skipped."""
    sockets: list[InetSocket] = []
    for header in split_messages(data):
        if header.msg_type == SOCK_DIAG_BY_FAMILY:
            sockets.append(decode_inet_diag(data, header))
        elif header.msg_type in (NLMSG_DONE, NLMSG_ERROR):
            return DiagDump(sockets, True, dump_status(data, header))
    return DiagDump(sockets, False, 0)

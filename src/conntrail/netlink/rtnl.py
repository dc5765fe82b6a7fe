"""rtnetlink address codec: RTM_GETADDR dump requests to bytes, RTM_NEWADDR replies to records.

Layouts follow linux/rtnetlink.h (message types, rt_scope_t) and linux/if_addr.h (struct
ifaddrmsg, IFA_* attributes). rtnetlink is host byte order except the addresses themselves,
which are raw network-order bytes. Address text is exactly what the conntrack codec writes
(dotted quad; `ipaddress.IPv6Address(raw).compressed`), so the two can be compared as strings.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from typing import NamedTuple

from conntrail.errors import DecodeError
from conntrail.model import AF_INET, AF_INET6, AF_UNSPEC
from conntrail.netlink.wire import (
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    MessageHeader,
    decode_error,
    iter_attrs,
    pack_message,
    split_messages,
)


class RtmType(enum.IntEnum):
    """The address message types of enum rtm_type's RTM_* list (rtnetlink.h)."""

    NEWADDR = 20
    DELADDR = 21
    GETADDR = 22


class IfaAttr(enum.IntEnum):
    """enum IFA_* (if_addr.h)."""

    ADDRESS = 1  # the prefix address; for point-to-point links the *peer* address
    LOCAL = 2  # the local address (present for IPv4 always, for IPv6 only with a peer)
    LABEL = 3
    BROADCAST = 4
    ANYCAST = 5
    CACHEINFO = 6
    MULTICAST = 7
    FLAGS = 8
    RT_PRIORITY = 9
    TARGET_NETNSID = 10
    PROTO = 11


class RtScope(enum.IntEnum):
    """enum rt_scope_t (rtnetlink.h)."""

    UNIVERSE = 0
    SITE = 200
    LINK = 253
    HOST = 254
    NOWHERE = 255


class IfaFlag(enum.IntFlag):
    """ifa_flags / IFA_FLAGS bits (if_addr.h)."""

    SECONDARY = 0x01  # also IFA_F_TEMPORARY for IPv6
    NODAD = 0x02
    OPTIMISTIC = 0x04
    DADFAILED = 0x08
    HOMEADDRESS = 0x10
    DEPRECATED = 0x20
    TENTATIVE = 0x40
    PERMANENT = 0x80
    MANAGETEMPADDR = 0x100
    NOPREFIXROUTE = 0x200
    MCAUTOJOIN = 0x400
    STABLE_PRIVACY = 0x800


IFADDRMSG = struct.Struct("=BBBBI")  # struct ifaddrmsg: family, prefixlen, flags, scope, index
_U32 = struct.Struct("=I")  # IFA_FLAGS: host order u32 that replaces the u8 ifa_flags
_DONE_ERRNO = struct.Struct("=i")  # NLMSG_DONE of a dump carries the dump's (negative) errno

_ADDRESS_SIZES = {AF_INET: 4, AF_INET6: 16}
_A_ADDRESS, _A_LOCAL, _A_BROADCAST, _A_FLAGS = (int(IfaAttr.ADDRESS), int(IfaAttr.LOCAL),
                                                 int(IfaAttr.BROADCAST), int(IfaAttr.FLAGS))
_WANTED = {_A_ADDRESS: "IFA_ADDRESS", _A_LOCAL: "IFA_LOCAL", _A_BROADCAST: "IFA_BROADCAST"}


class IfAddress(NamedTuple):
    """One address of an interface, as an RTM_NEWADDR message describes it."""

    family: int  # AF_INET or AF_INET6
    prefixlen: int
    ifindex: int
    scope: int  # RtScope value: 0 universe, 253 link, 254 host
    address: str  # IFA_LOCAL when present, else IFA_ADDRESS
    broadcast: str | None  # IFA_BROADCAST (IPv4 only in practice), None when absent
    flags: int  # IfaFlag bits: IFA_FLAGS when present, else ifa_flags
    peer: str | None  # point-to-point: IFA_ADDRESS when it differs from IFA_LOCAL, else None


class AddrDump(NamedTuple):
    """What one datagram of an RTM_GETADDR dump reply holds."""

    addresses: list[IfAddress]
    done: bool  # NLMSG_DONE or NLMSG_ERROR seen: nothing more will come for this request
    errno: int  # positive errno when the kernel refused or aborted the dump, else 0


def address_text(family: int, raw: bytes) -> str:
    """An address in the conntrack codec's text form (raw must have the family's size); the
    same formulas as conntrack._ipv4/_ipv6, without their per-event cache."""
    if family == AF_INET:
        return f"{raw[0]}.{raw[1]}.{raw[2]}.{raw[3]}"
    return ipaddress.IPv6Address(raw).compressed


def encode_getaddr_request(seq: int, family: int = AF_UNSPEC) -> bytes:
    """RTM_GETADDR with NLM_F_DUMP: every address of every interface (of `family`)."""
    payload = IFADDRMSG.pack(family, 0, 0, 0, 0)
    return pack_message(RtmType.GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, payload)


def decode_newaddr(data: bytes | memoryview, header: MessageHeader) -> IfAddress | None:
    """One RTM_NEWADDR message; None for families that are not IP (an AF_UNSPEC dump may
    also carry e.g. AF_MCTP addresses). Malformed lengths raise DecodeError."""
    start, end, msg_type = header.start, header.end, header.msg_type
    if end - start < IFADDRMSG.size:
        raise DecodeError(start, f"truncated ifaddrmsg: {end - start} bytes < {IFADDRMSG.size}",
                          msg_type)
    family, prefixlen, flags, scope, ifindex = IFADDRMSG.unpack_from(data, start)
    size = _ADDRESS_SIZES.get(family)
    if size is None:
        return None
    found, wide_flags = _attributes(data, start + IFADDRMSG.size, end, msg_type, family, size)
    local, prefix = found.get(_A_LOCAL), found.get(_A_ADDRESS)
    address = local or prefix
    if address is None:
        raise DecodeError(start, "address message without IFA_LOCAL or IFA_ADDRESS", msg_type)
    peer = prefix if local is not None and prefix != local else None
    return IfAddress(family, prefixlen, ifindex, scope, address, found.get(_A_BROADCAST),
                     flags if wide_flags is None else wide_flags, peer)


def _attributes(data: bytes | memoryview, start: int, end: int, msg_type: int, family: int,
                size: int) -> tuple[dict[int, str], int | None]:
    """The address attributes as text, and IFA_FLAGS (None when absent); the rest is skipped."""
    found: dict[int, str] = {}
    flags: int | None = None
    for attr, a_start, a_end in iter_attrs(data, start, end, msg_type):
        length = a_end - a_start
        name = _WANTED.get(attr)
        if name is not None:
            if length != size:
                raise DecodeError(a_start - 4, f"attribute {name}: length {length} != {size} "
                                  f"for family {family}", msg_type)
            found[attr] = address_text(family, bytes(data[a_start:a_end]))
        elif attr == _A_FLAGS:
            if length < _U32.size:
                raise DecodeError(a_start - 4, f"attribute IFA_FLAGS: length {length} < "
                                  f"{_U32.size}", msg_type)
            flags = int(_U32.unpack_from(data, a_start)[0])
    return found, flags


def dump_status(data: bytes | memoryview, header: MessageHeader) -> int:
    """The errno (positive, 0 for success) that ends a dump: NLMSG_ERROR's, or NLMSG_DONE's
    payload, where the kernel puts the error that cut a dump short (or refused it: inet_diag
    answers an unknown protocol that way). Shared with sockdiag.py; it would fit wire.py."""
    if header.msg_type == NLMSG_ERROR:
        return decode_error(data, header)
    if header.end - header.start < _DONE_ERRNO.size:
        return 0  # a bare NLMSG_DONE: nothing went wrong
    return -int(_DONE_ERRNO.unpack_from(data, header.start)[0])


def decode_addr_dump(data: bytes | memoryview) -> AddrDump:
    """Decode one datagram of an RTM_GETADDR dump reply; other message types are skipped."""
    addresses: list[IfAddress] = []
    for header in split_messages(data):
        if header.msg_type == RtmType.NEWADDR:
            address = decode_newaddr(data, header)
            if address is not None:
                addresses.append(address)
        elif header.msg_type in (NLMSG_DONE, NLMSG_ERROR):
            return AddrDump(addresses, True, dump_status(data, header))
    return AddrDump(addresses, False, 0)

"""Netlink framing shared by every family: nlmsghdr, nfgenmsg and attribute (nlattr) walking.

Layouts follow linux/netlink.h and linux/netfilter/nfnetlink.h. Netlink headers are in host
byte order; nfnetlink payloads are mostly network order, decoded by the family modules.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from conntrail.errors import DecodeError

NLMSGHDR = struct.Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, pid
NFGENMSG = struct.Struct("!BBH")  # struct nfgenmsg: family, version, res_id (big endian)
NLATTR = struct.Struct("=HH")  # struct nlattr: len, type
NLMSGERR = struct.Struct("=i")  # struct nlmsgerr starts with the (negative) errno

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4

NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_EXCL = 0x200  # on NEW requests/events: same bit as MATCH, meaning differs by type
NLM_F_CREATE = 0x400

NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = 0x3FFF

NFNETLINK_V0 = 0


def align4(length: int) -> int:
    """Round a length up to netlink's 4-byte alignment (NLMSG_ALIGN / NLA_ALIGN)."""
    return (length + 3) & ~3


@dataclass(frozen=True, slots=True)
class MessageHeader:
    """A decoded nlmsghdr plus where its payload lies in the datagram."""

    msg_type: int
    flags: int
    seq: int
    pid: int
    start: int  # first payload byte
    end: int  # one past the message's last byte


def split_messages(data: bytes | memoryview) -> Iterator[MessageHeader]:
    """Yield each netlink message of a datagram; malformed lengths raise DecodeError."""
    total = len(data)
    offset = 0
    unpack = NLMSGHDR.unpack_from
    while offset < total:
        if total - offset < NLMSGHDR.size:
            raise DecodeError(offset, f"truncated nlmsghdr: {total - offset} bytes < 16")
        length, msg_type, flags, seq, pid = unpack(data, offset)
        if length < NLMSGHDR.size or offset + length > total:
            raise DecodeError(offset, f"nlmsghdr length {length} invalid, {total - offset} left",
                              msg_type)
        yield MessageHeader(msg_type, flags, seq, pid, offset + NLMSGHDR.size, offset + length)
        offset += align4(length)


def iter_attrs(data: bytes | memoryview, offset: int, end: int,
               msg_type: int | None = None) -> Iterator[tuple[int, int, int]]:
    """Yield (type without flags, payload start, payload end) for the attributes in a range."""
    unpack = NLATTR.unpack_from
    while offset + 4 <= end:
        length, attr_type = unpack(data, offset)
        if length < 4 or offset + length > end:
            raise DecodeError(offset, f"attribute type {attr_type & NLA_TYPE_MASK}: "
                              f"length {length} invalid, {end - offset} bytes left", msg_type)
        yield attr_type & NLA_TYPE_MASK, offset + 4, offset + length
        offset += align4(length)


def decode_error(data: bytes | memoryview, header: MessageHeader) -> int:
    """The positive errno of an NLMSG_ERROR message (0 means an acknowledgement)."""
    if header.end - header.start < NLMSGERR.size:
        raise DecodeError(header.start, "truncated nlmsgerr", header.msg_type)
    (error,) = NLMSGERR.unpack_from(data, header.start)
    return -int(error)


def pack_attr(attr_type: int, payload: bytes, nested: bool = False) -> bytes:
    """Encode one attribute with its padding."""
    flags = NLA_F_NESTED if nested else 0
    raw = NLATTR.pack(4 + len(payload), attr_type | flags) + payload
    return raw + b"\0" * (align4(len(raw)) - len(raw))


def pack_message(msg_type: int, flags: int, seq: int, payload: bytes, pid: int = 0) -> bytes:
    """Encode one netlink message (header + payload, padded)."""
    raw = NLMSGHDR.pack(NLMSGHDR.size + len(payload), msg_type, flags, seq, pid) + payload
    return raw + b"\0" * (align4(len(raw)) - len(raw))

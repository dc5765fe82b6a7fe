"""Hand-built ctnetlink messages in the kernel's layout, for what a test kernel cannot produce.

Layouts follow linux/netfilter/nfnetlink_conntrack.h and net/netfilter/nf_conntrack_netlink.c:
nests carry NLA_F_NESTED, payloads are big endian, the label bitmap is host-order longs.
"""

from __future__ import annotations

import socket
import struct
import sys

from conntrail.model import AF_INET
from conntrail.netlink.conntrack import (
    NFNL_SUBSYS_CTNETLINK,
    CountersAttr,
    CtAttr,
    CtMsg,
    IpAttr,
    ProtoAttr,
    TimestampAttr,
    TupleAttr,
)
from conntrail.netlink.wire import (
    NFGENMSG,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLMSGHDR,
    pack_attr,
    pack_message,
)

CT_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | CtMsg.NEW
CT_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | CtMsg.DELETE
CT_GET = (NFNL_SUBSYS_CTNETLINK << 8) | CtMsg.GET
EVENT_NEW_FLAGS = NLM_F_CREATE | NLM_F_EXCL
NLMSG_HEADER_SIZE = NLMSGHDR.size  # 16
NFGEN_SIZE = NFGENMSG.size  # 4
ATTRS_START = NLMSG_HEADER_SIZE + NFGEN_SIZE  # first attribute of a one-message datagram

# Members of nests this codec does not name (values from nfnetlink_conntrack.h).
CTA_PROTOINFO_DCCP_ROLE = 2
CTA_PROTOINFO_DCCP_HANDSHAKE_SEQ = 3
CTA_PROTOINFO_TCP_WSCALE_ORIGINAL = 2
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL = 4
CTA_HELP_NAME = 1
CTA_SECCTX_NAME = 1
CTA_TIMESTAMP_PAD = 3


def u8(value: int) -> bytes:
    """One byte."""
    return struct.pack("B", value)


def be16(value: int) -> bytes:
    """Big endian 16 bits."""
    return struct.pack("!H", value)


def be32(value: int) -> bytes:
    """Big endian 32 bits."""
    return struct.pack("!I", value)


def be64(value: int) -> bytes:
    """Big endian 64 bits."""
    return struct.pack("!Q", value)


def nest(attr_type: int, *members: bytes) -> bytes:
    """A nested attribute, flagged NLA_F_NESTED as the kernel does."""
    return pack_attr(attr_type, b"".join(members), nested=True)


def ip_members(family: int, src: str, dst: str) -> bytes:
    """CTA_IP_V4_* or CTA_IP_V6_* source then destination."""
    if family == AF_INET:
        return (pack_attr(IpAttr.V4_SRC, socket.inet_pton(socket.AF_INET, src))
                + pack_attr(IpAttr.V4_DST, socket.inet_pton(socket.AF_INET, dst)))
    return (pack_attr(IpAttr.V6_SRC, socket.inet_pton(socket.AF_INET6, src))
            + pack_attr(IpAttr.V6_DST, socket.inet_pton(socket.AF_INET6, dst)))


def proto_members(proto: int, sport: int | None = None, dport: int | None = None,
                  icmp: tuple[int, int, int] | None = None, family: int = AF_INET) -> bytes:
    """CTA_PROTO_NUM, then ports (or GRE keys), or ICMP id, type, code as the kernel orders
    them."""
    out = pack_attr(ProtoAttr.NUM, u8(proto))
    if sport is not None:
        out += pack_attr(ProtoAttr.SRC_PORT, be16(sport))
    if dport is not None:
        out += pack_attr(ProtoAttr.DST_PORT, be16(dport))
    if icmp is not None:
        icmp_type, code, ident = icmp
        if family == AF_INET:
            out += (pack_attr(ProtoAttr.ICMP_ID, be16(ident))
                    + pack_attr(ProtoAttr.ICMP_TYPE, u8(icmp_type))
                    + pack_attr(ProtoAttr.ICMP_CODE, u8(code)))
        else:
            out += (pack_attr(ProtoAttr.ICMPV6_ID, be16(ident))
                    + pack_attr(ProtoAttr.ICMPV6_TYPE, u8(icmp_type))
                    + pack_attr(ProtoAttr.ICMPV6_CODE, u8(code)))
    return out


def tuple_members(family: int, proto: int, src: str, dst: str, sport: int | None = None,
                  dport: int | None = None, *, icmp: tuple[int, int, int] | None = None,
                  zone: int | None = None, extra: bytes = b"") -> bytes:
    """The members of a CTA_TUPLE_* nest: IP nest, proto nest, optional zone, then `extra`."""
    out = (nest(TupleAttr.IP, ip_members(family, src, dst))
           + nest(TupleAttr.PROTO, proto_members(proto, sport, dport, icmp, family)))
    if zone is not None:
        out += pack_attr(TupleAttr.ZONE, be16(zone))
    return out + extra


def tuple_attr(which: int, family: int, proto: int, src: str, dst: str,
               sport: int | None = None, dport: int | None = None, *,
               icmp: tuple[int, int, int] | None = None, zone: int | None = None,
               extra: bytes = b"") -> bytes:
    """A whole CTA_TUPLE_ORIG or CTA_TUPLE_REPLY."""
    return nest(which, tuple_members(family, proto, src, dst, sport, dport, icmp=icmp,
                                     zone=zone, extra=extra))


def both_tuples(family: int, proto: int, src: str, dst: str, sport: int | None = None,
                dport: int | None = None) -> bytes:
    """CTA_TUPLE_ORIG and the mirrored CTA_TUPLE_REPLY of a flow without NAT."""
    return (tuple_attr(CtAttr.TUPLE_ORIG, family, proto, src, dst, sport, dport)
            + tuple_attr(CtAttr.TUPLE_REPLY, family, proto, dst, src, dport, sport))


def protoinfo(kind: int, state: int, *extra: bytes) -> bytes:
    """CTA_PROTOINFO { CTA_PROTOINFO_TCP/DCCP/SCTP { STATE, extra… } }."""
    return nest(CtAttr.PROTOINFO, nest(kind, pack_attr(1, u8(state)), *extra))


def counters(which: int, packets: int, octets: int, *, bits: int = 64) -> bytes:
    """CTA_COUNTERS_ORIG/REPLY with 64-bit or the old 32-bit members."""
    if bits == 64:
        return nest(which, pack_attr(CountersAttr.PACKETS, be64(packets)),
                    pack_attr(CountersAttr.BYTES, be64(octets)))
    return nest(which, pack_attr(CountersAttr.PACKETS32, be32(packets)),
                pack_attr(CountersAttr.BYTES32, be32(octets)))


def timestamp(start: int, stop: int | None = None) -> bytes:
    """CTA_TIMESTAMP { START, STOP }."""
    members = pack_attr(TimestampAttr.START, be64(start))
    if stop is not None:
        members += pack_attr(TimestampAttr.STOP, be64(stop))
    return nest(CtAttr.TIMESTAMP, members)


def labels(value: int, size: int = 16) -> bytes:
    """CTA_LABELS: the kernel's bitmap of unsigned longs, copied in host byte order."""
    words = [(value >> (64 * i)) & (2**64 - 1) for i in range(size // 8)]
    order = "<" if sys.byteorder == "little" else ">"
    return pack_attr(CtAttr.LABELS, b"".join(struct.pack(order + "Q", w) for w in words))


def scalar32(attr: int, value: int) -> bytes:
    """A big-endian u32 attribute (status, timeout, mark, use, id)."""
    return pack_attr(attr, be32(value))


def ct_message(attrs: bytes, *, msg_type: int = CT_NEW, flags: int = EVENT_NEW_FLAGS,
               seq: int = 0, family: int = AF_INET, pid: int = 0) -> bytes:
    """One ctnetlink message: nlmsghdr, nfgenmsg, attributes."""
    return pack_message(msg_type, flags, seq, NFGENMSG.pack(family, 0, 0) + attrs, pid)


def raw_header(length: int, msg_type: int, flags: int = 0, seq: int = 0, pid: int = 0) -> bytes:
    """An nlmsghdr with any length field, for malformed input."""
    return NLMSGHDR.pack(length, msg_type, flags, seq, pid)


def raw_attr(length: int, attr_type: int, payload: bytes = b"") -> bytes:
    """An nlattr with any length field, for malformed input."""
    return struct.pack("=HH", length, attr_type) + payload

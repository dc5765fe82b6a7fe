"""nf_tables netlink encoder for conntrail's own rules (socket identity into ct labels), and
decoding of the kernel's answers to a batch.

The `nft` command refuses `ct label set meta skuid . meta skgid . socket cgroupv2 level N`
(datatype mismatch) but the kernel only checks register lengths, so the bytecode is written
here. Constants cite linux/netfilter/nf_tables.h, linux/netfilter/nfnetlink.h and
linux/netfilter.h; the ordering of expressions is the one nftables itself emits.

Byte order: every nf_tables *attribute* number (keys, registers, lengths, levels, hook,
priority, policy, verdict) is big endian (`nla_get_be32`); register *contents* (immediate,
cmp and bitwise data) are copied verbatim, and the values the rules load (uid, gid, ct state,
cgroup id) are host-order integers, so data is packed in host order.

Label layout (16 bytes = registers NFT_REG32_00..03 copied verbatim into the label bitmap,
read by the conntrack codec as one host-order integer): bits 0-31 uid, 32-63 gid, 64-127 the
cgroup field, whose top bit (label bit 127) marks "written by conntrail" so uid 0 is told
from no label; the field without that bit is the cgroup v2 id (the cgroup directory's inode
number; 1 is the root), 0 when unknown.
"""

from __future__ import annotations

import enum
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from conntrail.errors import DecodeError
from conntrail.netlink.wire import (
    NFGENMSG,
    NFNETLINK_V0,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NLMSGERR,
    NLMSGHDR,
    iter_attrs,
    pack_attr,
    pack_message,
    split_messages,
)

# linux/netfilter/nfnetlink.h
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10  # NLMSG_MIN_TYPE
NFNL_MSG_BATCH_END = 0x11
# linux/netfilter.h: enum nf_inet_hooks, NFPROTO_*, verdicts
NFPROTO_UNSPEC = 0
NFPROTO_INET = 1
NF_INET_LOCAL_OUT = 3
NF_ACCEPT = 1
# linux/netfilter_ipv4.h: enum nf_ip_hook_priorities
NF_IP_PRI_CONNTRACK = -200
NF_IP_PRI_FILTER = 0
# linux/netlink.h: NEW request flag, extended ACKs
NLM_F_APPEND = 0x800
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1
NLMSGERR_ATTR_OFFS = 2
# linux/netfilter/nf_conntrack_common.h: NF_CT_STATE_BIT(IP_CT_NEW) = 1 << (2 + 1)
CT_STATE_NEW = 1 << 3
IPS_CONFIRMED = 1 << 3  # enum ip_conntrack_status (nf_conntrack_common.h)


class NftMsg(enum.IntEnum):
    """enum nf_tables_msg_types (nf_tables.h)."""

    NEWTABLE = 0
    GETTABLE = 1
    DELTABLE = 2
    NEWCHAIN = 3
    NEWRULE = 6
    GETGEN = 16


class Reg(enum.IntEnum):
    """enum nft_registers (nf_tables.h): the verdict, 16-byte NFT_REG_1 and 4-byte REG32s."""

    VERDICT = 0
    REG_1 = 1
    REG32_00 = 8
    REG32_01 = 9
    REG32_02 = 10
    REG32_03 = 11


class TableAttr(enum.IntEnum):
    """enum nft_table_attributes."""

    NAME = 1
    FLAGS = 2
    USERDATA = 6


class ChainAttr(enum.IntEnum):
    """enum nft_chain_attributes."""

    TABLE = 1
    NAME = 3
    HOOK = 4
    POLICY = 5
    TYPE = 7


class HookAttr(enum.IntEnum):
    """enum nft_hook_attributes."""

    HOOKNUM = 1
    PRIORITY = 2


class RuleAttr(enum.IntEnum):
    """enum nft_rule_attributes."""

    TABLE = 1
    CHAIN = 2
    EXPRESSIONS = 4


NFTA_LIST_ELEM = 1  # enum nft_list_attributes


class ExprAttr(enum.IntEnum):
    """enum nft_expr_attributes."""

    NAME = 1
    DATA = 2


class DataAttr(enum.IntEnum):
    """enum nft_data_attributes, and NFTA_VERDICT_CODE of enum nft_verdict_attributes."""

    VALUE = 1
    VERDICT = 2


NFTA_VERDICT_CODE = 1


class MetaKey(enum.IntEnum):
    """enum nft_meta_keys (the ones conntrail loads)."""

    SKUID = 10
    SKGID = 11


class CtKey(enum.IntEnum):
    """enum nft_ct_keys (the ones conntrail uses)."""

    STATE = 0
    STATUS = 2
    LABELS = 13


NFT_SOCKET_CGROUPV2 = 3  # enum nft_socket_keys
NFT_CMP_EQ = 0  # enum nft_cmp_ops
NFT_BITWISE_MASK_XOR = 0  # enum nft_bitwise_ops (NFT_BITWISE_BOOL before 6.13)

# Attribute numbers per expression (nf_tables.h: enum nft_<name>_attributes).
NFTA_META_DREG, NFTA_META_KEY = 1, 2
NFTA_SOCKET_KEY, NFTA_SOCKET_DREG, NFTA_SOCKET_LEVEL = 1, 2, 3
NFTA_IMMEDIATE_DREG, NFTA_IMMEDIATE_DATA = 1, 2
(NFTA_BITWISE_SREG, NFTA_BITWISE_DREG, NFTA_BITWISE_LEN, NFTA_BITWISE_MASK, NFTA_BITWISE_XOR,
 NFTA_BITWISE_OP) = 1, 2, 3, 4, 5, 6
NFTA_CT_DREG, NFTA_CT_KEY, NFTA_CT_SREG = 1, 2, 4
NFTA_CMP_SREG, NFTA_CMP_OP, NFTA_CMP_DATA = 1, 2, 3

NFTNL_UDATA_TABLE_COMMENT = 0  # libnftnl udata TLV (u8 type, u8 len) that nft shows as comment

BE32 = struct.Struct("!I")
BE32_SIGNED = struct.Struct("!i")
HOST_U32 = struct.Struct("=I")
HOST_U64 = struct.Struct("=Q")

TABLE = "conntrail_attr"
CHAIN = "identity"
CHAIN_PRIORITY = NF_IP_PRI_FILTER  # after conntrack (-200): the flow's ct exists
DEFAULT_LEVELS = 8
MAX_LEVEL = 255  # nft_socket refuses deeper levels (EOPNOTSUPP)
LABEL_BYTES = 16
MARKER = 1 << 63  # top bit of the cgroup field, i.e. label bit 127
KERNEL = 1 << 62  # with MARKER: a flow whose first packet no user socket sent
KERNEL_LABEL = (MARKER | KERNEL) << 64  # uid, gid and cgroup fields all zero
TABLE_COMMENT = "conntrail: socket uid, gid and cgroup v2 id into conntrack labels"


def decode_label(labels: int | None) -> tuple[int, int, int | None] | None:
    """(uid, gid, cgroup v2 id or None) from a CTA_LABELS value; None when not ours."""
    if labels is None:
        return None
    field = labels >> 64
    if not field & MARKER or field & KERNEL:
        return None
    cgroup = field & ~MARKER
    return labels & 0xFFFFFFFF, (labels >> 32) & 0xFFFFFFFF, cgroup or None


def is_kernel_label(labels: int | None) -> bool:
    """True when our rules found no user socket behind the flow's first packet."""
    return labels == KERNEL_LABEL


def encode_label(uid: int, gid: int, cgroup: int | None) -> int:
    """The label value conntrail's rules write for a socket (the inverse of decode_label)."""
    return uid | gid << 32 | ((cgroup or 0) | MARKER) << 64


# ---- attributes and expressions ---------------------------------------------------------

def _be32(attr: int, value: int) -> bytes:
    return pack_attr(attr, BE32.pack(value))


def _strz(attr: int, text: str) -> bytes:
    return pack_attr(attr, text.encode() + b"\0")


def _nest(attr: int, *parts: bytes) -> bytes:
    return pack_attr(attr, b"".join(parts), nested=True)


def _data_value(attr: int, value: bytes) -> bytes:
    """NFTA_*_DATA / MASK / XOR: a nested NFTA_DATA_VALUE (struct nft_data)."""
    return _nest(attr, pack_attr(DataAttr.VALUE, value))


def expression(name: str, *attrs: bytes) -> bytes:
    """One NFTA_LIST_ELEM: the expression's name and its NFTA_EXPR_DATA nest."""
    return _nest(NFTA_LIST_ELEM, _strz(ExprAttr.NAME, name), _nest(ExprAttr.DATA, *attrs))


def meta_load(key: MetaKey, dreg: Reg) -> bytes:
    """`meta KEY` into a register (breaks when the packet has no full local socket)."""
    return expression("meta", _be32(NFTA_META_KEY, key), _be32(NFTA_META_DREG, dreg))


def ct_load(key: CtKey, dreg: Reg) -> bytes:
    """`ct KEY` into a register."""
    return expression("ct", _be32(NFTA_CT_KEY, key), _be32(NFTA_CT_DREG, dreg))


def ct_store(key: CtKey, sreg: Reg) -> bytes:
    """`ct KEY set` from a register (labels: 16 bytes from sreg on)."""
    return expression("ct", _be32(NFTA_CT_KEY, key), _be32(NFTA_CT_SREG, sreg))


def cmp_eq(sreg: Reg, value: bytes) -> bytes:
    """Continue only when the register equals `value` (register bytes, host order)."""
    return expression("cmp", _be32(NFTA_CMP_SREG, sreg), _be32(NFTA_CMP_OP, NFT_CMP_EQ),
                      _data_value(NFTA_CMP_DATA, value))


def socket_cgroupv2(level: int, dreg: Reg) -> bytes:
    """`socket cgroupv2 level L`: the socket's ancestor cgroup id at L (8 bytes), or break."""
    return expression("socket", _be32(NFTA_SOCKET_KEY, NFT_SOCKET_CGROUPV2),
                      _be32(NFTA_SOCKET_DREG, dreg), _be32(NFTA_SOCKET_LEVEL, level))


def immediate(dreg: Reg, value: bytes) -> bytes:
    """Load constant register bytes."""
    return expression("immediate", _be32(NFTA_IMMEDIATE_DREG, dreg),
                      _data_value(NFTA_IMMEDIATE_DATA, value))


def accept() -> bytes:
    """The `accept` verdict: ends this chain's evaluation (not the packet's other hooks)."""
    verdict = _nest(DataAttr.VERDICT, _be32(NFTA_VERDICT_CODE, NF_ACCEPT))
    return expression("immediate", _be32(NFTA_IMMEDIATE_DREG, Reg.VERDICT),
                      _nest(NFTA_IMMEDIATE_DATA, verdict))


def bitwise(sreg: Reg, dreg: Reg, mask: bytes, xor: bytes) -> bytes:
    """dreg = (sreg & mask) ^ xor over len(mask) bytes."""
    if len(mask) != len(xor):
        raise ValueError("bitwise mask and xor differ in length")
    return expression("bitwise", _be32(NFTA_BITWISE_SREG, sreg), _be32(NFTA_BITWISE_DREG, dreg),
                      _be32(NFTA_BITWISE_LEN, len(mask)), _data_value(NFTA_BITWISE_MASK, mask),
                      _data_value(NFTA_BITWISE_XOR, xor), _be32(NFTA_BITWISE_OP,
                                                               NFT_BITWISE_MASK_XOR))


# ---- conntrail's rules ------------------------------------------------------------------

def guard_rule() -> list[bytes]:
    """`ct state != new accept`: every later rule only sees a flow's first packets."""
    return [
        ct_load(CtKey.STATE, Reg.REG_1),
        bitwise(Reg.REG_1, Reg.REG_1, HOST_U32.pack(CT_STATE_NEW), HOST_U32.pack(0)),
        cmp_eq(Reg.REG_1, HOST_U32.pack(0)),
        accept(),
    ]


def confirmed_guard_rule() -> list[bytes]:
    """`ct status confirmed accept`: of a new flow, only the very first packet is labelled.
    A second unanswered UDP datagram is still `new` but confirmed; labelling it again would
    OR its socket's ids into the first one's (labels are only ever set, never cleared)."""
    return [
        ct_load(CtKey.STATUS, Reg.REG_1),
        bitwise(Reg.REG_1, Reg.REG_1, HOST_U32.pack(IPS_CONFIRMED), HOST_U32.pack(0)),
        cmp_eq(Reg.REG_1, HOST_U32.pack(IPS_CONFIRMED)),
        accept(),
    ]


def _uid_gid() -> list[bytes]:
    """uid → REG32_00, gid → REG32_01; both break without a full socket opened by a user
    (kernel-originated packets: RSTs, ICMP errors, IGMP reports)."""
    return [meta_load(MetaKey.SKUID, Reg.REG32_00), meta_load(MetaKey.SKGID, Reg.REG32_01)]


def base_rule() -> list[bytes]:
    """uid, gid and the marker with cgroup 0 (unknown): when no level rule matched."""
    return [*_uid_gid(), immediate(Reg.REG32_02, HOST_U64.pack(MARKER)),
            ct_store(CtKey.LABELS, Reg.REG32_00), accept()]


def kernel_rule() -> list[bytes]:
    """The last rule, reached only when no socket rule matched: no full socket opened by a
    user sent this first packet, the kernel did (IGMP/MLD reports, tunnels, NFS…)."""
    return [immediate(Reg.REG32_00, KERNEL_LABEL.to_bytes(16, sys.byteorder)),
            ct_store(CtKey.LABELS, Reg.REG32_00)]


def level_rule(level: int) -> list[bytes]:
    """uid, gid and the socket's cgroup v2 ancestor at `level` (0: the root), marker set.

    Ends with accept: `ct labels set` only ever sets bits (nf_connlabels_replace with
    mask = data), so a second matching rule would OR its cgroup id into the first one's.
    """
    if not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"cgroup level {level} outside 0..{MAX_LEVEL}")
    return [*_uid_gid(), socket_cgroupv2(level, Reg.REG32_02),
            bitwise(Reg.REG32_02, Reg.REG32_02, HOST_U64.pack(~MARKER & (1 << 64) - 1),
                    HOST_U64.pack(MARKER)),
            ct_store(CtKey.LABELS, Reg.REG32_00), accept()]


def rule_set(levels: int) -> list[tuple[str, list[bytes]]]:
    """(name, expressions) in chain order: the guard, levels deepest first, the base rule.

    `socket cgroupv2 level L` breaks when the socket's cgroup is shallower than L, so the
    first level rule that matches is the deepest; levels 0 installs no level rule at all
    (uid and gid only), otherwise levels `levels`..0 are installed (0 = root cgroup).
    """
    rules = [("ct state != new accept", guard_rule()),
             ("ct status confirmed accept", confirmed_guard_rule())]
    if levels:
        rules += [(f"cgroup level {level}", level_rule(level))
                  for level in range(levels, -1, -1)]
    rules.append(("uid, gid, no cgroup", base_rule()))
    rules.append(("kernel", kernel_rule()))
    return rules


# ---- messages and batches ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BatchEntry:
    """One message of a batch: its sequence number and what it does, for error reports."""

    seq: int
    what: str


@dataclass(frozen=True, slots=True)
class Batch:
    """An encoded nfnetlink batch and the messages inside it that the kernel acknowledges."""

    data: bytes
    begin_seq: int
    entries: tuple[BatchEntry, ...]

    def describe(self, seq: int, offset: int | None = None) -> str:
        """What the message with this sequence number did ('batch' for begin/end), and
        which expression of it a bad-attribute `offset` (extended ACK) points into."""
        what = next((entry.what for entry in self.entries if entry.seq == seq), "batch")
        if offset is not None:
            where = _locate(self.data, seq, offset)
            if where:
                what += f", {where}"
        return what


def _locate(data: bytes, seq: int, offset: int) -> str:
    """'expression N (name)' or 'attribute T' at `offset` bytes into message `seq`."""
    for header in split_messages(data):
        if header.seq != seq:
            continue
        target = header.start - NLMSGHDR.size + offset
        for attr, start, end in iter_attrs(data, header.start + NFGENMSG.size, header.end):
            if not start - 4 <= target < end:
                continue
            if attr != RuleAttr.EXPRESSIONS or header.msg_type != nft_type(NftMsg.NEWRULE):
                return f"attribute {attr}"
            for index, (_, e_start, e_end) in enumerate(iter_attrs(data, start, end), 1):
                if e_start - 4 <= target < e_end:
                    names = [bytes(data[a:b]).rstrip(b"\0").decode(errors="replace")
                             for kind, a, b in iter_attrs(data, e_start, e_end)
                             if kind == ExprAttr.NAME]
                    return f"expression {index} ({names[0] if names else '?'})"
            return f"attribute {attr}"
    return ""


def nft_type(msg: NftMsg) -> int:
    """nlmsg_type of an nf_tables message: subsystem in the high byte."""
    return NFNL_SUBSYS_NFTABLES << 8 | msg


class BatchBuilder:
    """Frames messages between NFNL_MSG_BATCH_BEGIN and END, each asking for an ACK."""

    def __init__(self, first_seq: int = 1) -> None:
        self._seq = first_seq
        self._parts: list[bytes] = []
        self._entries: list[BatchEntry] = []
        self._begin_seq = self._control(NFNL_MSG_BATCH_BEGIN)

    def _control(self, msg_type: int) -> int:
        seq = self._seq
        self._seq += 1
        payload = NFGENMSG.pack(NFPROTO_UNSPEC, NFNETLINK_V0, NFNL_SUBSYS_NFTABLES)
        self._parts.append(pack_message(msg_type, NLM_F_REQUEST, seq, payload))
        return seq

    def add(self, msg: NftMsg, what: str, attrs: Iterable[bytes], flags: int = 0,
            family: int = NFPROTO_INET) -> None:
        """Append one nf_tables message (NLM_F_REQUEST | NLM_F_ACK | flags)."""
        seq = self._seq
        self._seq += 1
        payload = NFGENMSG.pack(family, NFNETLINK_V0, 0) + b"".join(attrs)
        self._parts.append(pack_message(nft_type(msg), NLM_F_REQUEST | NLM_F_ACK | flags, seq,
                                        payload))
        self._entries.append(BatchEntry(seq, what))

    def build(self) -> Batch:
        """Close the batch."""
        self._control(NFNL_MSG_BATCH_END)
        return Batch(b"".join(self._parts), self._begin_seq, tuple(self._entries))


def _table_comment(text: str) -> bytes:
    raw = text.encode()[:253] + b"\0"
    return bytes((NFTNL_UDATA_TABLE_COMMENT, len(raw))) + raw


def _new_table(builder: BatchBuilder, table: str) -> None:
    builder.add(NftMsg.NEWTABLE, f"add table inet {table}",
                [_strz(TableAttr.NAME, table), _be32(TableAttr.FLAGS, 0),
                 pack_attr(TableAttr.USERDATA, _table_comment(TABLE_COMMENT))],
                NLM_F_CREATE)


def _new_chain(builder: BatchBuilder, table: str, chain: str, hook: int,
               priority: int) -> None:
    builder.add(NftMsg.NEWCHAIN, f"add chain inet {table} {chain}", [
        _strz(ChainAttr.TABLE, table), _strz(ChainAttr.NAME, chain),
        _nest(ChainAttr.HOOK, _be32(HookAttr.HOOKNUM, hook),
              pack_attr(HookAttr.PRIORITY, BE32_SIGNED.pack(priority))),
        _be32(ChainAttr.POLICY, NF_ACCEPT), _strz(ChainAttr.TYPE, "filter"),
    ], NLM_F_CREATE)


def add_rule(builder: BatchBuilder, what: str, exprs: Sequence[bytes], table: str = TABLE,
             chain: str = CHAIN) -> None:
    """Append a NEWRULE (at the end of the chain)."""
    builder.add(NftMsg.NEWRULE, f"add rule inet {table} {chain}: {what}", [
        _strz(RuleAttr.TABLE, table), _strz(RuleAttr.CHAIN, chain),
        _nest(RuleAttr.EXPRESSIONS, *exprs),
    ], NLM_F_CREATE | NLM_F_APPEND)


def delete_table(builder: BatchBuilder, table: str = TABLE) -> None:
    """Append a DELTABLE (fails with ENOENT when the table is absent)."""
    builder.add(NftMsg.DELTABLE, f"delete table inet {table}", [_strz(TableAttr.NAME, table)])


def install_batch(levels: int = DEFAULT_LEVELS, first_seq: int = 1, table: str = TABLE,
                  priority: int = CHAIN_PRIORITY) -> Batch:
    """One atomic transaction: (re)create the table, its output chain and rules.

    `add table` then `delete table` first, as nft does for a replace: the add makes the
    delete valid when no table exists, the delete drops an older copy with its rules.
    `levels` 0 installs the base rule only (uid and gid, no cgroup).
    """
    if not 0 <= levels <= MAX_LEVEL:
        raise ValueError(f"levels {levels} outside 0..{MAX_LEVEL}")
    builder = BatchBuilder(first_seq)
    _new_table(builder, table)
    delete_table(builder, table)
    _new_table(builder, table)
    _new_chain(builder, table, CHAIN, NF_INET_LOCAL_OUT, priority)
    for what, exprs in rule_set(levels):
        add_rule(builder, what, exprs, table)
    return builder.build()


def remove_batch(first_seq: int = 1, table: str = TABLE) -> Batch:
    """One transaction deleting the table whether or not it exists (add, then delete)."""
    builder = BatchBuilder(first_seq)
    _new_table(builder, table)
    delete_table(builder, table)
    return builder.build()


# ---- answers ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ack:
    """One NLMSG_ERROR answer: errno 0 acknowledges; `message`/`offset` from extended ACKs."""

    seq: int
    errno: int
    message: str = ""
    offset: int | None = None  # byte offset of the offending attribute in the request


def _extack(data: memoryview, start: int, end: int, msg_type: int) -> tuple[str, int | None]:
    message, offset = "", None
    for attr, a_start, a_end in iter_attrs(data, start, end, msg_type):
        if attr == NLMSGERR_ATTR_MSG:
            message = bytes(data[a_start:a_end]).rstrip(b"\0").decode(errors="replace")
        elif attr == NLMSGERR_ATTR_OFFS and a_end - a_start >= 4:
            (offset,) = HOST_U32.unpack_from(data, a_start)
    return message, offset


def decode_acks(datagram: bytes | memoryview) -> list[Ack]:
    """Every NLMSG_ERROR of a datagram; other message types are skipped.

    The request header in the answer carries the sequence number; the request's payload is
    absent (NETLINK_CAP_ACK, flag NLM_F_CAPPED) or copied, and extended-ACK attributes follow
    when NLM_F_ACK_TLVS is set.
    """
    data = memoryview(datagram)
    acks: list[Ack] = []
    for header in split_messages(data):
        if header.msg_type != NLMSG_ERROR:
            continue
        if header.end - header.start < NLMSGERR.size + NLMSGHDR.size:
            raise DecodeError(header.start, "truncated nlmsgerr", header.msg_type)
        (error,) = NLMSGERR.unpack_from(data, header.start)
        req_start = header.start + NLMSGERR.size
        req_len, _, _, req_seq, _ = NLMSGHDR.unpack_from(data, req_start)
        tlv_start = req_start + NLMSGHDR.size
        if not header.flags & NLM_F_CAPPED:
            if req_len < NLMSGHDR.size:
                raise DecodeError(req_start, f"echoed request length {req_len} < 16",
                                  header.msg_type)
            tlv_start = req_start + ((req_len + 3) & ~3)
        if tlv_start > header.end:
            raise DecodeError(req_start, "echoed request overruns its nlmsgerr",
                              header.msg_type)
        message, offset = "", None
        if header.flags & NLM_F_ACK_TLVS:
            message, offset = _extack(data, tlv_start, header.end, header.msg_type)
        acks.append(Ack(req_seq, -error, message, offset))
    return acks



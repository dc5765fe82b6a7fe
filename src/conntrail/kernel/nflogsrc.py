"""NFLOG uid/gid source: the first packet of each locally generated flow, with its socket's ids.

`NflogSource.open()` binds an nfnetlink_log group on a NETLINK_NETFILTER socket inside the
namespace, then installs conntrail's own table `inet conntrail_nflog`:

    chain out { type filter hook output priority mangle; policy accept;
                ct state new ct status ! confirmed log prefix "conntrail" group 6317 }

`ct status ! confirmed` logs only a flow's very first packet (retransmissions and later
unanswered UDP packets are still `new` but confirmed). Priority mangle (-150) runs after
conntrack (-200) and before output DNAT (-100), so the logged headers are the flow's original
tuple. The kernel queues the record while sending the packet, before the conntrack NEW event
(emitted at confirmation, in postrouting): a reader that drains this socket after reading a
NEW event finds its record, without waiting. The bytes come from `netlink/nflog.py`.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass, field

from conntrail.errors import ConfigError, DecodeError, KernelError
from conntrail.kernel.netns import NetnsRef, resolve
from conntrail.kernel.nft import run_nft
from conntrail.kernel.socket import BufferPolicy, NetlinkSocket
from conntrail.netlink import nflog
from conntrail.netlink.nflog import CfgFlag, NflogConfig, NflogPacket
from conntrail.netlink.nftables import decode_acks

log = logging.getLogger(__name__)

DEFAULT_GROUP = 6317  # nflog groups are per namespace; 0-10 and 100s are the customary ones
TABLE_FAMILY = "inet"
TABLE_NAME = "conntrail_nflog"
PREFIX = "conntrail"
ANSWER_TIMEOUT = 5.0  # nfnetlink answers configuration synchronously, within sendto
_SEQ_MOD = 1 << 32


def ruleset(group: int, prefix: str = PREFIX) -> str:
    """The `nft -f` text that (re)creates our table atomically: add, delete, define."""
    return f"""
add table {TABLE_FAMILY} {TABLE_NAME}
delete table {TABLE_FAMILY} {TABLE_NAME}
table {TABLE_FAMILY} {TABLE_NAME} {{
    comment "conntrail: logs the first packet of local flows (uid/gid attribution)"
    chain out {{
        type filter hook output priority mangle; policy accept;
        ct state new ct status ! confirmed log prefix "{prefix}" group {group}
    }}
}}
"""


REMOVE = f"""
add table {TABLE_FAMILY} {TABLE_NAME}
delete table {TABLE_FAMILY} {TABLE_NAME}
"""


@dataclass(frozen=True, slots=True)
class NflogOptions:
    """Which group, how much of each packet, whether to install the rule ourselves."""

    group: int = DEFAULT_GROUP
    copy_range: int = 128  # IPv6 + extension headers + a TCP header
    install_rule: bool = True  # False: an operator's rule logs to `group`
    prefix: str | None = PREFIX  # records with another prefix are counted and dropped
    conntrack: bool = True  # ask for NFULA_CT; refused (EOPNOTSUPP) without GLUE_CT
    # As the conntrack socket's: a burst of new flows is as large here as there, and one
    # queued record takes about as much buffer as one NEW event.
    buffer: BufferPolicy = field(default_factory=BufferPolicy)


class NflogSource:
    """Logged first packets of one namespace's local flows, decoded; `fileno()` for select."""

    def __init__(self, netns: NetnsRef | str | None = None,
                 options: NflogOptions | None = None) -> None:
        self.netns = netns if isinstance(netns, NetnsRef) else resolve(netns)
        self.options = options or NflogOptions()
        self._check(self.options)
        self.conntrack = False  # the kernel sends NFULA_CT (conntrack id) with each record
        self._sock: NetlinkSocket | None = None
        self._rule = False
        self._pending: list[NflogPacket] = []
        self._seq = int(time.time()) & 0x7FFFFFFF
        self._next_log_seq: int | None = None
        self.counters = {"received": 0, "foreign": 0, "lost": 0, "overflows": 0,
                         "malformed": 0}

    @staticmethod
    def _check(options: NflogOptions) -> None:
        if not 0 <= options.group <= 0xFFFF:
            raise ConfigError("nflog.group", f"{options.group} is outside 0..65535")
        prefix = options.prefix
        if prefix is not None and (len(prefix) > 127 or not prefix.isprintable()
                                   or '"' in prefix or "\\" in prefix):
            raise ConfigError("nflog.prefix", f"{prefix!r}: up to 127 printable characters, "
                              "no quotes or backslashes")

    @property
    def _where(self) -> str:
        return f" in netns {self.netns.name}" if self.netns.name else ""

    def open(self) -> NflogSource:
        """Bind and configure the group, then install the rule; undone on failure."""
        try:
            self._sock = NetlinkSocket(self.netns, buffer=self.options.buffer)
        except KernelError as exc:
            raise KernelError(f"nflog{self._where}: {exc}") from exc
        try:
            self._bind()
            if self.options.install_rule:
                run_nft(["-f", "-"], self.netns,
                        stdin=ruleset(self.options.group, self.options.prefix or PREFIX))
                self._rule = True
        except BaseException:
            self.close()
            raise
        log.info("nflog group %d bound%s (NFULA_CT %s)%s", self.options.group, self._where,
                 "on" if self.conntrack else "refused by the kernel" if self.options.conntrack
                 else "off",
                 f", nft table {TABLE_FAMILY} {TABLE_NAME} installed" if self._rule else "")
        return self

    def _bind(self) -> None:
        err = errno.EOPNOTSUPP
        if self.options.conntrack:
            err = self._configure(CfgFlag.SEQ | CfgFlag.CONNTRACK)
            self.conntrack = err == 0
        if err == errno.EOPNOTSUPP:
            # Without CONFIG_NETFILTER_NETLINK_GLUE_CT the flag is refused before any
            # instance exists: bind again without it.
            err = self._configure(CfgFlag.SEQ)
        if err:
            raise KernelError(self._bind_error(err))

    def _bind_error(self, err: int) -> str:
        group = self.options.group
        # The kernel answers EPERM both to a group bound by another socket and to a caller
        # without CAP_NET_ADMIN: name both.
        taken = "bound by another socket (another conntrail, ulogd?): choose another group"
        reasons = {
            errno.EPERM: f"refused: {taken}, or no CAP_NET_ADMIN",
            errno.EBUSY: taken,
            errno.EEXIST: taken,
            errno.ENOENT: "no nfnetlink_log in this kernel",
            errno.EOPNOTSUPP: "no nfnetlink_log in this kernel",
        }
        reason = reasons.get(err, os.strerror(err))
        return f"nflog group {group}{self._where}: {reason} [errno {err}]"

    def _configure(self, flags: int) -> int:
        """Send one bind+config request; the errno of the kernel's answer (0: done)."""
        sock = self._require()
        seq = self._seq = (self._seq + 1) & 0x7FFFFFFF
        config = NflogConfig(copy_range=self.options.copy_range, flags=flags)
        sock.send(nflog.encode_bind(self.options.group, seq, config))
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while time.monotonic() < deadline:
            if not sock.wait(deadline - time.monotonic()):
                break
            for datagram in sock.recv_batch():
                answer = next((ack for ack in decode_acks(datagram) if ack.seq == seq), None)
                if answer is not None:
                    return answer.errno
                self._pending += self._decode(datagram)  # someone's rule already logs here
        raise KernelError(f"nflog group {self.options.group}{self._where}: no answer to the "
                          f"bind request in {ANSWER_TIMEOUT:g} s")

    def _require(self) -> NetlinkSocket:
        if self._sock is None:
            raise KernelError("nflog source is not open")
        return self._sock

    def fileno(self) -> int:
        """The netlink socket's fd: readable when `read()` has records."""
        return self._require().fileno()

    def read(self, max_datagrams: int = 64) -> list[NflogPacket]:
        """Records available now, without blocking. Loss (ENOBUFS, sequence gaps) and
        malformed datagrams are counted in `stats()`, never raised."""
        sock = self._require()
        out, self._pending = self._pending, []
        for datagram in sock.recv_batch(max_datagrams):
            out += self._decode(datagram)
        if sock.take_overflow():
            self.counters["overflows"] += 1
            sock.grow_buffer()
            log.error("nflog%s: receive buffer overflowed, records lost", self._where)
        return out

    def _decode(self, datagram: bytes) -> list[NflogPacket]:
        try:
            packets = nflog.decode_packets(datagram)
        except DecodeError as exc:
            self.counters["malformed"] += 1
            log.warning("nflog%s: malformed datagram skipped: %s", self._where, exc)
            return []
        prefix = self.options.prefix
        kept = []
        for packet in packets:
            self._count_seq(packet.seq)
            if prefix is not None and packet.prefix != prefix:
                self.counters["foreign"] += 1
                continue
            kept.append(packet)
        self.counters["received"] += len(kept)
        return kept

    def _count_seq(self, seq: int | None) -> None:
        """NFULA_SEQ counts every record the group built: a gap is records dropped."""
        if seq is None:
            return
        if self._next_log_seq is not None and seq != self._next_log_seq:
            self.counters["lost"] += (seq - self._next_log_seq) % _SEQ_MOD
        self._next_log_seq = (seq + 1) % _SEQ_MOD

    def stats(self) -> dict[str, int]:
        """received (kept), foreign (other prefix), lost (sequence gaps), overflows
        (ENOBUFS), malformed (datagrams that did not decode)."""
        return dict(self.counters)

    def close(self) -> None:
        """Remove our table, release the group, close the socket (idempotent)."""
        try:
            if self._rule:
                self._rule = False
                run_nft(["-f", "-"], self.netns, stdin=REMOVE)
        finally:
            if self._sock is not None:
                self._sock.close()  # closing releases the group (no UNBIND needed)
                self._sock = None

    def __enter__(self) -> NflogSource:
        return self.open()

    def __exit__(self, *_: object) -> None:
        self.close()

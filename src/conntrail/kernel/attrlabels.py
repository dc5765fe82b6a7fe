"""conntrail's `inet conntrail_attr` table: socket uid, gid and cgroup v2 id into ct labels.

Loaded over nf_tables netlink (the `nft` command refuses these statements) in one atomic
batch; what the kernel supports is found by trying and reading its answer, never from
version numbers: without `socket cgroupv2` only uid and gid are labelled, without nf_tables
or conntrack labels nothing is. The bytes come from `netlink/nftables.py`.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from dataclasses import dataclass

from conntrail.errors import KernelError
from conntrail.kernel.netns import NetnsRef, entered
from conntrail.netlink import nftables
from conntrail.netlink.nftables import Ack, Batch

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # answers echo only the request's header, not its payload
NETLINK_EXT_ACK = 11  # answers may carry the kernel's message and the bad attribute offset
SO_RCVBUFFORCE = 33
ANSWER_TIMEOUT = 5.0  # the kernel answers within sendmsg (nfnetlink is synchronous)
# Every acknowledged message queues one small skb (~770 bytes of receive buffer, measured by
# ENOBUFS at the default 208 KiB with 260 messages): size the buffer for the whole batch.
ACK_BUFFER = 1024

# Errors meaning "this kernel cannot do that": unknown expression or module (ENOENT), key or
# family not built in (EOPNOTSUPP, EAFNOSUPPORT, EPROTONOSUPPORT), attribute unknown (EINVAL).
UNSUPPORTED = frozenset({errno.ENOENT, errno.EOPNOTSUPP, errno.EAFNOSUPPORT,
                         errno.EPROTONOSUPPORT, errno.EINVAL})


@dataclass(frozen=True, slots=True)
class LabelSupport:
    """What `install` achieved: uid/gid labels, how many cgroup levels, why not more."""

    labels: bool  # new local flows carry uid, gid and the marker in their labels
    cgroup_levels: int  # deepest cgroup v2 level labelled; 0: no cgroup ids at all
    reason: str = ""  # why less than asked for was installed; empty when all of it was

    @property
    def cgroups(self) -> bool:
        """Are cgroup v2 ids labelled (levels `cgroup_levels`..0, 0 being the root)?"""
        return self.cgroup_levels > 0


class NftBatchError(KernelError):
    """The kernel refused a batch: names the first failing message and its errno."""

    def __init__(self, what: str, err: int, message: str = "") -> None:
        self.what = what
        self.errno = err
        self.kernel_message = message
        detail = f" ({message})" if message else ""
        super().__init__(f"nf_tables refused {what!r}: {os.strerror(err)} "
                         f"[errno {err}]{detail}")


class _NftSocket:
    """A NETLINK_NETFILTER socket bound in one namespace, for request/answer exchanges."""

    def __init__(self, netns: NetnsRef) -> None:
        with entered(netns):
            try:
                self._sock = socket.socket(socket.AF_NETLINK,
                                           socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                           NETLINK_NETFILTER)
            except OSError as exc:
                raise KernelError(f"netlink netfilter socket: {exc.strerror}") from exc
        try:
            self._sock.bind((0, 0))
            for option in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
                self._sock.setsockopt(SOL_NETLINK, option, 1)
        except OSError as exc:
            self._sock.close()
            raise KernelError(f"netlink netfilter socket: {exc.strerror}") from exc
        self._seq = int(time.time()) & 0x7FFFFFFF  # as libmnl: distinct across runs

    def next_seq(self, count: int) -> int:
        """Reserve `count` sequence numbers; returns the first."""
        first = self._seq
        self._seq += count
        return first

    def _make_room(self, answers: int) -> None:
        """Grow the receive buffer so `answers` acknowledgements fit in it at once."""
        wanted = (answers + 1) * ACK_BUFFER
        if self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2 >= wanted:
            return
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, wanted)
        except PermissionError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)

    def exchange(self, batch: Batch) -> list[Ack]:
        """Send a batch; its answers: one per message, or one for the batch as a whole."""
        self._make_room(len(batch.entries))
        try:
            self._sock.sendto(batch.data, (0, 0))
        except OSError as exc:
            raise KernelError(f"nf_tables batch: send: {exc.strerror}") from exc
        wanted = {entry.seq for entry in batch.entries}
        acks: list[Ack] = []
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while wanted:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._sock], [], [], left)[0]:
                raise KernelError(f"nf_tables batch: no answer for {len(wanted)} messages "
                                  f"in {ANSWER_TIMEOUT:g} s")
            try:
                datagram = self._sock.recv(1 << 16)
            except OSError as exc:
                raise KernelError(f"nf_tables batch: receive: {exc.strerror}") from exc
            acks += self._take(datagram, wanted)
            if any(ack.seq == batch.begin_seq and ack.errno for ack in acks):
                break  # the batch as a whole failed (no permission or subsystem, commit)
        # Everything was queued before sendto returned: collect what is left (a commit
        # error, answered with the batch's first sequence number) without waiting.
        while select.select([self._sock], [], [], 0)[0]:
            acks += self._take(self._sock.recv(1 << 16), wanted)
        return acks

    @staticmethod
    def _take(datagram: bytes, wanted: set[int]) -> list[Ack]:
        acks = nftables.decode_acks(datagram)
        wanted.difference_update(ack.seq for ack in acks)
        return acks

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()


def _first_error(batch: Batch, acks: list[Ack]) -> NftBatchError | None:
    """The earliest failing message (later ones often fail only because of it)."""
    failed = sorted((ack for ack in acks if ack.errno), key=lambda ack: ack.seq)
    if not failed:
        return None
    first = failed[0]
    return NftBatchError(batch.describe(first.seq, first.offset), first.errno,
                         first.message)


def _run(sock: _NftSocket, levels: int | None) -> None:
    """Build and send one batch (install when `levels` is given, else remove); raise on error."""
    first = sock.next_seq(64 + (levels or 0))
    batch = (nftables.install_batch(levels, first) if levels is not None
             else nftables.remove_batch(first))
    error = _first_error(batch, sock.exchange(batch))
    if error is not None:
        raise error


def _open(netns: NetnsRef) -> _NftSocket | None:
    """The socket, or None when this kernel has no nfnetlink at all."""
    try:
        return _NftSocket(netns)
    except KernelError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno in UNSUPPORTED:
            return None
        raise


def install(netns: NetnsRef, levels: int = nftables.DEFAULT_LEVELS) -> LabelSupport:
    """(Re)create `inet conntrail_attr` in `netns` with what this kernel supports.

    `levels` is the deepest cgroup v2 level to label (rules for levels..0, deepest first);
    0 labels uid and gid only. Replaces an older copy of the table atomically; when nothing
    can be installed no copy is left. Raises KernelError for failures that are not a missing
    feature (no permission, …), naming the message the kernel refused.
    """
    if not 0 <= levels <= nftables.MAX_LEVEL:
        raise ValueError(f"levels {levels} outside 0..{nftables.MAX_LEVEL}")
    sock = _open(netns)
    if sock is None:
        return LabelSupport(False, 0, "no nfnetlink in this kernel")
    started = time.perf_counter()
    try:
        support = _install_best(sock, levels)
        if not support.labels:
            _try(sock, None)  # an older copy would go on labelling behind our back
    finally:
        sock.close()
    log.info("installed nft table inet %s%s in %.1f ms: labels %s, cgroup levels %d%s",
             nftables.TABLE, _where(netns), (time.perf_counter() - started) * 1e3,
             "on" if support.labels else "off", support.cgroup_levels,
             f" ({support.reason})" if support.reason else "")
    return support


def _where(netns: NetnsRef) -> str:
    return f" in netns {netns.name}" if netns.name else ""


def _try(sock: _NftSocket, levels: int | None) -> NftBatchError | None:
    """Run a batch; a refusal meaning "not supported here" is returned, others raised."""
    try:
        _run(sock, levels)
    except NftBatchError as exc:
        if exc.errno not in UNSUPPORTED:
            raise
        return exc
    return None


def _install_best(sock: _NftSocket, levels: int) -> LabelSupport:
    """The full rule set, else uid and gid only, else nothing."""
    refused = _try(sock, levels)
    if refused is None:
        return LabelSupport(True, levels)
    if levels == 0:
        return LabelSupport(False, 0, str(refused))
    again = _try(sock, 0)
    if again is not None:
        return LabelSupport(False, 0, str(again))
    return LabelSupport(True, 0, f"cgroup ids not labelled: {refused}")


def remove(netns: NetnsRef) -> None:
    """Delete `inet conntrail_attr` if present (idempotent); never touches other tables.

    A kernel without nf_tables (or its inet family) has nothing to remove: that is no error.
    """
    sock = _open(netns)
    if sock is None:
        return
    try:
        refused = _try(sock, None)
    finally:
        sock.close()
    if refused is None:
        log.info("removed nft table inet %s%s", nftables.TABLE, _where(netns))

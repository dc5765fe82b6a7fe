"""Netlink sockets for netfilter: open (in a namespace), subscribe, receive in batches.

The receive buffer is the only thing standing between a burst of flows and lost events, so
it starts large (SO_RCVBUFFORCE, root only) and doubles on ENOBUFS up to a limit.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from conntrail.errors import KernelError
from conntrail.kernel.netns import NetnsRef, entered

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_BROADCAST_ERROR = 4
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33

# nfnetlink multicast groups (linux/netfilter/nfnetlink.h, enum nfnetlink_groups)
NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_UPDATE = 2
NFNLGRP_CONNTRACK_DESTROY = 3

RECV_SIZE = 1 << 17  # one datagram; the kernel batches several events per skb up to ~64 KiB


@dataclass(slots=True)
class BufferPolicy:
    """Receive buffer sizing: start size and the ceiling that ENOBUFS growth may reach."""

    # ~1,300 bytes of buffer per queued event: 32 MiB absorbs a 25k-event backlog, 128 MiB a
    # 100k one (a table flush). Memory is only used while we are behind.
    initial: int = 32 << 20
    maximum: int = 128 << 20


class NetlinkSocket:
    """A netfilter netlink socket bound in one network namespace."""

    def __init__(self, netns: NetnsRef, groups: tuple[int, ...] = (),
                 buffer: BufferPolicy | None = None) -> None:
        self.netns = netns
        self.buffer = buffer or BufferPolicy()
        self.overflowed = False
        self.drained = False  # the last recv_batch ended because the queue was empty
        with entered(netns):
            try:
                self._sock = socket.socket(socket.AF_NETLINK,
                                           socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                           NETLINK_NETFILTER)
            except OSError as exc:
                raise KernelError(f"netlink socket: {exc.strerror}") from exc
        self._sock.bind((0, 0))
        self._sock.setblocking(False)
        self.rcvbuf = self._set_rcvbuf(self.buffer.initial)
        for group in groups:
            self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)

    def fileno(self) -> int:
        """The socket's fd, to register with select/poll/asyncio."""
        return self._sock.fileno()

    @property
    def portid(self) -> int:
        """The port id the kernel assigned to this socket."""
        return int(self._sock.getsockname()[0])

    def _set_rcvbuf(self, size: int) -> int:
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except PermissionError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        # The kernel reports double the requested size (its bookkeeping overhead).
        return int(self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)) // 2

    def grow_buffer(self) -> bool:
        """Double the receive buffer after ENOBUFS; False when already at the maximum."""
        if self.rcvbuf >= self.buffer.maximum:
            return False
        self.rcvbuf = self._set_rcvbuf(min(self.rcvbuf * 2, self.buffer.maximum))
        log.info("netlink receive buffer grown to %d MiB", self.rcvbuf >> 20)
        return True

    def set_reliable(self) -> None:
        """Ask for reliable delivery (conntrackd's mode): the kernel reports broadcast errors."""
        self._sock.setsockopt(SOL_NETLINK, NETLINK_BROADCAST_ERROR, 1)

    def send(self, data: bytes) -> None:
        """Send a request to the kernel."""
        self._sock.sendto(data, (0, 0))

    def recv_batch(self, max_datagrams: int = 64) -> list[bytes]:
        """Drain up to `max_datagrams` without blocking.

        ENOBUFS (the kernel dropped events for us) is flagged in
        `overflowed`, never raised: the caller grows the buffer and resyncs.
        """
        out: list[bytes] = []
        recv = self._sock.recv
        self.drained = False
        for _ in range(max_datagrams):
            try:
                out.append(recv(RECV_SIZE))
            except BlockingIOError:
                self.drained = True
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise KernelError(f"netlink receive: {exc.strerror}") from exc
                # Reported before the queued data, not after: keep reading the backlog.
                self.overflowed = True
        return out

    def take_overflow(self) -> bool:
        """True once after each ENOBUFS: the moment to grow the buffer and resync."""
        flag, self.overflowed = self.overflowed, False
        return flag

    def wait(self, timeout: float) -> bool:
        """Block until readable or `timeout` seconds pass; True when data is waiting."""
        readable, _, _ = select.select([self._sock], [], [], timeout)
        return bool(readable)

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self._sock.close()

    def __enter__(self) -> NetlinkSocket:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def kernel_drops(sock: NetlinkSocket) -> int | None:
    """The socket's drop counter from /proc/net/netlink (what NO_ENOBUFS would hide)."""
    portid = sock.portid
    with entered(sock.netns):
        try:
            # thread-self: /proc/net follows the main thread's namespace, not ours.
            with open("/proc/thread-self/net/netlink", encoding="ascii") as handle:
                lines = handle.read().splitlines()[1:]
        except OSError:
            return None
    # Columns: sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
    for line in lines:
        cols = line.split()
        if len(cols) >= 9 and cols[1] == str(NETLINK_NETFILTER) and cols[2] == str(portid):
            return int(cols[8])
    return None


# Request/answer exchanges (dumps) on netlink sockets other than the event socket above.
DUMP_RECV_SIZE = 1 << 16  # a dump skb is at most 32 KiB; MSG_TRUNC is checked anyway
DUMP_TIMEOUT = 5.0  # seconds; a dump is answered at once, this only stops a hang
_T = TypeVar("_T")


def where(netns: NetnsRef) -> str:
    """For error messages: " in network namespace 'x'", or nothing for the current one."""
    return f" in network namespace {netns.name!r}" if netns.name else ""


def open_netlink(protocol: int, name: str, netns: NetnsRef) -> socket.socket:
    """A bound netlink socket of `protocol` with the dump timeout, in the calling thread's
    current namespace (call inside `entered(netns)`; `netns` only names it in errors)."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             protocol)
    except OSError as exc:
        raise KernelError(f"{name} socket{where(netns)}: {exc.strerror}") from exc
    try:
        sock.bind((0, 0))
        sock.settimeout(DUMP_TIMEOUT)
    except OSError as exc:
        sock.close()
        raise KernelError(f"{name} socket{where(netns)}: {exc.strerror}") from exc
    return sock


def netlink_dump(sock: socket.socket, request: bytes,
                 decode: Callable[[bytes], tuple[list[_T], bool, int]], what: str,
                 netns: NetnsRef) -> list[_T]:
    """Send one dump request and collect every record of its reply, up to NLMSG_DONE."""
    out: list[_T] = []
    try:
        sock.sendto(request, (0, 0))
        while True:
            data, _, flags, _ = sock.recvmsg(DUMP_RECV_SIZE)
            if flags & socket.MSG_TRUNC:
                raise KernelError(f"{what}{where(netns)}: reply datagram larger than "
                                  f"{DUMP_RECV_SIZE} bytes")
            records, done, errno = decode(data)
            if errno:
                raise KernelError(f"{what}{where(netns)}: {os.strerror(errno)}")
            out.extend(records)
            if done:
                return out
    except TimeoutError as exc:
        raise KernelError(f"{what}{where(netns)}: no reply in {DUMP_TIMEOUT:g} s") from exc
    except OSError as exc:
        raise KernelError(f"{what}{where(netns)}: {exc.strerror}") from exc

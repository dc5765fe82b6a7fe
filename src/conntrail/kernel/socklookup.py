"""Which local socket a flow belongs to: sock_diag lookup by tuple inside the flow's namespace.

One SOCK_DIAG_BY_FAMILY request without NLM_F_DUMP asks the kernel for the one socket of a
4-tuple (a hash lookup, as for a received packet: its cost does not depend on how many sockets
or processes the host has) and answers inode, uid, state and the socket's cgroup v2 id
(INET_DIAG_CGROUP_ID, appended unasked). The kernel's receive-path lookup also finds a TCP
listener when no connection matches, and an unconnected or wildcard-bound UDP socket for a
flow it sent with sendto(); `SocketOwner.match` says which. When a UDP lookup finds nothing
(a socket bound to a device, or one that replies from another address) a dump of the UDP
sockets on the local port, filtered in the kernel by bytecode, is the fallback.

sock_diag sockets are bound to the namespace they were opened in: `SocketLookup` keeps one per
namespace (which keeps that namespace alive: `forget` or `close` it). The one-shot `lookup`
opens and closes its own.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import socket
from typing import NamedTuple

from conntrail.errors import DecodeError, KernelError
from conntrail.kernel.localview import NETLINK_SOCK_DIAG
from conntrail.kernel.netns import NetnsRef, entered
from conntrail.kernel.socket import netlink_dump, open_netlink
from conntrail.model import AF_INET, AF_INET6
from conntrail.netlink.sockdiag import (
    ALL_STATES,
    IPPROTO_UDP,
    IPPROTO_UDPLITE,
    InetSocket,
    SocketDetail,
    TcpState,
    decode_diag_details,
    encode_lookup_request,
    encode_port_dump_request,
)

_RECV_SIZE = 1 << 16
_MINI_SOCKETS = frozenset({TcpState.TIME_WAIT, TcpState.NEW_SYN_RECV})
_WILDCARDS = frozenset({"0.0.0.0", "::"})  # noqa: S104 - compared with, never bound


class SocketOwner(NamedTuple):
    """The socket behind a flow, as sock_diag reports it."""

    inode: int  # 0: no file holds it (closed: an orphan in FIN_WAIT/LAST_ACK/CLOSING, or
    # no full socket at all: TIME_WAIT, a connection request not yet accepted)
    uid: int | None  # the socket's owner (its creator's fsuid, as the socket's user namespace
    # maps it; an orphan keeps it); None for TIME_WAIT and NEW_SYN_RECV, whose mini sockets
    # have no owner (the kernel reports a placeholder 0)
    cgroup_id: int | None  # cgroup v2 id of the socket (its creator's cgroup at creation);
    # None for mini sockets
    state: int  # TcpState value
    match: str  # "exact": the flow's own socket; "listener": the TCP listener of the local
    # port; "bound": an unconnected UDP socket on the local port; "port": found only by the
    # local-port dump (UDP)
    socket: InetSocket


def _match(detail: SocketDetail, protocol: int) -> str:
    sock = detail.socket
    if sock.state == TcpState.LISTEN:
        return "listener"
    if protocol in (IPPROTO_UDP, IPPROTO_UDPLITE) and sock.dport == 0:
        return "bound"
    return "exact"


def _owner(detail: SocketDetail, match: str) -> SocketOwner:
    sock = detail.socket
    uid = None if sock.state in _MINI_SOCKETS else sock.uid
    return SocketOwner(sock.inode, uid, detail.cgroup_id, sock.state, match, sock)


class SocketLookup:
    """sock_diag lookups by tuple, one NETLINK_SOCK_DIAG socket kept open per namespace."""

    def __init__(self) -> None:
        self._socks: dict[NetnsRef, socket.socket] = {}
        self._seq = itertools.count(1)
        self.requests = 0  # netlink round trips made

    def close(self) -> None:
        """Close every socket (releasing the namespaces they pinned)."""
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()

    def forget(self, netns: NetnsRef) -> None:
        """Close the socket of one namespace (it is going away)."""
        sock = self._socks.pop(netns, None)
        if sock is not None:
            sock.close()

    def __enter__(self) -> SocketLookup:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _socket(self, netns: NetnsRef) -> socket.socket:
        sock = self._socks.get(netns)
        if sock is None:
            with entered(netns):
                sock = open_netlink(NETLINK_SOCK_DIAG, "NETLINK_SOCK_DIAG", netns)
            self._socks[netns] = sock
        return sock

    def lookup(self, netns: NetnsRef, family: int, proto: int, src: str, sport: int, dst: str,
               dport: int) -> SocketOwner | None:
        """The socket in `netns` whose local end is src:sport and whose peer is dst:dport
        (orient the conntrack tuple first: for a flow this host opened that is the original
        direction, for one it accepted the reply direction). None when no socket matches;
        KernelError when the namespace or netlink fails."""
        sock = self._socket(netns)
        seq = next(self._seq) & 0xFFFFFFFF
        try:  # inet_pton: ~0.2 µs where ipaddress takes ~1 (v4) to ~5 µs (v6)
            local, remote = socket.inet_pton(family, src), socket.inet_pton(family, dst)
            request = encode_lookup_request(family, proto, local, sport, remote, dport, seq)
        except (OSError, ValueError) as exc:
            raise KernelError(f"socket lookup: {src!r}/{dst!r} of family {family}: "
                              f"{exc}") from exc
        found = self._ask(netns, sock, request)
        if found is not None:
            return _owner(found, _match(found, proto))
        if proto not in (IPPROTO_UDP, IPPROTO_UDPLITE):
            return None
        return self._by_port(netns, sock, family, proto, src, sport, dst, dport)

    def _ask(self, netns: NetnsRef, sock: socket.socket, request: bytes) -> SocketDetail | None:
        """One exact-lookup round trip: the socket, or None on ENOENT."""
        self.requests += 1
        try:
            sock.sendto(request, (0, 0))
            data = sock.recv(_RECV_SIZE)
            reply = decode_diag_details(data)
        except (OSError, DecodeError) as exc:
            self.forget(netns)  # a late reply must not answer the next request
            where = f" in network namespace {netns.name!r}" if netns.name else ""
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise KernelError(f"socket lookup{where}: {reason or exc}") from exc
        if reply.errno in (errno.ENOENT, 0) and not reply.sockets:
            return None
        if reply.errno:
            raise KernelError(f"socket lookup: {os.strerror(reply.errno)}")
        return reply.sockets[0]

    def _by_port(self, netns: NetnsRef, sock: socket.socket, family: int, proto: int,
                 src: str, sport: int, dst: str, dport: int) -> SocketOwner | None:
        """UDP fallback: the sockets on local port `sport` (v4 flows: v6 sockets too, they may
        be dual-stack), best first: connected to the peer, bound to the address, wildcard."""
        families = (AF_INET, AF_INET6) if family == AF_INET else (AF_INET6,)
        best: tuple[int, SocketDetail] | None = None
        for fam in families:
            self.requests += 1
            request = encode_port_dump_request(fam, proto, ALL_STATES, sport,
                                               next(self._seq) & 0xFFFFFFFF)
            for detail in netlink_dump(sock, request, decode_diag_details, "UDP port dump", netns):
                rank = _rank(detail.socket, src, dst, dport)
                if rank is not None and (best is None or rank < best[0]):
                    best = (rank, detail)
        return None if best is None else _owner(best[1], "port")


def _rank(sock: InetSocket, src: str, dst: str, dport: int) -> int | None:
    """How well a socket on the right port fits the flow (lower is better), None if not."""
    local = _unmapped(sock.src)
    if local not in (src, *_WILDCARDS):
        return None
    if sock.dport:
        return 0 if (sock.dport == dport and _unmapped(sock.dst) == dst) else None
    return 1 if local == src else 2


def _unmapped(address: str) -> str:
    """An IPv4-mapped IPv6 address ("::ffff:c612:1") as IPv4 text; others unchanged."""
    if address.startswith("::ffff:"):
        mapped = ipaddress.IPv6Address(address).ipv4_mapped
        if mapped is not None:
            return str(mapped)
    return address


def lookup(netns: NetnsRef, family: int, proto: int, src: str, sport: int, dst: str,
           dport: int) -> SocketOwner | None:
    """One lookup on a socket opened for it (see `SocketLookup.lookup`, which keeps it)."""
    with SocketLookup() as lookups:
        return lookups.lookup(netns, family, proto, src, sport, dst, dport)

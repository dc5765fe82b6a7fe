"""A namespace's local view: its own addresses, broadcasts, listening ports and ephemeral range.

Read from inside the namespace: RTM_GETADDR over NETLINK_ROUTE, inet_diag dumps over
NETLINK_SOCK_DIAG and net.ipv4.ip_local_port_range from /proc/sys. A flow inventory uses it to
tell inbound, outbound and forwarded flows apart and to know which source ports are ephemeral.
The dumps ask only for TCP in LISTEN and UDP in CLOSE (unconnected), so we decode only those,
and the kernel never walks the established-connection hash. It does still walk its host-wide
listening and UDP hashes (skipping other namespaces' sockets): about 10 µs per dump per 1,000
such sockets elsewhere on the host, measured on 6.18.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from conntrail.errors import KernelError
from conntrail.kernel import sysctl
from conntrail.kernel.netns import NetnsRef, entered, resolve
from conntrail.kernel.socket import netlink_dump, open_netlink, where
from conntrail.model import AF_INET, AF_INET6
from conntrail.netlink.rtnl import IfAddress, IfaFlag, decode_addr_dump, encode_getaddr_request
from conntrail.netlink.sockdiag import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    TcpState,
    decode_diag_dump,
    encode_diag_request,
    states_mask,
)

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0  # linux/netlink.h
NETLINK_SOCK_DIAG = 4
PORT_RANGE = "net/ipv4/ip_local_port_range"
LIMITED_BROADCAST = "255.255.255.255"

_LISTEN = states_mask(TcpState.LISTEN)
_UNCONNECTED = states_mask(TcpState.CLOSE)  # UDP: CLOSE until connect(), ESTABLISHED after
# Destinations always delivered locally, by the first five characters of their text: IPv4
# multicast 224.0.0.0/4 and loopback 127.0.0.0/8 (its whole prefix is a `local` route) as
# "224.0" … "239.9", "127.0" … "127.9"; IPv6 multicast ff00::/8 as "ff00:" … "ffff:" (its first
# group always has four hex digits; "ff::1" is 00ff::1). One slice and one set lookup: ~75 ns
# on a miss where a prefix tuple for str.startswith took 130-170 ns (measured).
_LOCAL_PREFIXES = frozenset(
    {f"{octet}.{digit}" for octet in (*range(224, 240), 127) for digit in range(10)}
    | {f"ff{byte:02x}:" for byte in range(256)})

# Already inside the namespace: a second setns round trip would cost as much as the rest.
_CURRENT = NetnsRef("", None)


@dataclass(frozen=True, slots=True)
class LocalView:
    """What one network namespace considers its own: addresses, listeners, ephemeral ports."""

    addresses: frozenset[str]  # every address on its interfaces (v4 and v6, 127.0.0.1, ::1)
    broadcasts: frozenset[str]  # IPv4 broadcast addresses of those interfaces
    port_range: tuple[int, int]  # its net.ipv4.ip_local_port_range (inclusive)
    tcp_listening: frozenset[int]  # local ports of TCP sockets in LISTEN, v4 and v6
    udp_bound: frozenset[int]  # local ports of unconnected UDP sockets, v4 and v6
    _destinations: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_destinations",
                           self.addresses | self.broadcasts | {LIMITED_BROADCAST})

    def is_local_destination(self, address: str) -> bool:
        """True when a packet to `address` is delivered here: one of its addresses or
        broadcasts, 255.255.255.255, 127.0.0.0/8, or multicast (224.0.0.0/4, ff00::/8).

        Per event on the inventory's hot path: one set lookup, then one of a 5-char slice.
        """
        return address in self._destinations or address[:5] in _LOCAL_PREFIXES


def read_local_view(netns: NetnsRef) -> LocalView:
    """Read `netns`'s local view; KernelError when the namespace is gone or netlink fails."""
    with ExitStack() as stack:
        with entered(netns):  # one round trip: the sockets stay bound to netns afterwards
            route = stack.enter_context(open_netlink(NETLINK_ROUTE, "NETLINK_ROUTE", netns))
            diag = stack.enter_context(open_netlink(NETLINK_SOCK_DIAG, "NETLINK_SOCK_DIAG",
                                                    netns))
            port_range = _port_range(netns)
        addresses = netlink_dump(route, encode_getaddr_request(1), decode_addr_dump,
                                 "address dump", netns)
        tcp: set[int] = set()
        udp: set[int] = set()
        for seq, family in enumerate((AF_INET, AF_INET6), start=1):
            request = encode_diag_request(family, IPPROTO_TCP, _LISTEN, seq)
            tcp.update(s.sport for s in netlink_dump(diag, request, decode_diag_dump,
                                                     "TCP listener dump", netns))
            request = encode_diag_request(family, IPPROTO_UDP, _UNCONNECTED, seq)
            udp.update(s.sport for s in netlink_dump(diag, request, decode_diag_dump,
                                                     "UDP socket dump", netns)
                       if s.dport == 0)
    return LocalView(frozenset(a.address for a in addresses), broadcasts(addresses), port_range,
                     frozenset(tcp), frozenset(udp))


def broadcasts(addresses: Iterable[IfAddress]) -> frozenset[str]:
    """The IPv4 broadcasts the kernel installs for these addresses (fib_add_ifaddr): each
    explicit IFA_BROADCAST, and the network broadcast of every primary address whose prefix
    is shorter than /31, with or without `brd` (its interface is assumed up)."""
    out: set[str] = set()
    for address in addresses:
        if address.family != AF_INET:
            continue
        if address.broadcast is not None:
            out.add(address.broadcast)
        if address.prefixlen < 31 and not address.flags & IfaFlag.SECONDARY:
            network = ipaddress.IPv4Network(f"{address.peer or address.address}/"
                                            f"{address.prefixlen}", strict=False)
            if network.network_address.packed[0] != 0:  # ipv4_is_zeronet: no broadcast
                out.add(str(network.broadcast_address))
    return frozenset(out)


def _port_range(netns: NetnsRef) -> tuple[int, int]:
    """ip_local_port_range of the namespace the calling thread is in (inside `entered`)."""
    text = sysctl.read(PORT_RANGE, _CURRENT)  # /proc/sys/net follows the thread's netns
    try:
        low, high = (int(part) for part in text.split())
    except ValueError as exc:
        raise KernelError(f"sysctl {PORT_RANGE}{where(netns)}: unexpected value "
                          f"{text!r}") from exc
    return low, high


LOCALITY_REFRESH_S = 5.0
ViewT = TypeVar("ViewT")


def read_named(netns: str) -> LocalView:
    """The local view of a namespace by name ('' for the current one)."""
    return read_local_view(resolve(netns or None))


class LocalityCache(Generic[ViewT]):
    """Each namespace's locality, re-read every few seconds (addresses and listeners change).

    Looked up per event, so the lookup is a plain dict hit; `refresh_due` runs once a batch.
    A namespace that cannot be read (gone) has no locality: its flows are then classified
    by loopback only, and this is logged once.
    """

    def __init__(self, read: Callable[[str], ViewT], refresh_s: float = LOCALITY_REFRESH_S
                 ) -> None:
        self._read = read
        self._refresh_s = refresh_s
        self._views: dict[str, ViewT | None] = {}
        self._next = time.monotonic() + refresh_s
        self._failed: set[str] = set()

    def __call__(self, netns: str) -> ViewT | None:
        try:
            return self._views[netns]
        except KeyError:
            return self._load(netns)

    def _load(self, netns: str) -> ViewT | None:
        try:
            view: ViewT | None = self._read(netns)
        except Exception as exc:  # noqa: BLE001 - any failure: classify without a locality
            if netns not in self._failed:
                self._failed.add(netns)
                log.warning("netns %s: cannot read its addresses (%s); its flows are "
                            "classified as forwarded unless loopback", netns or "(host)", exc)
            view = None
        self._views[netns] = view
        return view

    def refresh_due(self) -> None:
        """Re-read every namespace's locality when the refresh interval has passed."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self._refresh_s
        for netns in list(self._views):
            self._load(netns)

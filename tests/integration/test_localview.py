"""read_local_view against real namespaces: exact addresses, broadcasts, listeners, port range.

Every namespace comes from `netns_factory`, which kills what runs inside and deletes it after
the test, pass or fail. Addresses are documentation/benchmark ranges only.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from conntrail.errors import KernelError
from conntrail.kernel.localview import LocalView, read_local_view
from conntrail.kernel.netns import resolve
from tests.integration.netenv import Netns, NetnsFactory, sh

SERVERS = r"""
import signal, socket
AF4, AF6, TCP, UDP = socket.AF_INET, socket.AF_INET6, socket.SOCK_STREAM, socket.SOCK_DGRAM
keep = []
def sock(family, kind, address=None):
    s = socket.socket(family, kind)
    if address:
        s.bind(address)
    keep.append(s)
    return s
listener = sock(AF4, TCP, ("198.18.0.1", 8080)); listener.listen()
sock(AF6, TCP, ("::", 8443)).listen()                    # dual-stack listener
sock(AF4, UDP, ("0.0.0.0", 5353))                        # unconnected: counted
sock(AF6, UDP, ("2001:db8::1", 5354))                    # unconnected: counted
sock(AF4, UDP, ("198.18.0.1", 6000)).connect(("198.18.0.2", 53))   # connected: not counted
sock(AF6, UDP).connect(("2001:db8::2", 53))               # autobound + connected: not counted
sock(AF4, UDP)                                            # never bound: no port at all
client = sock(AF4, TCP); client.connect(("198.18.0.1", 8080))      # established, ephemeral
keep.append(listener.accept()[0])
print("ready", flush=True)
print(client.getsockname()[1], flush=True)
signal.pause()
"""


def _no_link_local(*namespaces: Netns) -> None:
    """Interfaces made after this get no fe80:: address, so the expected set is exact."""
    for ns in namespaces:
        ns.sysctl("net.ipv6.conf.default.addr_gen_mode", "1")


def _host_and_peer(factory: NetnsFactory) -> tuple[Netns, Netns, str]:
    host, peer = factory.new("lv"), factory.new("lvpeer")
    _no_link_local(host, peer)
    ifname, peer_ifname = factory.link(host, [], peer, [])
    for address in ("198.18.0.1/24", "198.18.0.9/24"):  # no brd; the second is secondary
        host.run("ip", "addr", "add", address, "dev", ifname)
    host.run("ip", "addr", "add", "198.18.4.1/24", "brd", "198.18.4.127", "dev", ifname)
    host.run("ip", "addr", "add", "198.18.3.1", "peer", "198.18.3.2/32", "dev", ifname)
    host.run("ip", "addr", "add", "2001:db8::1/64", "dev", ifname, "nodad")
    peer.run("ip", "addr", "add", "198.18.0.2/24", "dev", peer_ifname)
    peer.run("ip", "addr", "add", "2001:db8::2/64", "dev", peer_ifname, "nodad")
    return host, peer, ifname


def _local_table(ns: Netns) -> tuple[set[str], set[str]]:
    """(local /32 addresses, broadcast addresses) of the kernel's IPv4 local routing table."""
    local, broadcast = set(), set()
    for line in ns.run("ip", "-4", "route", "show", "table", "local").splitlines():
        kind, destination = line.split()[:2]
        if kind == "local" and "/" not in destination:
            local.add(destination)
        elif kind == "broadcast":
            broadcast.add(destination)
    return local, broadcast


def test_fresh_namespace(netns_factory: NetnsFactory) -> None:
    ns = netns_factory.new("lvfresh")
    view = read_local_view(resolve(ns.name))
    assert view == LocalView(frozenset({"127.0.0.1", "::1"}), frozenset({"127.255.255.255"}),
                             (32768, 60999), frozenset(), frozenset())


def test_addresses_broadcasts_ports_and_range(netns_factory: NetnsFactory) -> None:
    host, _, _ = _host_and_peer(netns_factory)
    host.sysctl("net.ipv4.ip_local_port_range", "40000 40999")
    with host.spawn_python(SERVERS) as server:
        assert server.stdout is not None
        client_port = int(server.stdout.readline())
        home = os.readlink("/proc/thread-self/ns/net")
        view = read_local_view(resolve(host.name))
        assert os.readlink("/proc/thread-self/ns/net") == home, "left in the namespace"
        server.terminate()
    assert view.addresses == {"127.0.0.1", "::1", "198.18.0.1", "198.18.0.9", "198.18.4.1",
                              "198.18.3.1", "2001:db8::1"}
    # No brd on 198.18.0.1/24 and an odd one on 198.18.4.1/24: the kernel still installs
    # each network broadcast (and lo's), which is what decides local delivery.
    assert view.broadcasts == {"127.255.255.255", "198.18.0.255", "198.18.4.127",
                               "198.18.4.255"}
    assert view.port_range == (40000, 40999)
    assert 40000 <= client_port <= 40999
    assert view.tcp_listening == {8080, 8443}
    assert view.udp_bound == {5353, 5354}  # not 6000 (connected) nor the autobound one
    local, broadcast = _local_table(host)
    assert broadcast == view.broadcasts
    assert local == {address for address in view.addresses if ":" not in address}


def test_addresses_match_ip_addr_with_link_local(netns_factory: NetnsFactory) -> None:
    """Default settings: fe80:: addresses appear too, exactly as `ip -j addr` lists them."""
    host, peer = netns_factory.new("lvll"), netns_factory.new("lvllpeer")
    netns_factory.link(host, ["198.18.6.1/24", "2001:db8:6::1/64"], peer,
                       ["198.18.6.2/24", "2001:db8:6::2/64"])
    view = read_local_view(resolve(host.name))
    listed = {info["local"] for link in json.loads(host.run("ip", "-j", "addr", "show"))
              for info in link["addr_info"]}
    assert view.addresses == listed
    assert any(address.startswith("fe80::") for address in view.addresses)
    assert view.broadcasts == _local_table(host)[1] == {"127.255.255.255", "198.18.6.255"}


def test_namespace_gone(netns_factory: NetnsFactory) -> None:
    ns = netns_factory.new("lvgone")
    ref = resolve(ns.name)
    sh("ip", "netns", "del", ns.name)
    with pytest.raises(KernelError, match=re.escape(f"network namespace {ns.name!r}")):
        read_local_view(ref)


@pytest.mark.parametrize(("address", "local"), [
    ("198.18.0.1", True), ("2001:db8::1", True), ("198.18.0.255", True),
    ("255.255.255.255", True), ("224.0.0.251", True), ("239.255.255.250", True),
    ("ff02::fb", True), ("ff05::1:3", True), ("127.0.0.53", True), ("127.0.0.1", True),
    ("198.18.0.2", False), ("223.255.255.255", False), ("240.0.0.1", False),
    ("ff::1", False), ("ff0::1", False), ("fe80::1", False), ("2001:db8::2", False),
    ("12.7.0.1", False), ("::ffff:224.0.0.1", False),
])
def test_is_local_destination(address: str, local: bool) -> None:
    view = LocalView(frozenset({"127.0.0.1", "::1", "198.18.0.1", "2001:db8::1"}),
                     frozenset({"198.18.0.255"}), (32768, 60999), frozenset(), frozenset())
    assert view.is_local_destination(address) is local

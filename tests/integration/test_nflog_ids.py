"""NFLOG uid/gid matched to conntrack NEW events: real processes under distinct uids and gids.

Each client is a fresh process started with `nsenter --net` and dropped to its uid/gid by
setpriv; it connects or sends once and exits at once. NEW events come from conntrail's own
Listener, records from NflogSource, and NflogIds matches them the way the pipeline will:
after each batch of events, drain the NFLOG socket once (no waiting), then `take`.
"""

from __future__ import annotations

import select
import shutil
import subprocess
import time
from dataclasses import dataclass

import pytest

import conntrail
from conntrail.enrichers.nflog_ids import Ids, NflogIds
from conntrail.errors import ConfigError, KernelError
from conntrail.kernel.nflogsrc import TABLE_NAME, NflogOptions, NflogSource
from conntrail.kernel.socket import BufferPolicy
from conntrail.model import FlowEvent
from conntrail.netlink.nflog import Hook
from tests.integration.netenv import NatTopology, Netns, NetnsFactory
from tests.integration.traffic import TCP_SERVER, udp_burst

CLIENT_PYTHON = "/usr/bin/python3"  # readable by the other uids (ours may live under /root)

# Prints the flow's identity (source port, or ICMP id) and exits at once.
CLIENT = r"""
import os, socket, sys
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
if kind == "tcp":
    sock = socket.create_connection((host, port), timeout=5)
    sock.sendall(b"ping")
elif kind == "udp":
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.sendto(b"ping", (host, port))
elif kind == "exit":  # SYN sent, then gone before any answer: no close, no FIN
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.connect_ex((host, port))
    print(sock.getsockname()[1], flush=True)
    os._exit(0)
else:  # icmp: an echo request from a ping socket; the kernel picks the id
    proto = socket.IPPROTO_ICMPV6 if family == socket.AF_INET6 else socket.IPPROTO_ICMP
    sock = socket.socket(family, socket.SOCK_DGRAM, proto)
    echo = 128 if family == socket.AF_INET6 else 8
    sock.sendto(bytes([echo, 0, 0, 0, 0, 0, 0, 1]) + b"ping", (host, 0))
print(sock.getsockname()[1], flush=True)
"""

IGMP_JOIN = r"""
import socket, struct, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
group = struct.pack("4s4s", socket.inet_aton("239.18.0.1"), socket.inet_aton(sys.argv[1]))
sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
time.sleep(0.3)
"""


@dataclass(frozen=True)
class Case:
    kind: str  # tcp / udp / exit / icmp
    host: str
    uid: int
    gid: int

    @property
    def proto(self) -> int:
        if self.kind == "icmp":
            return 58 if ":" in self.host else 1
        return 17 if self.kind == "udp" else 6


CASES = [
    Case("tcp", "198.18.2.2", 4242, 4343),
    Case("udp", "198.18.2.2", 4243, 4344),
    Case("exit", "198.18.2.2", 4244, 4345),
    Case("icmp", "198.18.2.2", 4245, 4346),
    Case("tcp", "2001:db8:2::2", 4246, 4347),
    Case("udp", "2001:db8:2::2", 4247, 4348),
    Case("exit", "2001:db8:2::2", 4248, 4349),
    Case("icmp", "2001:db8:2::2", 4249, 4350),
    Case("udp", "198.18.2.2", 0, 0),  # root is a user too: uid 0, not "no socket"
]


@pytest.fixture
def topo(nat_topology: NatTopology) -> NatTopology:
    if shutil.which("setpriv") is None or shutil.which("nsenter") is None:
        pytest.skip("clients need setpriv and nsenter (util-linux)")
    # ICMP clients use ping sockets: allow every gid in the client's namespace.
    nat_topology.client.sysctl("net.ipv4.ping_group_range", "0 2147483647")
    return nat_topology


def run_client(ns: Netns, uid: int, gid: int, *args: str) -> int:
    """A process in `ns` running as uid:gid; returns the flow's source port or ICMP id."""
    command = ["nsenter", f"--net=/run/netns/{ns.name}", "setpriv", f"--reuid={uid}",
               f"--regid={gid}", "--clear-groups", CLIENT_PYTHON, "-I", "-c", CLIENT, *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


def flow_key(event: FlowEvent) -> tuple[int, int | None]:
    orig = event.flow.orig
    return orig.proto, orig.icmp_id if orig.icmp_id is not None else orig.sport


def match_events(listener: conntrail.Listener, source: NflogSource, ids: NflogIds,
                 wanted: set[tuple[int, int | None]],
                 timeout: float = 10.0) -> dict[tuple[int, int | None], Ids | None]:
    """For each NEW event in `wanted`: drain the NFLOG socket once, without waiting, then
    take the event's ids (the kernel queued the record before the event)."""
    found: dict[tuple[int, int | None], Ids | None] = {}
    deadline = time.monotonic() + timeout
    while len(found) < len(wanted) and time.monotonic() < deadline:
        select.select([listener.fileno()], [], [], 0.2)
        events = [r for r in listener.read() if isinstance(r, FlowEvent)]
        for record in source.read():
            ids.add(record)
        for event in events:
            if flow_key(event) in wanted:
                found[flow_key(event)] = ids.take(event.flow.orig)
    return found


def test_new_events_get_the_exact_uid_and_gid(topo: NatTopology) -> None:
    port = 7100
    expected: dict[tuple[int, int | None], Ids] = {}
    tcp_count = sum(case.kind == "tcp" for case in CASES)
    ids = NflogIds()
    with conntrail.Listener(netns=topo.client.name, kinds=["new"]) as listener, \
            NflogSource(topo.client.name) as source, \
            topo.server.spawn_python(TCP_SERVER, "::", str(port), str(tcp_count), "10"):
        for case in CASES:
            # The exit-at-once SYNs go to a closed port: the listener counts its accepts.
            where = port + 1 if case.kind == "exit" else port
            ident = run_client(topo.client, case.uid, case.gid, case.kind, case.host,
                               str(where))
            expected[(case.proto, ident)] = Ids(case.uid, case.gid)
        got = match_events(listener, source, ids, set(expected))
        stats = source.stats()
    assert got == expected
    assert stats["lost"] == stats["overflows"] == stats["malformed"] == 0
    assert ids.stats()["taken"] == len(CASES)


def test_a_forwarded_flow_leaves_no_record_at_the_router(topo: NatTopology) -> None:
    """The router's output hook never sees forwarded packets; its own flows it does see."""
    ids = NflogIds()
    with conntrail.Listener(netns=topo.router.name, kinds=["new"]) as listener, \
            NflogSource(topo.router.name) as source:
        forwarded = run_client(topo.client, 4242, 4343, "udp", "198.18.2.2", "7200")
        local = run_client(topo.router, 4242, 4343, "udp", "198.18.2.2", "7201")
        got = match_events(listener, source, ids, {(17, forwarded), (17, local)})
        time.sleep(0.2)
        late = source.read()
    assert got == {(17, forwarded): None, (17, local): Ids(4242, 4343)}
    assert late == []
    assert ids.stats()["held"] == 0  # no record of the forwarded flow waits anywhere


def test_a_kernel_sent_first_packet_has_no_ids(topo: NatTopology) -> None:
    """An IGMP report has no user socket: the record exists, without NFULA_UID/GID."""
    ids = NflogIds()
    with conntrail.Listener(netns=topo.client.name, kinds=["new"]) as listener, \
            NflogSource(topo.client.name) as source:
        topo.client.python(IGMP_JOIN, topo.client_v4)
        deadline = time.monotonic() + 5
        found: list[Ids | None] = []
        while not found and time.monotonic() < deadline:
            select.select([listener.fileno()], [], [], 0.2)
            events = [r for r in listener.read() if isinstance(r, FlowEvent)]
            for record in source.read():
                assert record.hook == Hook.LOCAL_OUT
                ids.add(record)
            found += [ids.take(e.flow.orig) for e in events if e.flow.orig.proto == 2]
    assert found and found[0] == Ids(None, None)


def test_group_conflicts_and_clean_up(netns_factory: NetnsFactory) -> None:
    ns = netns_factory.new("host")
    with NflogSource(ns.name, NflogOptions(group=6400)) as first:
        assert TABLE_NAME in ns.tables()
        assert first.conntrack is False  # this kernel lacks NETFILTER_NETLINK_GLUE_CT
        taken = r"nflog group 6400 in netns .*: refused: bound by another socket"
        with pytest.raises(KernelError, match=taken):
            NflogSource(ns.name, NflogOptions(group=6400, install_rule=False)).open()
        assert TABLE_NAME in ns.tables()  # the failed one removed nothing of the first
    assert ns.tables().strip() == ""
    with NflogSource(ns.name, NflogOptions(group=6400)):  # the group was released
        pass
    assert ns.tables().strip() == ""
    for bad in (NflogOptions(group=65536), NflogOptions(prefix='x" drop #')):
        with pytest.raises(ConfigError, match=r"nflog\.(group|prefix)"):
            NflogSource(ns.name, bad)
    other = netns_factory.new("other")
    with NflogSource(ns.name), NflogSource(other.name):  # groups are per namespace
        pass
    assert ns.tables().strip() == other.tables().strip() == ""


def test_lost_records_are_counted_from_the_sequence_numbers(topo: NatTopology) -> None:
    """A burst into a buffer too small to hold it: every record is received or counted."""
    tiny = NflogOptions(buffer=BufferPolicy(64 << 10, 64 << 10))
    with NflogSource(topo.client.name, tiny) as source:
        udp_burst(topo.client, topo.server_v4, 2000, first_port=20000)
        received = len(source.read(max_datagrams=5000))
        udp_burst(topo.client, topo.server_v4, 1, first_port=30000)  # its number shows
        time.sleep(0.1)                                              # the trailing gap
        received += len(source.read())
        stats = source.stats()
    assert stats["overflows"] >= 1 and stats["lost"] > 0
    assert received == stats["received"]
    assert stats["received"] + stats["lost"] == 2001

"""Socket identity in conntrack labels: real processes under distinct uids, gids and cgroups.

Each client is a fresh process moved into its cgroup v2 directory before it execs, then
dropped to its uid/gid by setpriv; it connects or sends once and exits at once. The NEW
events are read with conntrail's own Listener and the labels decoded by `decode_label`.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import conntrail
from conntrail.errors import KernelError
from conntrail.kernel import attrlabels
from conntrail.kernel.attrlabels import LabelSupport
from conntrail.kernel.netns import resolve
from conntrail.model import FlowEvent
from conntrail.netlink import nftables
from conntrail.netlink.nftables import decode_label, is_kernel_label
from tests.integration.netenv import NatTopology, Netns, NetnsFactory
from tests.integration.traffic import TCP_SERVER

# The clients run as other users: they need an interpreter those users may execute (the
# test's own may live under /root).
CLIENT_PYTHON = "/usr/bin/python3"
_COUNTER = itertools.count()

CLIENT = r"""
import socket, sys
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
if kind == "tcp":
    sock = socket.create_connection((host, port), timeout=5)
    sock.sendall(b"ping")
else:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.sendto(b"ping", (host, port))
print(sock.getsockname()[1], flush=True)
sock.close()
"""

IGMP_JOIN = r"""
import socket, struct, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
group = struct.pack("4s4s", socket.inet_aton("239.18.0.1"), socket.inet_aton(sys.argv[1]))
sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
time.sleep(0.3)
"""


def cgroup2_mount() -> Path | None:
    """Where cgroup v2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid)."""
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            before, _, after = line.partition(" - ")
            if after.split()[:1] == ["cgroup2"]:
                return Path(before.split()[4])
    return None


@dataclass
class Cgroups:
    """Directories made for one test under the cgroup2 mount; removed afterwards."""

    root: Path
    top: Path

    def make(self, relative: str) -> Path:
        path = self.top / relative
        path.mkdir(parents=True, exist_ok=True)
        return path

    def remove(self) -> None:
        dirs = sorted((p for p in self.top.rglob("*") if p.is_dir()),
                      key=lambda p: len(p.parts), reverse=True)
        for path in [*dirs, self.top]:
            for _ in range(50):  # a process that just exited may leave the group busy
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                    time.sleep(0.02)


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    root = cgroup2_mount()
    if root is None:
        pytest.skip("no cgroup2 mount")
    if not os.access(CLIENT_PYTHON, os.X_OK) or shutil.which("setpriv") is None:
        pytest.skip(f"clients need {CLIENT_PYTHON} and setpriv")
    tree = Cgroups(root, root / f"ctt-{os.getpid()}-{next(_COUNTER)}")
    tree.top.mkdir()
    try:
        yield tree
    finally:
        tree.remove()


@pytest.fixture
def topo(nat_topology: NatTopology) -> NatTopology:
    """client → router (masquerade) → server; the rules go where each test says."""
    return nat_topology


def client_output(ns: Netns, cgroup: Path, uid: int, gid: int, *args: str) -> list[str]:
    """Run `python3 -I -c ARGS` born in `cgroup`, as uid:gid, in `ns`; its output's words.
    The shell, nsenter and setpriv all exec: the client keeps the shell's pid."""
    command = ["sh", "-c", 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"', "sh",
               str(cgroup), "nsenter", f"--net=/run/netns/{ns.name}", "setpriv",
               f"--reuid={uid}", f"--regid={gid}", "--clear-groups", CLIENT_PYTHON, "-I",
               "-c", *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def run_client(ns: Netns, cgroup: Path, uid: int, gid: int, *args: str) -> int:
    """A process born in `cgroup`, running as uid:gid in `ns`; returns its source port."""
    return int(client_output(ns, cgroup, uid, gid, *args)[-1])


def collect(listener: conntrail.Listener, wanted: Callable[[FlowEvent], bool], count: int,
            timeout: float = 10.0) -> list[FlowEvent]:
    """NEW events matching `wanted` until `count` arrived or `timeout` passed."""
    found: list[FlowEvent] = []
    deadline = time.monotonic() + timeout
    while len(found) < count and time.monotonic() < deadline:
        select.select([listener.fileno()], [], [], 0.2)
        found += [r for r in listener.read() if isinstance(r, FlowEvent) and wanted(r)]
    return found


def install(ns: Netns, levels: int = 8) -> LabelSupport:
    return attrlabels.install(resolve(ns.name), levels)


def rule_count(ns: Netns) -> int:
    listing = ns.run("nft", "list", "table", "inet", nftables.TABLE)
    return sum(1 for line in listing.splitlines() if line.strip().startswith("ct "))


@dataclass(frozen=True)
class Case:
    kind: str  # tcp / udp
    host: str
    uid: int
    gid: int
    cgroup: str  # relative to the test's top directory; "" = the cgroup2 root


CASES = [
    Case("tcp", "198.18.2.2", 4242, 4343, "a/b"),
    Case("udp", "198.18.2.2", 4343, 4444, "a"),
    Case("tcp", "2001:db8:2::2", 4444, 4545, "a/b"),
    Case("udp", "2001:db8:2::2", 4545, 4646, "c"),
    Case("tcp", "198.18.2.2", 0, 0, "c"),  # root: labelled, unlike a forwarded flow
    Case("udp", "198.18.2.2", 65534, 65534, ""),  # root cgroup: level 0, id 1
]


def test_new_events_carry_uid_gid_and_cgroup(topo: NatTopology, cgroups: Cgroups) -> None:
    support = install(topo.client)
    assert support == LabelSupport(True, 8)
    port = 7100
    tcp_count = sum(case.kind == "tcp" for case in CASES)
    expected: dict[tuple[int, int], tuple[int, int, int]] = {}
    with conntrail.Listener(netns=topo.client.name, kinds=["new"]) as listener, \
            topo.server.spawn_python(TCP_SERVER, "::", str(port), str(tcp_count), "10"):
        for case in CASES:
            where = cgroups.make(case.cgroup) if case.cgroup else cgroups.root
            sport = run_client(topo.client, where, case.uid, case.gid, CLIENT, case.kind,
                               case.host, str(port))
            proto = 6 if case.kind == "tcp" else 17
            expected[(proto, sport)] = (case.uid, case.gid, os.stat(where).st_ino)
        events = collect(listener, lambda e: (e.flow.orig.proto, e.flow.orig.sport)
                         in expected, len(expected))
    got = {(e.flow.orig.proto, e.flow.orig.sport): decode_label(e.flow.labels)
           for e in events}
    assert got == expected
    assert (65534, 65534, 1) in got.values()  # the cgroup2 root (inode 1) is level 0
    assert (0, 0, os.stat(cgroups.top / "c").st_ino) in got.values()  # uid 0 is labelled


def test_forwarded_flow_gets_no_label_local_root_flow_does(topo: NatTopology,
                                                           cgroups: Cgroups) -> None:
    assert install(topo.router).labels
    cgroup = cgroups.make("router")
    with conntrail.Listener(netns=topo.router.name, kinds=["new"]) as listener:
        forwarded = run_client(topo.client, cgroup, 4242, 4343, CLIENT, "udp",
                               "198.18.2.2", "7200")
        local = run_client(topo.router, cgroup, 0, 0, CLIENT, "udp", "198.18.2.2", "7201")
        events = collect(listener, lambda e: e.flow.orig.dport in (7200, 7201), 2)
    by_port = {e.flow.orig.dport: e for e in events}
    assert by_port[7200].flow.orig.sport == forwarded
    assert by_port[7200].flow.labels is None and decode_label(by_port[7200].flow.labels) is None
    assert by_port[7201].flow.orig.sport == local
    assert decode_label(by_port[7201].flow.labels) == (0, 0, os.stat(cgroup).st_ino)


def test_kernel_originated_flow_gets_the_kernel_label(topo: NatTopology) -> None:
    """An IGMP report is sent by the kernel (no socket): `meta skuid` breaks in every socket
    rule, and the last rule marks the flow as the kernel's."""
    install(topo.client)
    with conntrail.Listener(netns=topo.client.name, kinds=["new"]) as listener:
        topo.client.python(IGMP_JOIN, topo.client_v4)
        events = collect(listener, lambda e: e.flow.orig.proto == 2, 1)
    assert events and all(is_kernel_label(e.flow.labels) for e in events)
    assert all(decode_label(e.flow.labels) is None for e in events)


def test_install_replaces_and_remove_is_idempotent(netns_factory: NetnsFactory) -> None:
    ns = netns_factory.new("host")
    ref = resolve(ns.name)
    assert install(ns, levels=8) == LabelSupport(True, 8)
    assert install(ns, levels=2) == LabelSupport(True, 2)  # replaced, not appended to
    assert rule_count(ns) == 2 + 3 + 1 + 1  # guards, levels 2..0, uid/gid, kernel
    assert ns.tables().split() == ["table", "inet", nftables.TABLE]
    assert install(ns, levels=0) == LabelSupport(True, 0)
    assert rule_count(ns) == 4
    attrlabels.remove(ref)
    attrlabels.remove(ref)
    assert ns.tables().strip() == ""


def test_without_socket_cgroupv2_uid_and_gid_remain(topo: NatTopology, cgroups: Cgroups,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel lacking the expression answers ENOENT: simulated with an unknown name."""
    def missing(level: int, dreg: nftables.Reg) -> bytes:
        return nftables.expression("socketx", nftables._be32(nftables.NFTA_SOCKET_LEVEL, level))

    monkeypatch.setattr(nftables, "socket_cgroupv2", missing)
    support = install(topo.client)
    assert (support.labels, support.cgroup_levels, support.cgroups) == (True, 0, False)
    assert "expression 3 (socketx)" in support.reason and "errno 2" in support.reason
    cgroup = cgroups.make("a")
    with conntrail.Listener(netns=topo.client.name, kinds=["new"]) as listener:
        sport = run_client(topo.client, cgroup, 4242, 4343, CLIENT, "udp", "198.18.2.2", "7300")
        events = collect(listener, lambda e: e.flow.orig.sport == sport, 1)
    assert [decode_label(e.flow.labels) for e in events] == [(4242, 4343, None)]


def test_without_ct_labels_nothing_is_left(netns_factory: NetnsFactory,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel refusing the labels key (EOPNOTSUPP) gets no table, not even an old one."""
    ns = netns_factory.new("host")
    assert install(ns).labels  # an older copy that must not survive

    def refused(key: nftables.CtKey, sreg: nftables.Reg) -> bytes:
        return nftables.expression("ct", nftables._be32(nftables.NFTA_CT_KEY, 99),
                                   nftables._be32(nftables.NFTA_CT_SREG, sreg))

    monkeypatch.setattr(nftables, "ct_store", refused)
    support = install(ns)
    assert (support.labels, support.cgroup_levels) == (False, 0)
    assert "errno 95" in support.reason
    assert ns.tables().strip() == ""


def test_other_refusals_raise_naming_the_message(netns_factory: NetnsFactory,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    ns = netns_factory.new("host")
    monkeypatch.setattr(attrlabels, "UNSUPPORTED", frozenset())
    monkeypatch.setattr(nftables, "socket_cgroupv2",
                        lambda level, dreg: nftables.expression("socketx"))
    with pytest.raises(KernelError, match=r"cgroup level 8, expression 3 \(socketx\).*errno 2"):
        install(ns)
    assert nftables.TABLE not in ns.tables()  # the batch was all or nothing

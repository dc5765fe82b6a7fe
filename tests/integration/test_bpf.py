"""The eBPF tier on the real kernel: exact pid, uid/gid, comm and argv for flows of processes
that run as a distinct user in a fresh network namespace, however short-lived."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conntrail.errors import KernelError
from conntrail.kernel import bpf
from conntrail.model import AF_INET, AF_INET6
from tests.integration.netenv import Netns, NetnsFactory

UID, GID = 4242, 4343
CLIENT4, SERVER4 = "198.18.40.1", "198.18.40.2"
CLIENT6, SERVER6 = "2001:db8:40::1", "2001:db8:40::2"
TCP_PORT, UDP_PORT = 8040, 5340


@pytest.fixture(scope="module")
def support() -> bpf.BpfSupport:
    found = bpf.probe()
    if not found.usable:
        pytest.skip(f"eBPF tier unavailable here: {found.describe()}")
    return found


def _bpftool_json(*args: str) -> list[dict[str, object]]:
    out = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    return json.loads(out) if out.strip() else []


def _prog_ids() -> dict[int, str]:
    return {int(str(p["id"])): str(p.get("name", "")) for p in _bpftool_json("prog", "show")}


def _cgroup_prog_ids(root: str) -> set[int]:
    ids: set[int] = set()
    for entry in _bpftool_json("cgroup", "tree", root):
        programs = entry.get("programs", [])
        assert isinstance(programs, list)
        ids.update(int(p["id"]) for p in programs)
    return ids


@contextlib.contextmanager
def attached(support: bpf.BpfSupport, idle_s: float = 30.0) -> Iterator[bpf.BpfAttribution]:
    """Open the tier; afterwards prove that every program it loaded is gone (bounded wait:
    the kernel frees programs after an RCU grace period)."""
    assert support.cgroup_root is not None
    before = _prog_ids()
    attribution = bpf.BpfAttribution.open(support=support, idle_s=idle_s)
    try:
        # programs loaded meanwhile by anyone else would only add to `ours`
        ours = {pid: name for pid, name in _prog_ids().items() if pid not in before}
        assert set(attribution.attached) <= set(ours.values())
        on_cgroup = _cgroup_prog_ids(support.cgroup_root)
        assert {name for pid, name in ours.items() if pid in on_cgroup} >= {
            name for name in attribution.attached if name not in ("ct_exec", "ct_fork")}
        yield attribution
    finally:
        attribution.close()
    deadline = time.monotonic() + 10
    while True:
        left = set(ours) & (set(_prog_ids()) | _cgroup_prog_ids(support.cgroup_root))
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"programs still loaded or attached after close: {left}"


@pytest.fixture
def tier(support: bpf.BpfSupport) -> Iterator[bpf.BpfAttribution]:
    with attached(support) as attribution:
        yield attribution


@dataclasses.dataclass
class Hosts:
    client: Netns
    server: Netns
    netns_cookie: int
    bindir: Path
    client_if: str


def _world_python() -> str:
    """A Python interpreter uid 4242 can run (the venv's may live under /root)."""
    for candidate in ("/usr/bin/python3", os.path.realpath(sys.executable)):
        path = Path(candidate).resolve()
        if path.is_file() and all(os.stat(p).st_mode & 0o001 for p in path.parents):
            return str(path)
    pytest.skip("no Python interpreter that an unprivileged uid can execute")


SERVER = r"""
import select, socket, sys, time
listeners = []
for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    s = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(sys.argv[1])))
    s.listen(64)
    listeners.append(s)
print("ready", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    ready, _, _ = select.select(listeners, [], [], 0.5)
    for s in ready:
        conn, _ = s.accept()
        conn.settimeout(2)
        try:
            conn.recv(64)
        except OSError:
            pass
        conn.close()
"""


@pytest.fixture
def hosts(netns_factory: NetnsFactory) -> Iterator[Hosts]:
    """client ⟷ server over veth, IPv4 198.18.40.0/24 and IPv6 2001:db8:40::/64; a TCP
    server on the server side; a directory of interpreter links named after each workload."""
    client, server = netns_factory.new("bpfc"), netns_factory.new("bpfs")
    client_if, _ = netns_factory.link(client, [f"{CLIENT4}/24", f"{CLIENT6}/64"],
                                      server, [f"{SERVER4}/24", f"{SERVER6}/64"])
    cookie = int(client.python(
        "import socket; s = socket.socket();"
        f"print(int.from_bytes(s.getsockopt(socket.SOL_SOCKET, {bpf.SO_NETNS_COOKIE}, 8),"
        " 'little'))").strip())
    bindir = Path(tempfile.mkdtemp(prefix="ctt-bpf-"))
    bindir.chmod(0o755)
    with subprocess.Popen(["ip", "netns", "exec", server.name, sys.executable, "-c", SERVER,
                           str(TCP_PORT)], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            yield Hosts(client, server, cookie, bindir, client_if)
        finally:
            proc.kill()
            proc.communicate(timeout=10)
            shutil.rmtree(bindir, ignore_errors=True)


class Run:
    """One workload process: its pid (kept through ip-netns-exec → setpriv → python execs),
    what it printed, its argv."""

    def __init__(self, pid: int, output: list[dict[str, int]], argv: tuple[str, ...]) -> None:
        self.pid, self.output, self.argv = pid, output, argv
        self.name = Path(argv[0]).name


def run_as_user(hosts: Hosts, name: str, program: str, *args: str) -> Run:
    """Run `program` (a script file) in the client namespace as uid 4242/gid 4343 under an
    interpreter link called `name` (so comm is `name`); wait for it to exit."""
    link, script = hosts.bindir / name, hosts.bindir / f"{name}.py"
    if not link.exists():
        link.symlink_to(_world_python())
        script.write_text(program)
        script.chmod(0o644)
    argv = (str(link), str(script), *args)
    proc = subprocess.Popen(["ip", "netns", "exec", hosts.client.name, "setpriv", "--reuid",
                             str(UID), "--regid", str(GID), "--clear-groups", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    output = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert output[-1]["pid"] == proc.pid, "the exec chain should keep the pid"
    return Run(proc.pid, output, argv)


def collect(tier: bpf.BpfAttribution, done: Callable[[list[bpf.BpfRecord]], bool],
            timeout: float = 10.0) -> list[bpf.BpfRecord]:
    """Read records (selecting on the tier's fd) until `done` says so or the time is up."""
    records: list[bpf.BpfRecord] = []
    deadline = time.monotonic() + timeout
    while not done(records) and time.monotonic() < deadline:
        ready, _, _ = select.select([tier], [], [], 0.2)
        if ready:
            records.extend(tier.read())
    records.extend(tier.read())
    return records


def flows_of(records: list[bpf.BpfRecord], hosts: Hosts, proto: int,
             sport: int) -> list[bpf.FlowRecord]:
    return [r for r in records if isinstance(r, bpf.FlowRecord)
            and r.netns_cookie == hosts.netns_cookie and r.proto == proto and r.sport == sport]


def execs_of(records: list[bpf.BpfRecord], run: Run) -> list[bpf.ExecRecord]:
    return [r for r in records if isinstance(r, bpf.ExecRecord) and r.pid == run.pid]


def assert_exact_flow(flow: bpf.FlowRecord, run: Run, pid: int | None = None) -> None:
    pid = run.pid if pid is None else pid
    assert (flow.pid, flow.tgid, flow.uid, flow.gid, flow.comm) == (pid, pid, UID, GID,
                                                                    run.name)
    assert flow.exact and not flow.flags & bpf.FlowFlag.KTHREAD
    assert flow.cgroup_id > 0 and flow.sk_cgroup_id > 0 and flow.sock_cookie > 0


def assert_exec_argv(records: list[bpf.BpfRecord], run: Run) -> bpf.ExecRecord:
    """The last exec of the run's pid is the workload itself, with its exact argv."""
    execs = execs_of(records, run)
    assert execs, "no exec record for the workload"
    final = execs[-1]
    assert (final.comm, final.filename, final.argv) == (run.name, run.argv[0], run.argv)
    assert (final.uid, final.gid, final.ppid) == (UID, GID, os.getpid())
    assert not final.args_truncated
    return final


TCP_CONNECT = r"""
import json, os, socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.connect((sys.argv[1], int(sys.argv[2])))
s.sendall(b"hello")
port = s.getsockname()[1]
s.close()
print(json.dumps({"pid": os.getpid(), "sport": port}))
"""

UDP_ONE_SHOT = r"""
import json, os, socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.sendto(b"once", (sys.argv[1], int(sys.argv[2])))
print(json.dumps({"pid": os.getpid(), "sport": s.getsockname()[1]}))
"""

# connect, send, close and exit; the socket lives well under a millisecond
QUICK = r"""
import json, os, socket, sys, time
t0 = time.perf_counter_ns()
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"x")
port = s.getsockname()[1]
s.close()
lived = time.perf_counter_ns() - t0
sys.stdout.write(json.dumps({"pid": os.getpid(), "sport": port, "lived_ns": lived}) + "\n")
sys.stdout.flush()
os._exit(0)
"""

# the child of a fork (no exec) sends; the parent only waits
FORK_THEN_SEND = r"""
import json, os, socket, sys
child = os.fork()
if child == 0:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
    print(json.dumps({"child": os.getpid(), "sport": s.getsockname()[1]}), flush=True)
    os._exit(0)
os.waitpid(child, 0)
print(json.dumps({"pid": os.getpid()}))
"""


# a SYN nobody answers: the kernel retransmits it from a timer (softirq), where `current` is
# whatever task that CPU was running
UNANSWERED_SYN = r"""
import json, os, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setblocking(False)
s.connect_ex((sys.argv[1], int(sys.argv[2])))
port = s.getsockname()[1]
time.sleep(float(sys.argv[3]))
s.close()
print(json.dumps({"pid": os.getpid(), "sport": port}))
"""


def _syn_retransmits(ns: Netns) -> int:
    lines = [line.split() for line in ns.run("cat", "/proc/net/netstat").splitlines()]
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names[0] == "TcpExt:":
            return int(values[names.index("TCPSynRetrans")])
    raise AssertionError("no TcpExt in /proc/net/netstat")


def _await_flow_and_exec(tier: bpf.BpfAttribution, hosts: Hosts, run: Run,
                         proto: int) -> list[bpf.BpfRecord]:
    sport = run.output[0]["sport"]
    return collect(tier, lambda recs: bool(flows_of(recs, hosts, proto, sport))
                   and any(e.comm == run.name for e in execs_of(recs, run)))


def test_probe_reports_what_this_kernel_allows(support: bpf.BpfSupport) -> None:
    answers = dict(support.features)
    assert answers["cgroup_skb/egress"] == "yes"
    assert answers["tp_btf/sched_process_exec"] == "yes"
    task_helpers = [answers[f"cgroup_skb/egress: {helper}"] == "yes"
                    for helper in bpf._TASK_HELPERS]
    assert (support.egress == "task") is all(task_helpers)
    release = tuple(int(part) for part in os.uname().release.split(".")[:2])
    if release >= (6, 18):  # measured on 6.18: cgroup_skb may read the current task
        assert support.egress == "task"
    # a refusal carries the verifier's own words
    refused = bpf._probe_helper(bpf._TARGETS["tp_btf/sched_process_exec"],
                                "bpf_get_netns_cookie")
    assert refused[0] is False and "cannot use helper" in refused[1]


def test_tcp_connect_ipv4(tier: bpf.BpfAttribution, hosts: Hosts) -> None:
    run = run_as_user(hosts, "ctt-tcp4", TCP_CONNECT, SERVER4, str(TCP_PORT))
    records = _await_flow_and_exec(tier, hosts, run, 6)
    flows = flows_of(records, hosts, 6, run.output[0]["sport"])
    assert len(flows) == 1, "one record per flow: the SYN, not the rest of the connection"
    flow = flows[0]
    assert flow.family == AF_INET
    assert (flow.src, flow.dst, flow.dport) == (CLIENT4, SERVER4, TCP_PORT)
    assert_exact_flow(flow, run)
    assert flow.owner_hook == bpf.OwnerHook.CONNECT and flow.flags == 0
    assert flow.netns_ino == os.stat(f"/run/netns/{hosts.client.name}").st_ino
    final = assert_exec_argv(records, run)
    assert final.ktime_ns < flow.ktime_ns
    assert final.cgroup_id == flow.cgroup_id
    # the record's time is the packet's: within seconds of now, in epoch terms
    assert abs(flow.ktime_ns + bpf.boot_to_epoch_offset_ns() - time.time_ns()) < 30e9


def test_udp_one_shot_sender(tier: bpf.BpfAttribution, hosts: Hosts) -> None:
    run = run_as_user(hosts, "ctt-udp1", UDP_ONE_SHOT, SERVER4, str(UDP_PORT))
    records = _await_flow_and_exec(tier, hosts, run, 17)
    (flow,) = flows_of(records, hosts, 17, run.output[0]["sport"])
    assert (flow.src, flow.dst, flow.dport) == (CLIENT4, SERVER4, UDP_PORT)
    assert_exact_flow(flow, run)
    assert flow.owner_hook == bpf.OwnerHook.SENDMSG
    assert_exec_argv(records, run)


def test_process_gone_within_a_millisecond(tier: bpf.BpfAttribution, hosts: Hosts) -> None:
    for _ in range(5):  # ~60 µs here; a loaded host may stretch one run past the millisecond
        run = run_as_user(hosts, "ctt-quick", QUICK, SERVER4, str(TCP_PORT))
        if run.output[0]["lived_ns"] < 1_000_000:
            break
    assert run.output[0]["lived_ns"] < 1_000_000
    # The process has exited (and been reaped) before a single record is read.
    assert not Path(f"/proc/{run.pid}").exists()
    records = _await_flow_and_exec(tier, hosts, run, 6)
    (flow,) = flows_of(records, hosts, 6, run.output[0]["sport"])
    assert_exact_flow(flow, run)
    assert_exec_argv(records, run)


def test_ipv6_tcp_and_udp(tier: bpf.BpfAttribution, hosts: Hosts) -> None:
    tcp = run_as_user(hosts, "ctt-tcp6", TCP_CONNECT, SERVER6, str(TCP_PORT))
    udp = run_as_user(hosts, "ctt-udp6", UDP_ONE_SHOT, SERVER6, str(UDP_PORT))
    records = collect(tier, lambda recs: bool(
        flows_of(recs, hosts, 6, tcp.output[0]["sport"])
        and flows_of(recs, hosts, 17, udp.output[0]["sport"])
        and execs_of(recs, udp)))
    (tcp_flow,) = flows_of(records, hosts, 6, tcp.output[0]["sport"])
    (udp_flow,) = flows_of(records, hosts, 17, udp.output[0]["sport"])
    for flow, run, port in ((tcp_flow, tcp, TCP_PORT), (udp_flow, udp, UDP_PORT)):
        assert flow.family == AF_INET6
        assert (flow.src, flow.dst, flow.dport) == (CLIENT6, SERVER6, port)
        assert_exact_flow(flow, run)
        assert_exec_argv(records, run)


def test_forked_child_is_the_sender(tier: bpf.BpfAttribution, hosts: Hosts) -> None:
    run = run_as_user(hosts, "ctt-fork", FORK_THEN_SEND, SERVER4, str(UDP_PORT))
    child, sport = run.output[0]["child"], run.output[0]["sport"]
    records = collect(tier, lambda recs: bool(flows_of(recs, hosts, 17, sport)) and any(
        isinstance(r, bpf.ForkRecord) and r.pid == child for r in recs))
    (flow,) = flows_of(records, hosts, 17, sport)
    assert_exact_flow(flow, run, pid=child)
    forks = [r for r in records if isinstance(r, bpf.ForkRecord) and r.pid == child]
    assert [(f.ppid, f.comm) for f in forks] == [(run.pid, run.name)]
    # the child never exec'd: its command line is its parent's
    assert_exec_argv(records, run)


def test_retransmitted_syn_is_not_a_new_flow(support: bpf.BpfSupport, hosts: Hosts) -> None:
    """Even once the flow has been idle longer than `idle_s` (0.5 s here; the retransmission
    comes after 1 s), the same socket's SYN is never reported again."""
    blackhole = "198.18.40.9"  # a neighbour entry to a MAC nobody has: SYNs go unanswered
    hosts.client.run("ip", "neigh", "replace", blackhole, "lladdr", "02:00:00:00:00:09", "dev",
                     hosts.client_if)
    with attached(support, idle_s=0.5) as tier:
        before = _syn_retransmits(hosts.client)
        run = run_as_user(hosts, "ctt-synrt", UNANSWERED_SYN, blackhole, str(TCP_PORT), "1.6")
        assert _syn_retransmits(hosts.client) > before, "the SYN should have been retransmitted"
        records = _await_flow_and_exec(tier, hosts, run, 6)
        time.sleep(0.2)
        records += tier.read()
    (flow,) = flows_of(records, hosts, 6, run.output[0]["sport"])
    assert flow.dst == blackhole
    assert_exact_flow(flow, run)


def test_socket_owner_mode_for_kernels_without_task_helpers(support: bpf.BpfSupport,
                                                            hosts: Hosts) -> None:
    """egress_sk: what kernels < 6.10 get, the identity the connect/sendmsg hooks kept."""
    if not support.sock_hooks:
        pytest.skip("cgroup sock hooks unavailable")
    with attached(dataclasses.replace(support, egress="socket")) as tier:
        assert "ct_egress_sk" in tier.attached and "ct_egress" not in tier.attached
        tcp = run_as_user(hosts, "ctt-sk-tcp", TCP_CONNECT, SERVER4, str(TCP_PORT))
        udp = run_as_user(hosts, "ctt-sk-udp", UDP_ONE_SHOT, SERVER4, str(UDP_PORT))
        records = collect(tier, lambda recs: bool(
            flows_of(recs, hosts, 6, tcp.output[0]["sport"])
            and flows_of(recs, hosts, 17, udp.output[0]["sport"])))
    (tcp_flow,) = flows_of(records, hosts, 6, tcp.output[0]["sport"])
    (udp_flow,) = flows_of(records, hosts, 17, udp.output[0]["sport"])
    for flow, run, hook in ((tcp_flow, tcp, bpf.OwnerHook.CONNECT),
                            (udp_flow, udp, bpf.OwnerHook.SENDMSG)):
        assert flow.source == bpf.FlowSource.SOCK_HOOK and flow.owner_hook == hook
        assert_exact_flow(flow, run)


def test_nothing_lost_and_nothing_malformed(tier: bpf.BpfAttribution, hosts: Hosts) -> None:
    run = run_as_user(hosts, "ctt-udp1", UDP_ONE_SHOT, SERVER4, str(UDP_PORT))
    _await_flow_and_exec(tier, hosts, run, 17)
    assert tier.drops() == bpf.BpfDrops(0, 0, 0)
    assert tier.malformed == 0
    tier.close()
    with pytest.raises(KernelError, match="closed"):
        tier.read()

"""Process attribution benchmark (issue 3): who opened each flow, against ground truth.

Workloads run in a client namespace towards a server namespace (both created here), each
client process born in its own cgroup v2 directory under a distinct uid/gid, each recording
the ground truth of every flow it opens (pid, uid, gid, cgroup, command line, executable,
protocol, source port, send time):

  curl         one `curl` process per HTTP request to a tiny server
  tcp-oneshot  one Python process per flow: connect, send, close, exit
  udp-oneshot  one Python process per flow: sendto, exit
  long-lived   one Python process making many connections at a paced rate

Each runs with and without idle background processes (own cgroup, holding sockets and pipes)
and once per layer combination, each a fresh `conntrail watch --json -e new` listening to
the client namespace (combinations are watch arguments: one more is one more `--combo`).
Events are matched to the truth by protocol, ports and time; the report gives the share of
flows with correct uid/gid/cgroup/pid/cmdline, the confidence shares, wrong pids claimed
exact (must be 0), watch CPU per event and send-to-attribution latency p50/p99.

Run as root:  .venv/bin/python bench/attribution.py [--count 1000] [--long-count 10000]
Everything it creates (namespaces cta-*, cgroup /cta-bench, processes) is removed at the end,
also on failure or Ctrl-C. See bench/README.md, "Process attribution benchmark".
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import errno
import hashlib
import json
import math
import os
import platform
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import e2e
import topology

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CLIENT_NS, SERVER_NS = "cta-client", "cta-server"
NETNS_DIR = Path("/run/netns")
ADDRS = {4: ("198.18.20.1", "198.18.20.2", 24), 6: ("2001:db8:20::1", "2001:db8:20::2", 64)}
CGROUP_TOP = "cta-bench"
CLIENT_PYTHON = "/usr/bin/python3"  # the clients run as another user: a system interpreter
CURL = "/usr/bin/curl"
HTTP_PORT, SINK_PORT, ACK_PORT = 8080, 9001, 9002
UDP_BASE = 20000  # udp-oneshot flow i goes to port UDP_BASE + i: no two flows share a tuple
UDP_PORTS = 40000
MATCH_WINDOW_NS = 5 * 10**9  # an event matches a truth flow whose send time is this close
CONFIDENCES = ("exact", "uid-only", "inferred", "none", "absent", "missing")
FIELDS = ("uid", "gid", "cgroup", "unit", "pid", "cmdline", "cmdline_prefix", "exe")
# Born in the cgroup given as $1, then the rest of the command line is exec'd (same pid).
MOVE_AND_EXEC = 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"'

# ---------------------------------------------------------------- programs run by the bench

CLIENT_COMMON = r"""
import os, socket, sys, time
def identity():
    with open("/proc/self/cgroup") as f:
        cg = next((line[3:].strip() for line in f if line.startswith("0::")), "")
    with open("/proc/self/cmdline", "rb") as f:
        argv = f.read().rstrip(b"\0").split(b"\0")
    return "\t".join([str(os.getpid()), str(os.getuid()), str(os.getgid()), cg,
                      os.readlink("/proc/self/exe"), b" ".join(argv).decode()])
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
who = identity()  # read before the socket exists: its life is the flow's, nothing more
"""

TCP_ONESHOT = CLIENT_COMMON + r"""
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(5)
t = time.time_ns()
s.connect((host, port))
s.sendall(b"x")
sport = s.getsockname()[1]
s.close()
sys.stdout.write(f"{who}\n{sport}\t{t}\n")
"""

UDP_ONESHOT = CLIENT_COMMON + r"""
s = socket.socket(fam, socket.SOCK_DGRAM)
t = time.time_ns()
s.sendto(b"x", (host, port))
sport = s.getsockname()[1]
sys.stdout.write(f"{who}\n{sport}\t{t}\n")
sys.stdout.flush()
os._exit(0)  # sendto and exit: the socket goes with the process
"""

LONG_LIVED = CLIENT_COMMON + r"""
count, rate, limit = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
lines, errors = [], 0
interval = 1.0 / rate
start = time.monotonic()
due = start
for _ in range(count):
    now = time.monotonic()
    if now - start > limit:
        break
    if due > now:
        time.sleep(due - now)
    due = max(due + interval, time.monotonic() - 0.05)  # late: catch up, never burst
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(5)
    t = time.time_ns()
    try:
        s.connect((host, port))
        s.sendall(b"x")
        s.recv(16)
        lines.append(f"{s.getsockname()[1]}\t{t}")
    except OSError:
        errors += 1
    finally:
        s.close()
sys.stdout.write(f"{who}\n" + "".join(line + "\n" for line in lines))
sys.stderr.write(f"errors {errors}\n")
"""

SERVER = r"""
import selectors, socket, sys, time
host, lifetime = sys.argv[1], float(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
HTTP = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
sel = selectors.DefaultSelector()
for port, kind in ((8080, "http"), (9001, "sink"), (9002, "ack")):
    lsn = socket.socket(fam, socket.SOCK_STREAM)
    lsn.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsn.bind((host, port))
    lsn.listen(4096)
    lsn.setblocking(False)
    sel.register(lsn, selectors.EVENT_READ, ("accept", kind, None))
print("ready", flush=True)
def close(conn):
    sel.unregister(conn)
    conn.close()
deadline = time.monotonic() + lifetime
while time.monotonic() < deadline:
    for key, _ in sel.select(0.5):
        what, kind, buf = key.data
        if what == "accept":
            for _ in range(256):
                try:
                    conn, _ = key.fileobj.accept()
                except OSError:
                    break
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, ("conn", kind, bytearray()))
            continue
        conn = key.fileobj
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if not data:
            close(conn)
        elif kind == "http":
            buf += data
            if b"\r\n\r\n" in buf:
                try:
                    conn.send(HTTP)
                except OSError:
                    pass
                close(conn)
        elif kind == "ack":
            try:
                conn.send(b"ok\n")
            except OSError:
                pass
"""

IDLE = r"""
import os, signal, socket, sys
count, fds, addr, lifetime = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
inet = fds // 5  # a fifth inet sockets (half TCP unbound, half UDP bound), the rest pipes
rfd, wfd = os.pipe()  # and unix socket pairs, two fds each
for _ in range(count):
    if os.fork() == 0:
        try:
            os.close(rfd)
            held = []
            for i in range(inet):
                s = socket.socket(fam, socket.SOCK_DGRAM if i % 2 else socket.SOCK_STREAM)
                if i % 2:
                    s.bind((addr, 0))
                held.append(s)
            for i in range((fds - inet) // 2):
                held.append(os.pipe() if i % 2 else socket.socketpair())
            os.write(wfd, b"r")
            signal.alarm(lifetime)  # a safety net: the bench kills the cgroup long before
            while True:
                signal.pause()
        finally:
            os._exit(0)
os.close(wfd)
ready = 0
while ready < count:
    chunk = os.read(rfd, 4096)
    if not chunk:
        break
    ready += len(chunk)
print("ready", ready, flush=True)
signal.alarm(lifetime)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""

CTLOGGER = r"""
# conntrack-logger's way, after each NEW event: find the socket's inode in /proc/net/*, then
# glob every /proc/*/fd/* and readlink each until one is that socket; describe that pid.
import glob, json, os, socket, sys
TABLES = {("tcp", 4): "tcp", ("tcp", 6): "tcp6", ("udp", 4): "udp", ("udp", 6): "udp6"}
def inode_of(proto, fam, sport, dport):
    try:
        with open(f"/proc/net/{TABLES[(proto, fam)]}") as f:
            lines = f.read().splitlines()[1:]
    except (KeyError, OSError):
        return None
    for line in lines:
        cols = line.split()
        lport, rport = int(cols[1].split(":")[1], 16), int(cols[2].split(":")[1], 16)
        if lport == sport and rport in (0, dport) and cols[9] != "0":
            return cols[9]
    return None
def owner(inode):
    target = f"socket:[{inode}]"
    for path in glob.glob("/proc/[0-9]*/fd/[0-9]*"):
        try:
            if os.readlink(path) == target:
                return int(path.split("/")[2])
        except OSError:
            pass
    return None
def describe(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().rstrip(b"\0").split(b"\0")
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        with open(f"/proc/{pid}/cgroup") as f:
            cg = next((line[3:].strip() for line in f if line.startswith("0::")), None)
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    return {"pid": pid, "command_line": b" ".join(argv).decode("utf-8", "replace"),
            "executable": exe}, status["Uid"].split()[0], status["Gid"].split()[0], cg
for raw in sys.stdin.buffer:
    try:
        doc = json.loads(raw)
    except ValueError:
        continue
    if doc.get("event", {}).get("action") == "new":
        src, dst = doc.get("source", {}), doc.get("destination", {})
        proto = doc.get("network", {}).get("transport")
        fam = 6 if ":" in src.get("ip", "") else 4
        attribution = {"method": "ctlogger", "confidence": "none"}
        if "port" in src and "port" in dst:
            inode = inode_of(proto, fam, src["port"], dst["port"])
            pid = owner(inode) if inode else None
            info = describe(pid) if pid else None
            if info is not None:
                doc["process"], uid, gid, cg = info
                doc["user"], doc["group"] = {"id": uid}, {"id": gid}
                attribution = {"method": "ctlogger", "confidence": "exact", "cgroup": cg}
        doc.setdefault("conntrail", {})["attribution"] = attribution
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()
"""

SCRIPTS = {"tcp_oneshot.py": TCP_ONESHOT, "udp_oneshot.py": UDP_ONESHOT,
           "long_lived.py": LONG_LIVED, "server.py": SERVER, "idle.py": IDLE,
           "ctlogger.py": CTLOGGER}


# ---------------------------------------------------------------- definitions


@dataclass(frozen=True)
class Workload:
    """One workload: its protocol and the cgroup (leaf = systemd-style unit) of its clients."""

    name: str
    proto: str
    unit: str


WORKLOADS = {w.name: w for w in (
    Workload("curl", "tcp", "curl.scope"),
    Workload("tcp-oneshot", "tcp", "tcp-oneshot.scope"),
    Workload("udp-oneshot", "udp", "udp-oneshot.scope"),
    Workload("long-lived", "tcp", "long-lived.service"),
)}


@dataclass(frozen=True)
class Combo:
    """A layer combination: the extra `conntrail watch` arguments (and the emulator)."""

    name: str
    args: tuple[str, ...]
    ctlogger: bool = False  # pipe watch's output through the conntrack-logger emulation


BUILTIN_COMBOS = (
    Combo("none", ("--no-attribution",)),
    Combo("labels", ("--no-socket-lookup", "--ebpf", "off")),
    Combo("labels+sockdiag+proc", ("--ebpf", "off")),
    Combo("labels+ebpf+sockdiag+proc", ("--ebpf", "on")),
    Combo("ctlogger", ("--no-attribution",), ctlogger=True),
)


@dataclass
class Options:
    """Command-line settings."""

    count: int
    long_count: int
    long_rate: float
    workloads: list[str]
    combos: list[Combo]
    idle: list[bool]
    idle_procs: int
    idle_fds: int
    family: int
    parallel: int
    uid: int
    gid: int
    conntrail_cmd: list[str]
    max_seconds: float
    client_timeout: float
    ready_timeout: float
    settle: float
    drain_quiet: float
    drain_max: float
    keep: Path | None
    out: Path
    live_src: bool
    src: Path = REPO / "src"  # what watch imports: a snapshot of it unless --live-src


@dataclass
class Truth:
    """What a workload knows of one flow it opened."""

    proto: str
    sport: int
    dport: int
    send_ns: int
    pid: int
    uid: int
    gid: int
    cgroup: str
    cmdline: str
    exe: str

    @property
    def key(self) -> tuple[str, int, int]:
        """What an event is matched on (plus time)."""
        return (self.proto, self.sport, self.dport)


@dataclass
class Seen:
    """One NEW event as the listener printed it, with the time the bench read it."""

    recv_ns: int
    proto: str | None
    sport: int | None
    dport: int | None
    start_ns: int | None
    pid: int | None
    uid: int | None
    gid: int | None
    cgroup: str | None
    unit: str | None
    cmdline: str | None
    exe: str | None
    method: str | None
    confidence: str  # a CONFIDENCES label; "absent" when the event has no attribution

    @property
    def key(self) -> tuple[str | None, int | None, int | None]:
        """(protocol, source port, destination port)."""
        return (self.proto, self.sport, self.dport)


@dataclass
class Load:
    """What running a workload produced."""

    truths: list[Truth] = field(default_factory=list)
    attempted: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class CaseResult:
    """Everything measured for one (workload, idle, combination)."""

    workload: str
    idle: bool
    combo: str
    command: str = ""
    flows: int = 0
    attempted: int = 0
    client_errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    load_s: float = 0.0
    flows_per_s: float = 0.0
    events: int = 0
    other_lines: int = 0
    matched: int = 0
    unmatched_events: int = 0
    correct: dict[str, int] = field(default_factory=dict)
    wrong_pid_exact: int = 0
    wrong_pid_other: int = 0
    wrong_cmdline_exact: int = 0  # a command line (not a cut one) not the truth's, yet "exact"
    confidence: dict[str, int] = field(default_factory=dict)
    methods: dict[str, int] = field(default_factory=dict)
    cpu_s: float = 0.0
    baseline_cpu_ms_per_s: float = 0.0  # the listener's CPU with no load (host activity)
    latency_ms: dict[str, float] = field(default_factory=dict)
    kernel_stamp_ms: dict[str, float] = field(default_factory=dict)  # event.start - send
    drain_s: float = 0.0
    lost_in_kernel: int | None = None
    exit_code: int | None = None
    stderr_tail: list[str] = field(default_factory=list)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    error: str | None = None

    def share(self, count: int) -> float:
        """`count` as a percentage of the truth flows."""
        return 100.0 * count / self.flows if self.flows else 0.0

    @property
    def us_per_event(self) -> float:
        """Listener CPU (watch, plus the emulator for ctlogger) per NEW event received."""
        return 1e6 * self.cpu_s / self.events if self.events else 0.0

    def to_json(self) -> dict[str, Any]:
        """The result with its derived percentages."""
        doc = asdict(self)
        doc["us_per_event"] = round(self.us_per_event, 2)
        doc["pct"] = {name: round(self.share(n), 2) for name, n in self.correct.items()}
        doc["pct"]["received"] = round(self.share(self.matched), 2)
        doc["confidence_pct"] = {name: round(self.share(n), 2)
                                 for name, n in self.confidence.items()}
        return doc


# ---------------------------------------------------------------- namespaces and cgroups


def ns_path(ns: str) -> str:
    """The namespace's file, for nsenter (which, unlike `ip netns exec`, leaves /sys alone
    and so keeps the cgroup2 mount visible)."""
    return str(NETNS_DIR / ns)


def delete_namespaces() -> None:
    """Kill what runs in the bench's namespaces, flush the client's table, delete them."""
    listing = topology.run(["ip", "netns", "list"], check=False)
    present = {line.split()[0] for line in listing.splitlines() if line.strip()}
    for ns in (CLIENT_NS, SERVER_NS):
        if ns not in present:
            continue
        for pid in topology.run(["ip", "netns", "pids", ns], check=False).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        if ns == CLIENT_NS and shutil.which("conntrack"):
            topology.in_ns(ns, ["conntrack", "-F"], check=False)
        topology.run(["ip", "netns", "del", ns], check=False)


@contextlib.contextmanager
def namespaces(family: int) -> Iterator[tuple[str, str]]:
    """client ==veth== server; yields (client address, server address). The server drops
    UDP (no replies, no ICMP) with a rule that does not use conntrack, so only the client
    tracks flows. IPv6 is off in both unless it is the family under test."""
    delete_namespaces()
    client, server, plen = ADDRS[family]
    try:
        for ns in (CLIENT_NS, SERVER_NS):
            topology.run(["ip", "netns", "add", ns])
            if family == 4:
                for key in ("all", "default"):
                    topology.in_ns(ns, ["sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"])
            topology.run(["ip", "-n", ns, "link", "set", "lo", "up"])
        topology.run(["ip", "-n", CLIENT_NS, "link", "add", "cta0", "type", "veth", "peer",
                      "name", "cta1", "netns", SERVER_NS])
        for ns, dev, addr in ((CLIENT_NS, "cta0", client), (SERVER_NS, "cta1", server)):
            extra = ["nodad"] if family == 6 else []
            topology.run(["ip", "-n", ns, "addr", "add", f"{addr}/{plen}", "dev", dev, *extra])
            topology.run(["ip", "-n", ns, "link", "set", dev, "up"])
        # 10,000s of short TCP connections per case, cases back to back: the client may
        # reuse a TIME_WAIT port (matching is by port and time, so a reuse is harmless).
        topology.in_ns(CLIENT_NS, ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1",
                                   "net.ipv4.ip_local_port_range=10000 65000"])
        topology.in_ns(SERVER_NS, ["sysctl", "-qw", "net.core.somaxconn=4096"])
        topology.in_ns(SERVER_NS, ["nft", "-f", "-"], stdin="""
table inet cta {
    chain input {
        type filter hook input priority filter; policy accept;
        meta l4proto udp drop
    }
}
""")
        yield client, server
    finally:
        delete_namespaces()


def cgroup2_mount() -> Path:
    """Where cgroup v2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid)."""
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            before, _, after = line.partition(" - ")
            parts = before.split()
            if after.split()[:1] == ["cgroup2"] and len(parts) > 4 and parts[3] == "/":
                return Path(parts[4])
    raise SystemExit("no cgroup2 mount in /proc/self/mountinfo")


class CgroupTree:
    """The bench's cgroup directories under the cgroup2 mount; every one removed at the end
    with whatever still runs in it."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.top = mount / CGROUP_TOP

    def __enter__(self) -> CgroupTree:
        self.remove()  # a previous run killed too hard to clean up
        self.top.mkdir()
        return self

    def __exit__(self, *_: object) -> None:
        self.remove()

    def make(self, relative: str) -> Path:
        """A directory below the bench's top one."""
        path = self.top / relative
        path.mkdir(parents=True, exist_ok=True)
        return path

    def relative(self, path: Path) -> str:
        """The path as conntrail reports it: relative to the mount, with a leading '/'."""
        return "/" + str(path.relative_to(self.mount))

    def kill(self, path: Path, timeout: float = 10.0) -> None:
        """Kill every process in `path` and below; wait (bounded) until none is left."""
        if not path.exists():
            return
        try:
            (path / "cgroup.kill").write_text("1\n", encoding="ascii")
        except OSError:  # kernels before 5.14: signal each process
            for procs in path.rglob("cgroup.procs"):
                for pid in procs.read_text(encoding="ascii").split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.populated(path):
            time.sleep(0.05)

    @staticmethod
    def populated(path: Path) -> bool:
        """Whether a process is left in `path` or below (cgroup.events)."""
        try:
            return "populated 1" in (path / "cgroup.events").read_text(encoding="ascii")
        except OSError:
            return False

    def remove(self) -> None:
        """Kill everything in the tree, then remove its directories, deepest first."""
        if not self.top.exists():
            return
        self.kill(self.top)
        dirs = sorted((p for p in self.top.rglob("*") if p.is_dir()),
                      key=lambda p: len(p.parts), reverse=True)
        for path in [*dirs, self.top]:
            for _ in range(100):  # a process that just died may hold the directory a moment
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                    time.sleep(0.05)


# ---------------------------------------------------------------- background processes


def wait_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    """The first stdout line of `proc` starting with `prefix` (bounded in time)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith(prefix):
                return line
    raise RuntimeError(f"{proc.args!r}: no '{prefix}' line within {timeout:.0f} s "
                       f"(exit {proc.poll()})")


@contextlib.contextmanager
def background(argv: list[str], prefix: str, timeout: float,
               cgroups: CgroupTree | None = None,
               cgroup: Path | None = None) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A process that announces itself with a `prefix` line; killed (with its cgroup, when
    it has one) on exit."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        yield proc, wait_line(proc, prefix, timeout)
    finally:
        if cgroups is not None and cgroup is not None:
            cgroups.kill(cgroup)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def idle_census(cgroup: Path) -> dict[str, int]:
    """How many processes the idle cgroup holds and how many fds they hold in all."""
    pids = (cgroup / "cgroup.procs").read_text(encoding="ascii").split()
    fds = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fds += len(os.listdir(f"/proc/{pid}/fd"))
    return {"processes": len(pids), "fds": fds}


# ---------------------------------------------------------------- the listener


class Listener:
    """`conntrail watch --json -e new` on the client namespace (piped through the
    conntrack-logger emulation for that combination); every stdout line is time-stamped
    as it arrives."""

    def __init__(self, combo: Combo, opts: Options, scripts: Path) -> None:
        self.combo, self.opts, self.scripts = combo, opts, scripts
        self.argv = [*opts.conntrail_cmd, "-v", "watch", "--json", "-e", "new",
                     "-n", CLIENT_NS, *combo.args]
        self.lines: list[tuple[int, bytes]] = []
        self.stderr: list[str] = []
        self.ready = threading.Event()
        self.watch: subprocess.Popen[bytes] | None = None
        self.emulator: subprocess.Popen[bytes] | None = None
        self.threads: list[threading.Thread] = []

    @property
    def command(self) -> str:
        """The listener's command line, as run."""
        text = shlex.join(self.argv)
        if self.combo.ctlogger:
            text += f" | nsenter --net={ns_path(CLIENT_NS)} python3 ctlogger.py"
        return text

    def start(self) -> None:
        """Start and wait until watch says it listens."""
        self.watch = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      stdin=subprocess.DEVNULL, env=conntrail_env(self.opts),
                                      start_new_session=True)
        assert self.watch.stdout is not None and self.watch.stderr is not None
        out = self.watch.stdout
        if self.combo.ctlogger:
            self.emulator = subprocess.Popen(
                ["nsenter", f"--net={ns_path(CLIENT_NS)}", sys.executable, "-I", "-S",
                 str(self.scripts / "ctlogger.py")],
                stdin=self.watch.stdout, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                start_new_session=True)
            self.watch.stdout.close()  # the emulator's now
            assert self.emulator.stdout is not None
            out = self.emulator.stdout
        self._thread(self._read_stdout, out)
        self._thread(self._read_stderr, self.watch.stderr)
        deadline = time.monotonic() + self.opts.ready_timeout
        while not self.ready.wait(0.1):
            if self.watch.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"watch did not start (exit {self.watch.poll()}): "
                                   + " | ".join(self.stderr[-3:]))

    def _thread(self, target: Callable[[Any], None], stream: Any) -> None:
        thread = threading.Thread(target=target, args=(stream,), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _read_stdout(self, stream: Any) -> None:
        for line in iter(stream.readline, b""):
            self.lines.append((time.time_ns(), line))

    def _read_stderr(self, stream: Any) -> None:
        for raw in iter(stream.readline, b""):
            text = raw.decode("utf-8", "replace").rstrip()
            self.stderr.append(text)
            if "listening for" in text:
                self.ready.set()

    def cpu_ns(self) -> int:
        """CPU time of watch (and the emulator), all threads, from their process clocks."""
        return sum(e2e.process_cpu(p.pid).total_ns for p in (self.watch, self.emulator)
                   if p is not None and p.poll() is None)

    def stop(self) -> int | None:
        """Stop everything (the emulator first: it may still be scanning a backlog); return
        watch's exit code."""
        code: int | None = None
        if self.emulator is not None and self.emulator.poll() is None:
            self.emulator.kill()
            self.emulator.wait(timeout=10)
        if self.watch is not None:
            code = e2e.stop_process(self.watch, 10.0)
        for thread in self.threads:
            thread.join(timeout=5)
        for proc in (self.watch, self.emulator):
            if proc is not None:
                for stream in (proc.stdout, proc.stderr):
                    if stream is not None:
                        stream.close()
        return code

    def lost_in_kernel(self) -> int | None:
        """From watch's exit summary: events the kernel could not queue for it."""
        for text in reversed(self.stderr):
            found = re.search(r"(\d+) lost in kernel", text)
            if found:
                return int(found.group(1))
        return None


# ---------------------------------------------------------------- workloads


def spawn_argv(cgroup: Path, argv: list[str], opts: Options) -> list[str]:
    """Born in `cgroup`, in the client namespace, as uid:gid (every step execs: same pid)."""
    return ["sh", "-c", MOVE_AND_EXEC, "sh", str(cgroup), "nsenter",
            f"--net={ns_path(CLIENT_NS)}", "setpriv", f"--reuid={opts.uid}",
            f"--regid={opts.gid}", "--clear-groups", *argv]


def parse_identity(line: str) -> tuple[int, int, int, str, str, str]:
    """pid, uid, gid, cgroup, exe, cmdline as a Python client reported them."""
    pid, uid, gid, cgroup, exe, cmdline = line.rstrip("\n").split("\t", 5)
    return int(pid), int(uid), int(gid), cgroup, exe, cmdline


def python_truths(out: str, proto: str, dport: int, popen_pid: int) -> list[Truth]:
    """The flows a Python client reported (identity line, then one line per flow)."""
    lines = out.splitlines()
    pid, uid, gid, cgroup, exe, cmdline = parse_identity(lines[0])
    if pid != popen_pid:
        raise RuntimeError(f"client pid {pid} is not the spawned pid {popen_pid}")
    truths = []
    for line in lines[1:]:
        sport, send_ns = line.split("\t")
        truths.append(Truth(proto, int(sport), dport, int(send_ns), pid, uid, gid, cgroup,
                            cmdline, exe))
    return truths


TRYING = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{6}) \*\s+Trying ", re.MULTILINE)
DAY_NS = 86_400 * 10**9


def curl_send_ns(stderr: str, spawned_mono_ns: int, offset_ns: int) -> int:
    """When curl started connecting, from its `--trace-time` stamp of 'Trying', in UTC ns.

    curl 7.88 prints CLOCK_MONOTONIC plus a whole-second offset taken once from time(NULL):
    the microseconds are the monotonic clock's, exact; the seconds may be off by up to one
    (a constant ~0.2 s here). So the stamp's microseconds are put on the monotonic second
    just after the spawn (`spawned_mono_ns`), and converted with the realtime-monotonic
    offset measured at the spawn; the printed time of day must then agree within a second.
    """
    found = TRYING.search(stderr)
    if found is None:
        raise RuntimeError(f"no 'Trying' line from curl: {stderr[-200:]!r}")
    hh, mm, ss, us = (int(g) for g in found.groups())
    base = spawned_mono_ns - 50_000_000  # slack: the spawn is stamped just before Popen
    mono = base // 10**9 * 10**9 + us * 1000
    if mono < base:
        mono += 10**9
    real = mono + offset_ns
    printed = ((hh * 60 + mm) * 60 + ss) * 10**9 + us * 1000
    drift = (printed - real) % DAY_NS
    if 10**9 <= drift <= DAY_NS - 10**9:
        raise RuntimeError(f"curl's trace time {found.group(0)!r} does not fit its spawn")
    return real


class WorkloadRunner:
    """Runs one workload's clients and collects the ground truth."""

    def __init__(self, workload: Workload, cgroup: Path, cgroups: CgroupTree, server: str,
                 scripts: Path, opts: Options) -> None:
        self.w, self.cgroup, self.cgroups = workload, cgroup, cgroups
        self.server, self.scripts, self.opts = server, scripts, opts
        self.stop = threading.Event()

    def url(self) -> str:
        """The HTTP server's URL."""
        host = f"[{self.server}]" if ":" in self.server else self.server
        return f"http://{host}:{HTTP_PORT}/"

    def python(self, script: str, *args: object) -> list[str]:
        """A system-Python client command line."""
        return [CLIENT_PYTHON, "-I", "-S", str(self.scripts / script), self.server,
                *(str(a) for a in args)]

    def run(self) -> Load:
        """Run the workload (bounded in count and time)."""
        start = time.monotonic()
        try:
            long_lived = self.w.name == "long-lived"
            load = self._long_lived() if long_lived else self._per_process()
        finally:
            self.cgroups.kill(self.cgroup)  # nothing of the workload outlives it
        load.seconds = time.monotonic() - start
        return load

    def _per_process(self) -> Load:
        load = Load(attempted=self.opts.count)
        deadline = time.monotonic() + self.opts.max_seconds
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.opts.parallel)
        try:
            futures = [pool.submit(self._one, i, deadline) for i in range(self.opts.count)]
            for future in futures:
                truths, error = future.result()
                load.truths += truths
                if error:
                    load.errors.append(error)
        finally:
            self.stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
        return load

    def _command(self, i: int) -> tuple[list[str], int]:
        """Flow i's client command line and destination port."""
        if self.w.name == "curl":
            return [CURL, "-s", "-v", "--trace-time", "-o", "/dev/null", "-w", "%{local_port}",
                    "-m", "5", self.url()], HTTP_PORT
        if self.w.name == "tcp-oneshot":
            return self.python("tcp_oneshot.py", SINK_PORT), SINK_PORT
        port = UDP_BASE + i % UDP_PORTS
        return self.python("udp_oneshot.py", port), port

    def _one(self, i: int, deadline: float) -> tuple[list[Truth], str | None]:
        if self.stop.is_set() or time.monotonic() > deadline:
            return [], "not run (time bound)"
        argv, dport = self._command(i)
        offset = time.time_ns() - time.monotonic_ns()
        spawned = time.monotonic_ns()
        with subprocess.Popen(spawn_argv(self.cgroup, argv, self.opts), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, env={**os.environ, "TZ": "UTC"}) as proc:
            try:
                out, err = proc.communicate(timeout=self.opts.client_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                return [], "timeout"
        if proc.returncode != 0:
            return [], f"exit {proc.returncode}: {err.strip()[-160:]}"
        try:
            if self.w.name != "curl":
                return python_truths(out, self.w.proto, dport, proc.pid), None
            truth = Truth("tcp", int(out.strip()), dport, curl_send_ns(err, spawned, offset),
                          proc.pid, self.opts.uid, self.opts.gid,
                          self.cgroups.relative(self.cgroup), " ".join(argv), CURL)
        except (ValueError, IndexError, RuntimeError) as exc:
            return [], f"{type(exc).__name__}: {exc}"
        return [truth], None

    def _long_lived(self) -> Load:
        count, rate = self.opts.long_count, self.opts.long_rate
        limit = min(self.opts.max_seconds, 2 * count / rate + 10)
        argv = self.python("long_lived.py", ACK_PORT, count, rate, f"{limit:.1f}")
        load = Load(attempted=count)
        with subprocess.Popen(spawn_argv(self.cgroup, argv, self.opts), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL) as proc:
            try:
                out, err = proc.communicate(timeout=limit + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                load.errors.append("timeout")
                return load
        if proc.returncode != 0:
            load.errors.append(f"exit {proc.returncode}: {err.strip()[-200:]}")
            return load
        load.truths = python_truths(out, "tcp", ACK_PORT, proc.pid)
        failed = re.search(r"errors (\d+)", err)
        load.errors += ["connection failed"] * (int(failed.group(1)) if failed else 0)
        return load


# ---------------------------------------------------------------- scoring


def iso_ns(text: str | None) -> int | None:
    """UTC epoch ns of an RFC 3339 time ('...Z'), µs precision."""
    if not text:
        return None
    stamp = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    return (stamp - epoch) // datetime.timedelta(microseconds=1) * 1000


def as_int(value: object) -> int | None:
    """An int from a JSON number or string (ECS keeps ids as strings)."""
    if isinstance(value, int | str):
        with contextlib.suppress(ValueError):
            return int(value)
    return None


def parse_event(recv_ns: int, raw: bytes) -> Seen | None:
    """A NEW event line, or None for anything else."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("event", {}).get("action") != "new":
        return None
    src, dst = doc.get("source", {}), doc.get("destination", {})
    process = doc.get("process", {})
    ct = doc.get("conntrail", {})
    attribution = ct.get("attribution")
    confidence = "absent" if attribution is None else attribution.get("confidence", "none")
    attribution = attribution or {}
    return Seen(recv_ns, doc.get("network", {}).get("transport"), as_int(src.get("port")),
                as_int(dst.get("port")),
                iso_ns(doc.get("event", {}).get("start") or doc.get("@timestamp")),
                as_int(process.get("pid")), as_int(doc.get("user", {}).get("id")),
                as_int(doc.get("group", {}).get("id")), attribution.get("cgroup"),
                attribution.get("unit"), process.get("command_line"),
                process.get("executable"), attribution.get("method"), confidence)


def match(truths: list[Truth], seen: list[Seen]) -> list[tuple[Truth, Seen | None]]:
    """Each truth flow with its event: same protocol and ports, kernel start time nearest
    the send time (within MATCH_WINDOW_NS); every event used once."""
    by_key: dict[tuple[str | None, int | None, int | None], list[Seen]] = {}
    for event in seen:
        by_key.setdefault(event.key, []).append(event)
    pairs: list[tuple[Truth, Seen | None]] = []
    for truth in sorted(truths, key=lambda t: t.send_ns):
        candidates = by_key.get(truth.key, [])
        best: Seen | None = None
        for event in candidates:
            when = event.start_ns if event.start_ns is not None else event.recv_ns
            if abs(when - truth.send_ns) <= MATCH_WINDOW_NS and (
                    best is None or abs(when - truth.send_ns)
                    < abs((best.start_ns or best.recv_ns) - truth.send_ns)):
                best = event
        if best is not None:
            candidates.remove(best)
        pairs.append((truth, best))
    return pairs


def checks(truth: Truth, event: Seen) -> dict[str, bool]:
    """Which attributed fields equal the truth."""
    unit = truth.cgroup.rsplit("/", 1)[-1]
    return {
        "uid": event.uid == truth.uid,
        "gid": event.gid == truth.gid,
        "cgroup": event.cgroup == truth.cgroup,
        "unit": event.unit == unit,
        "pid": event.pid == truth.pid,
        "cmdline": event.cmdline == truth.cmdline,
        "cmdline_prefix": bool(event.cmdline) and truth.cmdline.startswith(event.cmdline or ""),
        "exe": event.exe == truth.exe,
    }


def score(result: CaseResult, truths: list[Truth], seen: list[Seen],
          window: tuple[int, int]) -> None:
    """Fill the shares, confidence counts, wrong pids and latencies of one case."""
    correct: Counter[str] = Counter()
    confidence: Counter[str] = Counter()
    methods: Counter[str] = Counter()
    examples: dict[str, list[dict[str, Any]]] = {}
    latencies: list[int] = []
    stamps: list[int] = []
    pairs = match(truths, seen)
    for truth, event in pairs:
        if event is None:
            confidence["missing"] += 1
            note(examples, "missing", truth, None)
            continue
        result.matched += 1
        confidence[event.confidence] += 1
        methods[event.method or "-"] += 1
        latencies.append(event.recv_ns - truth.send_ns)
        if event.start_ns is not None:
            stamps.append(event.start_ns - truth.send_ns)
        ok = checks(truth, event)
        correct.update(name for name, good in ok.items() if good)
        if event.pid is not None and not ok["pid"]:
            if event.confidence == "exact":
                result.wrong_pid_exact += 1
                note(examples, "wrong_pid_exact", truth, event)
            else:
                result.wrong_pid_other += 1
                note(examples, "wrong_pid_other", truth, event)
        for name in ("uid", "gid", "cgroup"):
            if getattr(event, name) is not None and not ok[name]:
                note(examples, f"wrong_{name}", truth, event)
        if event.cmdline is not None and not ok["cmdline_prefix"]:
            if event.confidence == "exact":
                result.wrong_cmdline_exact += 1
            note(examples, "wrong_cmdline", truth, event)
    result.correct = {name: correct[name] for name in FIELDS}
    result.confidence = {name: confidence[name] for name in CONFIDENCES}
    result.methods = dict(methods.most_common())
    result.examples = examples
    result.unmatched_events = sum(1 for e in seen if window[0] <= e.recv_ns <= window[1]) \
        - result.matched
    if latencies:
        latencies.sort()
        result.latency_ms = {
            "p50": round(percentile(latencies, 50) / 1e6, 3),
            "p99": round(percentile(latencies, 99) / 1e6, 3),
            "max": round(latencies[-1] / 1e6, 3)}
    if stamps:  # a check of the truth's clock: the kernel stamps the flow just after the send
        stamps.sort()
        result.kernel_stamp_ms = {
            "min": round(stamps[0] / 1e6, 3), "p50": round(percentile(stamps, 50) / 1e6, 3),
            "p99": round(percentile(stamps, 99) / 1e6, 3)}


def percentile(values: list[int], pct: float) -> float:
    """Nearest-rank percentile of sorted values."""
    rank = max(0, min(len(values) - 1, math.ceil(pct / 100 * len(values)) - 1))
    return float(values[rank])


def note(examples: dict[str, list[dict[str, Any]]], kind: str, truth: Truth,
         event: Seen | None, limit: int = 3) -> None:
    """Keep a few examples of each kind of miss for the JSON (to look into)."""
    found = examples.setdefault(kind, [])
    if len(found) < limit:
        found.append({"truth": asdict(truth), "seen": None if event is None else asdict(event)})


# ---------------------------------------------------------------- one case


def run_case(workload: Workload, idle: bool, combo: Combo, env: BenchEnv,
             opts: Options) -> CaseResult:
    """Start a fresh listener, run the workload, drain, score; the listener is always
    stopped and the workload's processes killed."""
    result = CaseResult(workload.name, idle, combo.name)
    cgroup = env.cgroups.make(f"clients.slice/{workload.unit}")
    listener = Listener(combo, opts, env.scripts)
    result.command = listener.command
    truths: list[Truth] = []
    seen: list[Seen] = []
    t0 = t1 = 0
    try:
        listener.start()
        settle0 = listener.cpu_ns()
        time.sleep(opts.settle)
        cpu0, t0 = listener.cpu_ns(), time.time_ns()
        result.baseline_cpu_ms_per_s = (cpu0 - settle0) / 1e6 / opts.settle
        runner = WorkloadRunner(workload, cgroup, env.cgroups, env.server, env.scripts, opts)
        load = runner.run()
        truths = load.truths
        result.attempted, result.flows, result.load_s = load.attempted, len(truths), load.seconds
        result.flows_per_s = len(truths) / load.seconds if load.seconds else 0.0
        result.client_errors = len(load.errors)
        result.error_samples = sorted(set(load.errors))[:5]
        drain_start = time.monotonic()
        seen, parsed = drain(listener, {t.key for t in truths}, opts)
        result.drain_s = time.monotonic() - drain_start
        cpu1, t1 = listener.cpu_ns(), time.time_ns()
        result.cpu_s = (cpu1 - cpu0) / 1e9
        result.events = sum(1 for e in seen if t0 <= e.recv_ns <= t1)
        result.other_lines = parsed - len(seen)
    finally:
        result.exit_code = listener.stop()
        env.cgroups.kill(cgroup)
        result.lost_in_kernel = listener.lost_in_kernel()
        result.stderr_tail = listener.stderr[-4:]
        if opts.keep:
            keep(opts.keep, result, truths, listener.lines)
    score(result, truths, seen, (t0, t1))
    if not result.flows:
        result.error = "the workload produced no flows: " + "; ".join(result.error_samples)
    return result


def drain(listener: Listener, keys: set[tuple[str, int, int]],
          opts: Options) -> tuple[list[Seen], int]:
    """Parse the listener's lines until every truth flow has an event, or none came for
    `drain_quiet` s, or `drain_max` passed; return the NEW events and the lines parsed."""
    seen: list[Seen] = []
    covered: set[tuple[str | None, int | None, int | None]] = set()
    done, last_change = 0, time.monotonic()
    deadline = last_change + opts.drain_max
    while True:
        now = time.monotonic()
        upto = len(listener.lines)
        for recv_ns, raw in listener.lines[done:upto]:
            event = parse_event(recv_ns, raw)
            if event is not None:
                seen.append(event)
                covered.add(event.key)
        if upto > done:
            done, last_change = upto, now
        if keys <= covered or now - last_change >= opts.drain_quiet or now > deadline:
            return seen, done
        time.sleep(0.1)


def keep(directory: Path, result: CaseResult, truths: list[Truth],
         lines: list[tuple[int, bytes]]) -> None:
    """Write a case's truth and raw listener output (with receive times) for inspection."""
    case = directory / f"{result.workload}-{'idle' if result.idle else 'quiet'}-" \
        f"{result.combo.replace('+', '_')}"
    case.mkdir(parents=True, exist_ok=True)
    with (case / "truth.jsonl").open("w", encoding="utf-8") as out:
        for truth in truths:
            out.write(json.dumps(asdict(truth)) + "\n")
    with (case / "events.tsv").open("wb") as raw_out:
        for recv_ns, line in lines:
            raw_out.write(f"{recv_ns}\t".encode() + line)
    (case / "stderr.txt").write_text("\n".join(result.stderr_tail) + "\n", encoding="utf-8")


def safe_case(workload: Workload, idle: bool, combo: Combo, env: BenchEnv,
              opts: Options) -> CaseResult:
    """run_case, a failure of this one case recorded as its error."""
    try:
        return run_case(workload, idle, combo, env, opts)
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        return CaseResult(workload.name, idle, combo.name, error=f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- report


COLUMNS = ("workload", "idle", "combination", "flows", "recv%", "uid%", "gid%", "cgroup%",
           "pid%", "cmdline%", "wrongpid!", "badcmd!", "exact%", "uid-only%", "inferred%", "none%",
           "µs/ev", "p50 ms", "p99 ms", "lost")


def table_row(r: CaseResult) -> tuple[str, ...]:
    """One formatted row."""
    head = (r.workload, "500" if r.idle else "-", r.combo)
    if r.error:
        return (*head, "ERROR", r.error[:70], *[""] * (len(COLUMNS) - 5))
    c = r.correct
    none = r.confidence.get("none", 0) + r.confidence.get("absent", 0)
    return (*head, f"{r.flows:,}", f"{r.share(r.matched):.1f}", f"{r.share(c['uid']):.1f}",
            f"{r.share(c['gid']):.1f}", f"{r.share(c['cgroup']):.1f}",
            f"{r.share(c['pid']):.1f}", f"{r.share(c['cmdline']):.1f}",
            str(r.wrong_pid_exact), str(r.wrong_cmdline_exact),
            f"{r.share(r.confidence['exact']):.1f}",
            f"{r.share(r.confidence['uid-only']):.1f}",
            f"{r.share(r.confidence['inferred']):.1f}", f"{r.share(none):.1f}",
            f"{r.us_per_event:.1f}", f"{r.latency_ms.get('p50', 0):.2f}",
            f"{r.latency_ms.get('p99', 0):.2f}",
            "?" if r.lost_in_kernel is None else str(r.lost_in_kernel))


def print_table(results: list[CaseResult], idle_label: str) -> None:
    """The results as an aligned text table."""
    rows = [COLUMNS, *(table_row(r) for r in results)]
    rows = [tuple(idle_label if cell == "500" else cell for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) if i < 3 else cell.rjust(widths[i])
                        for i, cell in enumerate(row)), flush=True)


def progress_line(r: CaseResult) -> str:
    """One line per finished case, for following a long run."""
    if r.error:
        return f"  error: {r.error}"
    c = r.correct
    return (f"  {r.flows} flows ({r.flows_per_s:.0f}/s, {r.client_errors} client errors), "
            f"recv {r.share(r.matched):.1f}% uid {r.share(c['uid']):.1f}% "
            f"cgroup {r.share(c['cgroup']):.1f}% pid {r.share(c['pid']):.1f}% "
            f"cmdline {r.share(c['cmdline']):.1f}% wrong-exact pid {r.wrong_pid_exact} "
            f"cmdline {r.wrong_cmdline_exact}, "
            f"{r.us_per_event:.1f} µs/ev, p50/p99 {r.latency_ms.get('p50', 0):.2f}/"
            f"{r.latency_ms.get('p99', 0):.2f} ms, lost {r.lost_in_kernel}")


def metadata(opts: Options, notes: dict[str, Any]) -> dict[str, Any]:
    """Machine, kernel, versions and settings stored with the runs."""
    options = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()}
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "curl": e2e.first_line([CURL, "--version"]),
        "options": options,
        **notes,
    }


# ---------------------------------------------------------------- main


@dataclass
class BenchEnv:
    """What every case shares: scripts, cgroups, the server's address."""

    scripts: Path
    cgroups: CgroupTree
    server: str


def conntrail_env(opts: Options) -> dict[str, str]:
    """Environment for watch: PYTHONPATH starts with the source tree the run uses."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(opts.src), env.get("PYTHONPATH")) if p)
    return env


@contextlib.contextmanager
def source_snapshot(opts: Options) -> Iterator[dict[str, Any]]:
    """Copy src/conntrail to a temporary directory for the whole run (other people commit
    while a 15-minute run goes on: every case must run the same code); removed afterwards."""
    live = REPO / "src"
    head = topology.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                        check=False).strip()
    changed = topology.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
                           check=False).splitlines()
    info: dict[str, Any] = {"git_head": head, "src_changes_vs_head": changed[:50]}
    if opts.live_src:
        opts.src = live
        info["src"] = str(live)
        yield info
        return
    tmp = Path(tempfile.mkdtemp(prefix="cta-src-"))
    try:
        shutil.copytree(live / "conntrail", tmp / "conntrail",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        digest = hashlib.sha256()
        for path in sorted((tmp / "conntrail").rglob("*")):
            if path.is_file():
                digest.update(str(path.relative_to(tmp)).encode() + b"\0" + path.read_bytes())
        info.update(src=f"snapshot of {live}", src_sha256=digest.hexdigest()[:16])
        opts.src = tmp
        yield info
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def watch_supports(opts: Options, flag: str) -> bool:
    """Whether `conntrail watch --help` mentions `flag`."""
    try:
        proc = subprocess.run([*opts.conntrail_cmd, "watch", "--help"], env=conntrail_env(opts),
                              capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0 and flag in proc.stdout


def adapt_combos(opts: Options) -> list[str]:
    """Without `--ebpf` in this watch, drop that argument and the eBPF combination."""
    if watch_supports(opts, "--ebpf"):
        return []
    notes = ["watch has no --ebpf option: eBPF combination skipped"]
    kept = []
    for combo in opts.combos:
        if "--ebpf" in combo.args and combo.args[combo.args.index("--ebpf") + 1] == "on":
            continue
        args = list(combo.args)
        if "--ebpf" in args:
            del args[args.index("--ebpf"):args.index("--ebpf") + 2]
        kept.append(Combo(combo.name, tuple(args), combo.ctlogger))
    opts.combos = kept
    return notes


def parse_combos(names: str, extra: list[str]) -> list[Combo]:
    """Built-in combinations by name, then any `NAME=ARGS` given with --combo."""
    builtin = {c.name: c for c in BUILTIN_COMBOS}
    chosen = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in builtin:
            raise SystemExit(f"unknown combination {name!r}: {', '.join(builtin)}")
        chosen.append(builtin[name])
    for spec in extra:
        name, sep, args = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"--combo wants NAME=ARGS, got {spec!r}")
        chosen.append(Combo(name, tuple(shlex.split(args))))
    return chosen


def parse_args(argv: list[str]) -> Options:
    """The command line."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    venv = REPO / ".venv" / "bin" / "python"
    python = str(venv) if venv.exists() else sys.executable
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--count", type=int, default=1000, help="flows per per-process workload")
    ap.add_argument("--long-count", type=int, default=10_000,
                    help="connections of the long-lived process")
    ap.add_argument("--long-rate", type=float, default=500.0,
                    help="its connections per second")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help="comma list of " + ", ".join(WORKLOADS))
    ap.add_argument("--combos", default=",".join(c.name for c in BUILTIN_COMBOS),
                    help="comma list of built-in layer combinations")
    ap.add_argument("--combo", action="append", default=[], metavar="NAME=ARGS",
                    help="one more combination: a name and its extra watch arguments, e.g. "
                         "--combo 'no-table=--ebpf on --no-socket-lookup' (repeatable)")
    ap.add_argument("--idle", default="off,on", help="without (off) and/or with (on) the idle "
                    "background processes")
    ap.add_argument("--idle-procs", type=int, default=500)
    ap.add_argument("--idle-fds", type=int, default=50, help="fds each idle process holds")
    ap.add_argument("--family", type=int, choices=(4, 6), default=4)
    ap.add_argument("--parallel", type=int, default=2,
                    help="client processes started at a time (per-process workloads)")
    ap.add_argument("--uid", type=int, default=4242)
    ap.add_argument("--gid", type=int, default=4343)
    ap.add_argument("--conntrail-cmd", default=f"{python} -m conntrail",
                    help="how to run conntrail (PYTHONPATH gets this tree's src)")
    ap.add_argument("--max-seconds", type=float, default=120.0,
                    help="bound of one workload's load phase")
    ap.add_argument("--client-timeout", type=float, default=20.0)
    ap.add_argument("--ready-timeout", type=float, default=120.0,
                    help="watch start-up bound (the eBPF object may be compiled at first use)")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds between watch's start and the load (its idle CPU is "
                         "measured meanwhile)")
    ap.add_argument("--drain-quiet", type=float, default=3.0,
                    help="no new event this long after the load = drained")
    ap.add_argument("--drain-max", type=float, default=30.0)
    ap.add_argument("--live-src", action="store_true",
                    help="run watch from src/ as it is at each case (default: a snapshot "
                         "taken at start, so every case runs the same code)")
    ap.add_argument("--keep", type=Path, default=None,
                    help="write each case's truth and raw events to this directory")
    ap.add_argument("--out", type=Path,
                    default=BENCH_DIR / "results" / f"attribution-{stamp}.json")
    a = ap.parse_args(argv)
    idle = {"off": False, "on": True}
    workloads = [w for w in a.workloads.split(",") if w]
    bad = [w for w in workloads if w not in WORKLOADS]
    bad += [i for i in a.idle.split(",") if i not in idle]
    if bad:
        raise SystemExit(f"unknown workload or idle setting: {', '.join(bad)}")
    if a.count < 1 or a.count > UDP_PORTS or a.long_count < 1 or a.long_rate <= 0:
        raise SystemExit(f"--count must be 1..{UDP_PORTS}, --long-count and --long-rate > 0")
    return Options(
        count=a.count, long_count=a.long_count, long_rate=a.long_rate, workloads=workloads,
        combos=parse_combos(a.combos, a.combo), idle=[idle[i] for i in a.idle.split(",")],
        idle_procs=a.idle_procs, idle_fds=a.idle_fds, family=a.family,
        parallel=max(1, a.parallel), uid=a.uid, gid=a.gid,
        conntrail_cmd=shlex.split(a.conntrail_cmd), max_seconds=a.max_seconds,
        client_timeout=a.client_timeout, ready_timeout=a.ready_timeout, settle=a.settle,
        drain_quiet=a.drain_quiet, drain_max=a.drain_max, keep=a.keep, out=a.out,
        live_src=a.live_src)


def validate(opts: Options) -> None:
    """Root, and the programs the clients need."""
    if os.geteuid() != 0:
        raise SystemExit("run as root: the bench creates namespaces and cgroups")
    needed = [CLIENT_PYTHON, *([CURL] if "curl" in opts.workloads else [])]
    missing = [p for p in needed if not os.access(p, os.X_OK)]
    missing += [p for p in ("nsenter", "setpriv", "ip", "nft") if shutil.which(p) is None]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)}")


def write_scripts(directory: Path) -> None:
    """The bench's programs, readable by the clients' uid."""
    directory.chmod(0o755)
    for name, text in SCRIPTS.items():
        (directory / name).write_text(text.lstrip(), encoding="utf-8")
        (directory / name).chmod(0o644)


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM cleans up like Ctrl-C."""
    raise KeyboardInterrupt(f"signal {signum}")


def run_all(opts: Options, meta: dict[str, Any], results: list[CaseResult]) -> None:
    """Every case: per idle setting, per workload, per combination (innermost, so drifts of
    the machine hit every combination alike)."""
    with tempfile.TemporaryDirectory(prefix="cta-") as tmp, \
            CgroupTree(cgroup2_mount()) as cgroups, \
            namespaces(opts.family) as (client, server):
        scripts = Path(tmp)
        write_scripts(scripts)
        env = BenchEnv(scripts, cgroups, server)
        bound = opts.max_seconds * 20 + 3600  # longer than any run; killed well before
        bind_host = "::" if opts.family == 6 else "0.0.0.0"  # inside the server's netns
        server_argv = ["nsenter", f"--net={ns_path(SERVER_NS)}", sys.executable, "-I", "-S",
                       str(scripts / "server.py"), bind_host, str(bound)]
        with background(server_argv, "ready", 20):
            for idle in opts.idle:
                idle_cg = cgroups.make("idle.slice")
                idle_argv = ["sh", "-c", MOVE_AND_EXEC, "sh", str(idle_cg), "nsenter",
                             f"--net={ns_path(CLIENT_NS)}", CLIENT_PYTHON, "-I", "-S",
                             str(scripts / "idle.py"), str(opts.idle_procs), str(opts.idle_fds),
                             client, str(int(bound))]
                with contextlib.ExitStack() as stack:
                    if idle:
                        stack.enter_context(background(idle_argv, "ready", 120, cgroups,
                                                       idle_cg))
                        meta.setdefault("idle_census", idle_census(idle_cg))
                        print(f"# idle: {meta['idle_census']}", file=sys.stderr, flush=True)
                    for name in opts.workloads:
                        for combo in opts.combos:
                            print(f"# {name} idle={'on' if idle else 'off'} {combo.name}",
                                  file=sys.stderr, flush=True)
                            results.append(safe_case(WORKLOADS[name], idle, combo, env, opts))
                            print(progress_line(results[-1]), file=sys.stderr, flush=True)
                            if shutil.which("conntrack"):  # a fresh table for the next case
                                topology.in_ns(CLIENT_NS, ["conntrack", "-F"], check=False)


def main(argv: list[str]) -> int:
    """Run every case, print the table, write the JSON."""
    opts = parse_args(argv)
    validate(opts)
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    results: list[CaseResult] = []
    meta: dict[str, Any] = {}
    try:
        with source_snapshot(opts) as source:
            notes = adapt_combos(opts)
            meta = metadata(opts, {"notes": notes, "source": source,
                                   "combinations": {c.name: list(c.args) for c in opts.combos}})
            run_all(opts, meta, results)
    finally:
        delete_namespaces()
        if results:
            opts.out.parent.mkdir(parents=True, exist_ok=True)
            doc = {"meta": meta, "runs": [r.to_json() for r in results]}
            opts.out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
            print(f"\nresults: {opts.out}")
            print_table(results, str(opts.idle_procs))
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt as interrupt:
        print(f"interrupted ({str(interrupt) or 'SIGINT'}); cleaned up", file=sys.stderr)
        sys.exit(130)

"""End-to-end conntrack event logger benchmark: conntrail vs `conntrack -E` vs ulogd2.

For each rate and each tool, a fresh three-namespace topology (see topology.py) is built,
the listener is started inside the router namespace, bench/loadgen.c sends UDP datagrams with
fresh 5-tuples from the client namespace through the router, and afterwards:

  flows   the router's nft counter on `ct state new` (the truth),
  events  NEW (and DESTROY) events the tool wrote to its output file,
  drops   the kernel's drop counter of the tool's own netlink sockets (/proc/net/netlink),
  cpu     the tool's CPU time (user+sys, all threads) from load start to drained, per event.

Run as root:  python3 bench/e2e.py [--rates 10000,50000,100000,max] [--count N]
              [--tools conntrail,conntrack,ulogd] [--destroy-rate 25000] [--priority normal,rt]
The tool `daemon` (`conntrail run`: attribution, JSON file + SQLite history) runs when asked.
Traffic stays inside namespaces named ctb-*; everything is torn down on exit or failure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

import topology
from topology import CLIENT, CLIENT_ADDR, ROUTER, SERVER_ADDR, Topology

BENCH_DIR = Path(__file__).resolve().parent
SRC_DIR = BENCH_DIR.parent / "src"
ULOGD_PLUGIN_DIRS = ("/usr/lib/x86_64-linux-gnu/ulogd", "/usr/lib/*/ulogd", "/usr/lib/ulogd",
                     "/usr/lib64/ulogd")
TOOLS = ("conntrail", "conntrack", "ulogd", "inventory", "daemon")
DEFAULT_TOOLS = ("conntrail", "conntrack", "ulogd")  # `inventory`, `daemon` run when asked for
CONNTRAIL_TOOLS = ("conntrail", "inventory", "daemon")
# `ip netns exec` gives the tool a fresh /sys without the host's cgroup mounts; the daemon's
# eBPF attribution needs a cgroup2 hierarchy, as on a host, so mount one in that private mount
# namespace (it never propagates to the host's). `exec` keeps the pid the daemon's own.
CGROUP2_SHIM = ('mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup '
                '|| echo "bench: no cgroup2 mount: eBPF attribution off" >&2; exec "$@"')
PRIORITIES: dict[str, list[str]] = {
    "normal": [],
    "nice": ["nice", "-n", "-10"],
    "rt": ["chrt", "-f", "10"],
}
NETLINK_NETFILTER = 12
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Options:
    """Command-line settings of one harness invocation."""

    rates: list[int]
    count: int
    tools: list[str]
    destroy_rate: int
    destroy_count: int
    destroy_timeout: int
    repeat: int
    priorities: list[str]
    bufsize: int
    ulogd_bufmax: int
    conntrail_cmd: list[str]
    conntrail_args: list[str]
    max_seconds: float
    ready_timeout: float
    drain_quiet: float
    drain_max: float
    loadgen_cpu: int | None
    listener_cpu: int | None
    settle: float
    keep: Path | None
    out: Path


@dataclass
class Case:
    """One measurement: a tool, a priority, a test kind and a target rate (0 = max)."""

    tool: str
    priority: str
    test: str  # "new" or "new+destroy"
    rate: int
    count: int
    repeat: int = 1


@dataclass
class LoadResult:
    """What the load generator reported."""

    attempted: int = 0
    sent: int = 0
    errors: int = 0
    seconds: float = 0.0
    rate: float = 0.0


@dataclass
class EventCounts:
    """Events found in a tool's output file."""

    new: int = 0
    destroy: int = 0
    other: int = 0
    unparsed: int = 0

    @property
    def total(self) -> int:
        """Every event line the tool delivered (NEW + DESTROY + any other kind)."""
        return self.new + self.destroy + self.other


@dataclass
class SockStats:
    """Kernel-side counters of a process's netfilter netlink sockets."""

    sockets: int = 0
    subscribed: int = 0
    drops: int = 0
    rmem: int = 0


@dataclass
class CpuSample:
    """CPU time of a process: precise total (ns) and the tick-based user/sys split."""

    total_ns: int = 0
    user_ticks: int = 0
    sys_ticks: int = 0


@dataclass
class RunResult:
    """Everything measured for one Case."""

    case: Case
    load: LoadResult = field(default_factory=LoadResult)
    flows: int = 0
    events: EventCounts = field(default_factory=EventCounts)
    socket: SockStats = field(default_factory=SockStats)
    cpu_s: float = 0.0
    cpu_user_s: float = 0.0
    cpu_sys_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    sched: str = ""
    drain_s: float = 0.0
    expire_wait_s: float = 0.0
    ct_peak: int = 0
    expiry_peak_rate: float = 0.0
    ct_trace: list[tuple[float, int]] = field(default_factory=list)
    ct_stats: dict[str, int] = field(default_factory=dict)
    exit_code: int | None = None
    stderr_tail: list[str] = field(default_factory=list)
    error: str | None = None
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def received_pct(self) -> float:
        """NEW events received as a percentage of flows created."""
        return 100.0 * self.events.new / self.flows if self.flows else 0.0

    @property
    def destroy_pct(self) -> float:
        """DESTROY events received as a percentage of flows created (all of them expire)."""
        return 100.0 * self.events.destroy / self.flows if self.flows else 0.0

    @property
    def us_per_event(self) -> float:
        """Listener CPU microseconds per event received."""
        return 1e6 * self.cpu_s / self.events.total if self.events.total else 0.0

    def to_json(self) -> dict[str, object]:
        """A flat-ish JSON document with the derived figures included."""
        doc = asdict(self)
        doc["events"]["total"] = self.events.total
        doc["received_pct"] = round(self.received_pct, 3)
        doc["destroy_pct"] = round(self.destroy_pct, 3)
        doc["us_per_event"] = round(self.us_per_event, 3)
        return doc


# ---------------------------------------------------------------- listeners


def ulogd_plugins() -> Path:
    """The directory holding ulogd's plugins (Debian: /usr/lib/<multiarch>/ulogd)."""
    for pattern in ULOGD_PLUGIN_DIRS:
        for candidate in sorted(Path("/").glob(pattern.lstrip("/"))):
            if (candidate / "ulogd_output_JSON.so").exists():
                return candidate
    raise RuntimeError("ulogd plugins (ulogd_output_JSON.so) not found: install ulogd2-json")


def ulogd_config(workdir: Path, destroy: bool, opts: Options) -> Path:
    """Write a minimal ulogd.conf (NFCT -> IP2STR -> JSON, no hash) and return its path."""
    conf = workdir / "ulogd.conf"
    plugins = ulogd_plugins()
    mask = "0x00000005" if destroy else "0x00000001"
    conf.write_text(f"""[global]
logfile="{workdir / 'ulogd.log'}"
loglevel=3
plugin="{plugins / 'ulogd_inpflow_NFCT.so'}"
plugin="{plugins / 'ulogd_filter_IP2STR.so'}"
plugin="{plugins / 'ulogd_output_JSON.so'}"
stack=ct1:NFCT,ip2str1:IP2STR,json1:JSON

[ct1]
event_mask={mask}
hash_enable=0
netlink_socket_buffer_size={opts.bufsize}
netlink_socket_buffer_maxsize={opts.ulogd_bufmax}

[json1]
file="{workdir / 'ulogd.json'}"
sync=0
""", encoding="ascii")
    return conf


def daemon_config(workdir: Path, destroy: bool, history: bool = True) -> Path:
    """Write a `conntrail run` config (attribution, JSON file + SQLite) and return its path.

    The daemon runs inside the router namespace, so `netns = [""]` is that namespace.
    `history=False` leaves the SQLite sink out (a control for daemon_soak.py).
    """
    conf = workdir / "conntrail.toml"
    events = '["new", "destroy"]' if destroy else '["new"]'
    conf.write_text(f"""[daemon]
state_dir = "{workdir / 'state'}"
log_dir = "{workdir / 'log'}"

[metrics]
listen = "127.0.0.1:0"

[pipelines.bench]
netns = [""]
events = {events}

[pipelines.bench.attribution]
enabled = true
ebpf = "auto"

[pipelines.bench.sinks.flows]
type = "file"
format = "json"
path = "{workdir / 'daemon.jsonl'}"
fsync = "1s"
""" + ('\n[pipelines.bench.sinks.history]\ntype = "sqlite"\n' if history else ""),
                    encoding="utf-8")
    return conf


def daemon_command(workdir: Path, destroy: bool, opts: Options,
                   history: bool = True) -> tuple[list[str], Path]:
    """`conntrail -v run` behind the cgroup2 shim (-v: start-up facts such as the eBPF tier
    go to stderr, kept in the results), and its JSON lines file."""
    conf = daemon_config(workdir, destroy, history)
    argv = ["sh", "-c", CGROUP2_SHIM, "sh", *opts.conntrail_cmd, "-v", "run", "-c", str(conf)]
    return argv, workdir / "daemon.jsonl"


def tool_command(case: Case, workdir: Path, opts: Options) -> tuple[list[str], Path]:
    """The listener's argv (run inside the router namespace) and the file its events go to."""
    destroy = case.test != "new"
    if case.tool == "daemon":
        return daemon_command(workdir, destroy, opts)
    if case.tool == "conntrack":
        mask = "NEW,DESTROY" if destroy else "NEW"
        argv = ["conntrack", "-E", "-e", mask, "-o", "timestamp", "-b", str(opts.bufsize)]
        return argv, workdir / "events.out"
    if case.tool == "ulogd":
        return ["ulogd", "-c", str(ulogd_config(workdir, destroy, opts))], workdir / "ulogd.json"
    if case.tool == "inventory":
        # `conntrail inventory`: every event aggregated, one JSON dump at exit (what is
        # counted); the drain waits until its CPU clock stops moving.
        out = workdir / "inventory.json"
        return [*opts.conntrail_cmd, "inventory", "--no-state", "--format", "json", "-o",
                str(out), *opts.conntrail_args], out
    kinds = "new,destroy" if destroy else "new"
    argv = [*opts.conntrail_cmd, "watch", "--json", "--no-dump", "--events", kinds,
            *opts.conntrail_args]
    return argv, workdir / "events.out"


def listener_env() -> dict[str, str]:
    """Environment for the listeners: PYTHONPATH points at this tree's src for conntrail."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC_DIR), env.get("PYTHONPATH")) if p)
    return env


def wrap(argv: list[str], priority: str, cpu: int | None) -> list[str]:
    """Prefix argv with the router namespace, the priority and the CPU pinning.

    `ip netns exec`, `chrt`, `nice` and `taskset` all exec, so the child's pid stays the
    tool's own pid: its CPU clock and its sockets are the tool's.
    """
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    return ["ip", "netns", "exec", ROUTER, *pin, *PRIORITIES[priority], *argv]


# ---------------------------------------------------------------- /proc readers


def process_cpu(pid: int) -> CpuSample:
    """CPU time of process `pid`: its process CPU clock (ns) and /proc/PID/stat ticks."""
    clock = ((~pid) << 3) | 2  # CPUCLOCK_SCHED of the whole process (clock_getcpuclockid)
    total = time.clock_gettime_ns(clock)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return CpuSample(total, int(fields[11]), int(fields[12]))


def socket_inodes(pid: int) -> set[str]:
    """Inode numbers of the sockets process `pid` holds."""
    inodes: set[str] = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def netlink_stats(pid: int) -> SockStats:
    """Drops and queued bytes of `pid`'s NETLINK_NETFILTER sockets (its netns's table)."""
    mine = socket_inodes(pid)
    stats = SockStats()
    lines = Path(f"/proc/{pid}/net/netlink").read_text().splitlines()[1:]
    for line in lines:
        cols = line.split()
        if len(cols) < 10 or int(cols[1]) != NETLINK_NETFILTER or cols[9] not in mine:
            continue
        stats.sockets += 1
        stats.subscribed += int(cols[3], 16) != 0
        stats.rmem += int(cols[4])
        stats.drops += int(cols[8])
    return stats


SCHED_POLICIES = {0: "other", 1: "fifo", 2: "rr", 3: "batch", 5: "idle", 6: "deadline"}


def sched_info(pid: int) -> str:
    """The scheduling class, RT priority and nice value process `pid` runs with now.

    Recorded because a tool may change its own (ulogd switches itself to SCHED_RR).
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    nice, rt_prio, policy = int(fields[16]), int(fields[37]), int(fields[38])
    name = SCHED_POLICIES.get(policy, str(policy))
    return f"{name}/{rt_prio} nice {nice}" if rt_prio else f"{name} nice {nice}"


def ct_stats(pid: int) -> dict[str, int]:
    """Conntrack statistics of `pid`'s namespace (/proc/PID/net/stat/nf_conntrack).

    `entries` is the namespace's table size (the same on every per-CPU row); the other
    counters are summed over CPUs.
    """
    rows = Path(f"/proc/{pid}/net/stat/nf_conntrack").read_text().split("\n")
    names = rows[0].split()
    per_cpu = [[int(v, 16) for v in row.split()] for row in rows[1:] if row.strip()]
    totals = {name: sum(vals[i] for vals in per_cpu) for i, name in enumerate(names)}
    totals["entries"] = per_cpu[0][0] if per_cpu else 0
    return totals


class TableSampler(threading.Thread):
    """Samples the router's conntrack table size every `interval` s while a case runs."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self.started = time.monotonic()
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Sample until stopped or the process (and so its namespace view) is gone."""
        while not self._stop_event.wait(self.interval):
            try:
                self.samples.append((time.monotonic(), ct_stats(self.pid)["entries"]))
            except (OSError, ValueError, IndexError):
                return

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop_event.set()
        self.join(timeout=5)

    def peak_expiry_rate(self, window: float = 0.1) -> float:
        """The fastest fall of the table size over any span of at least `window` s, per s.

        In the NEW+DESTROY test that is the peak rate of DESTROY events the kernel emits.
        """
        best, j = 0.0, 0
        for t0, n0 in self.samples:
            while j < len(self.samples) and self.samples[j][0] - t0 < window:
                j += 1
            if j == len(self.samples):
                break
            t1, n1 = self.samples[j]
            best = max(best, (n0 - n1) / (t1 - t0))
        return best

    def trace(self, start: float, step: float = 0.1) -> list[tuple[float, int]]:
        """(seconds since `start`, table size), thinned to one sample per `step` s."""
        out: list[tuple[float, int]] = []
        for t, n in self.samples:
            if not out or t - start - out[-1][0] >= step:
                out.append((round(t - start, 3), n))
        return out


def children_cpu() -> float:
    """User+sys seconds of all reaped children (the load generator's share is a delta)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# ---------------------------------------------------------------- output counting


def count_events(tool: str, path: Path) -> EventCounts:
    """Count NEW / DESTROY / other events in a tool's output file."""
    counts = EventCounts()
    if not path.exists():
        return counts
    if tool == "inventory":
        return inventory_counts(path)
    with path.open("rb") as fh:
        for raw in fh:
            kind = classify_line(tool, raw)
            setattr(counts, kind, getattr(counts, kind) + 1)
    return counts


def inventory_counts(path: Path) -> EventCounts:
    """An inventory dump's flows (NEW or dumped) and its other events: the load's flows are
    unanswered UDP, so every other event is a DESTROY."""
    try:
        doc = json.loads(path.read_bytes())
    except ValueError:
        return EventCounts(unparsed=1)
    flows = sum(entry["flows"] for entry in doc["entries"])
    return EventCounts(new=flows, destroy=doc["inventory"]["events"] - flows)


def output_progress(proc: subprocess.Popen[bytes], out: Path) -> int:
    """How far a tool got: its output's size, or for the inventory (which writes only at
    exit) its CPU time in 50 ms steps (idle, it uses well under 1 ms a second)."""
    if out.name == "inventory.json":
        return process_cpu(proc.pid).total_ns // 50_000_000
    return out.stat().st_size if out.exists() else 0


def classify_line(tool: str, raw: bytes) -> str:
    """'new', 'destroy', 'other' or 'unparsed' for one output line of `tool` (the daemon
    writes the same ECS JSON as conntrail watch)."""
    if tool == "conntrack":
        if b"[NEW]" in raw:
            return "new"
        return "destroy" if b"[DESTROY]" in raw else "other"
    try:
        doc = json.loads(raw)
    except ValueError:
        return "unparsed"
    if not isinstance(doc, dict):
        return "unparsed"
    if tool == "ulogd":
        return {1: "new", 4: "destroy"}.get(doc.get("ct.event", 0), "other")
    event = doc.get("event")
    action = event.get("action") if isinstance(event, dict) else doc.get("event.action")
    return action if action in ("new", "destroy") else "other"


def stderr_tail(path: Path, lines: int = 6) -> list[str]:
    """The last distinct lines of a log (repeats folded, with their count), for the report."""
    if not path.exists():
        return []
    counts: dict[str, int] = {}
    for raw in path.read_text(errors="replace").splitlines():
        text = raw.strip()
        if text:
            counts[text] = counts.pop(text, 0) + 1  # re-insert: order of last appearance
    return [f"{text} (x{n})" if n > 1 else text for text, n in counts.items()][-lines:]


# ---------------------------------------------------------------- processes


@contextmanager
def listener(argv: list[str], out: Path, err: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start the listener in its own session; always stop and reap it on exit."""
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                env=listener_env(), start_new_session=True)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            stop_process(proc, 10.0)


def stop_process(proc: subprocess.Popen[bytes], grace: float) -> int:
    """SIGINT the process, wait up to `grace` seconds, then SIGKILL; return its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return int(proc.returncode)


def wait_ready(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait until the listener holds a subscribed netfilter netlink socket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"listener exited early with code {proc.returncode}")
        try:
            if netlink_stats(proc.pid).subscribed:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"listener not subscribed after {timeout:.0f} s")


def metrics_port(pid: int) -> int | None:
    """The TCP port process `pid` listens on (the daemon's /metrics), None if none yet."""
    mine = socket_inodes(pid)
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and cols[9] in mine:  # 0A: TCP_LISTEN
                return int(cols[1].rsplit(":", 1)[1], 16)
    return None


def wait_daemon_ready(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Subscribed, then serving /metrics (the daemon starts its exporters last); the port."""
    deadline = time.monotonic() + timeout
    wait_ready(proc, timeout)
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            port = metrics_port(proc.pid)
        except OSError:
            port = None
        if port:
            return port
        time.sleep(0.1)
    raise RuntimeError(f"daemon not serving /metrics after {timeout:.0f} s")


def compile_loadgen(workdir: Path) -> Path:
    """Build bench/loadgen.c with gcc -O2 into `workdir`."""
    binary = workdir / "loadgen"
    topology.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(BENCH_DIR / "loadgen.c")])
    return binary


def run_loadgen(binary: Path, rate: int, count: int, opts: Options) -> LoadResult:
    """Send `count` fresh flows at `rate`/s (0: as fast as possible) from the client ns."""
    expected = count / rate if rate else count / 50_000
    limit = min(opts.max_seconds, 2 * expected + 5)
    pin = [] if opts.loadgen_cpu is None else ["taskset", "-c", str(opts.loadgen_cpu)]
    argv = ["ip", "netns", "exec", CLIENT, *pin, str(binary), "-d", SERVER_ADDR,
            "-s", CLIENT_ADDR, "-r", str(rate), "-n", str(count), "-t", f"{limit:.1f}"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit + 30,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {proc.stderr.strip()}")
    kv = dict(item.split("=", 1) for item in proc.stdout.split())
    return LoadResult(int(kv["attempted"]), int(kv["sent"]), int(kv["errors"]),
                      float(kv["seconds"]), float(kv["rate"]))


def wait_drained(proc: subprocess.Popen[bytes], out: Path, opts: Options) -> float:
    """Wait until the output stopped growing for `drain_quiet` s (bounded); return seconds."""
    start = time.monotonic()
    last_size, last_change = -1, start
    while time.monotonic() - start < opts.drain_max and proc.poll() is None:
        size = output_progress(proc, out)
        now = time.monotonic()
        if size != last_size:
            last_size, last_change = size, now
        elif now - last_change >= opts.drain_quiet:
            break
        time.sleep(0.2)
    return time.monotonic() - start


def wait_expired(pid: int, limit: float) -> float:
    """Wait (bounded) until `pid`'s namespace has an empty conntrack table; return seconds."""
    start = time.monotonic()
    while time.monotonic() - start < limit and ct_stats(pid)["entries"] > 0:
        time.sleep(0.1)
    return time.monotonic() - start


# ---------------------------------------------------------------- one measurement


def measure(case: Case, binary: Path, opts: Options) -> RunResult:
    """Build a fresh topology, run the listener and the load, and collect the figures."""
    result = RunResult(case)
    destroy = case.test != "new"
    with tempfile.TemporaryDirectory(prefix="ctb-run-") as tmp, \
            Topology(udp_timeout=opts.destroy_timeout if destroy else None) as topo:
        result.notes.update(topo.notes)
        workdir = Path(tmp)
        argv, out = tool_command(case, workdir, opts)
        stdout_path = workdir / "stdout" if case.tool in ("ulogd", "inventory", "daemon") \
            else out
        err = workdir / "stderr"
        result.notes["command"] = shlex.join(argv)
        with listener(wrap(argv, case.priority, opts.listener_cpu), stdout_path, err) as proc:
            try:
                if case.tool == "daemon":
                    wait_daemon_ready(proc, opts.ready_timeout)
                else:
                    wait_ready(proc, opts.ready_timeout)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}: {' | '.join(stderr_tail(err, 2))}") from exc
            time.sleep(opts.settle)  # let the tool finish starting before CPU is sampled
            result.sched = sched_info(proc.pid)
            sampler = TableSampler(proc.pid)
            sampler.start()
            try:
                cpu0 = load_and_drain(proc, binary, out, result, opts)
            finally:
                sampler.stop()
            cpu1 = process_cpu(proc.pid)
            result.socket = netlink_stats(proc.pid)
            result.ct_stats = ct_stats(proc.pid)
            result.exit_code = stop_process(proc, 10.0)
        result.ct_peak = max((n for _, n in sampler.samples), default=0)
        if destroy:
            result.expiry_peak_rate = sampler.peak_expiry_rate()
            result.ct_trace = sampler.trace(sampler.started)
        result.flows = topology.flows_created()
        result.events = count_events(case.tool, out)
        log = workdir / "ulogd.log" if case.tool == "ulogd" else err
        result.stderr_tail = stderr_tail(log)
        if opts.keep:
            keep_outputs(workdir, opts.keep / case_name(case))
    fill_cpu(result, cpu0, cpu1)
    if result.flows and not result.events.total:
        result.error = "no events written: is the tool configured right? (see stderr_tail)"
    return result


def load_and_drain(proc: subprocess.Popen[bytes], binary: Path, out: Path, result: RunResult,
                   opts: Options) -> CpuSample:
    """Run the load against a ready listener, wait for expiry and drain; return start CPU."""
    cpu0, children0 = process_cpu(proc.pid), children_cpu()
    case = result.case
    result.load = run_loadgen(binary, case.rate, case.count, opts)
    result.loadgen_cpu_s = children_cpu() - children0
    if case.test != "new":
        result.expire_wait_s = wait_expired(proc.pid, opts.destroy_timeout + 90.0)
    result.drain_s = wait_drained(proc, out, opts)
    return cpu0


def fill_cpu(result: RunResult, cpu0: CpuSample, cpu1: CpuSample) -> None:
    """Store the listener's CPU time from load start to drained (total and user/sys split)."""
    result.cpu_s = (cpu1.total_ns - cpu0.total_ns) / 1e9
    result.cpu_user_s = (cpu1.user_ticks - cpu0.user_ticks) / CLK_TCK
    result.cpu_sys_s = (cpu1.sys_ticks - cpu0.sys_ticks) / CLK_TCK


def case_name(case: Case) -> str:
    """A file-system friendly name of a case, e.g. 'conntrack-normal-new-50000'."""
    test = case.test.replace("+", "-")
    rate = rate_label(case.rate).replace(",", "")
    return f"{case.tool}-{case.priority}-{test}-{rate}-r{case.repeat}"


def keep_outputs(workdir: Path, dest: Path) -> None:
    """Copy a run's output and log files (not the listener's config) to `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in workdir.iterdir():
        if item.is_file():
            shutil.copyfile(item, dest / item.name)


def safe_measure(case: Case, binary: Path, opts: Options) -> RunResult:
    """measure(), turning a failure of this one case into a recorded error."""
    try:
        return measure(case, binary, opts)
    except (RuntimeError, OSError, subprocess.SubprocessError, KeyError, ValueError) as exc:
        return RunResult(case, error=f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- report


COLUMNS = ("tool", "prio", "test", "#", "target/s", "achieved/s", "sent", "flows", "events",
           "other", "recv%", "destroy%", "expiry peak/s", "drops", "µs CPU/ev", "cpu s",
           "loadgen s", "sched")


def table_row(r: RunResult) -> tuple[str, ...]:
    """One formatted table row."""
    c = r.case
    if r.error:
        return (c.tool, c.priority, c.test, str(c.repeat), rate_label(c.rate), "ERROR",
                r.error[:60],
                "", "", "", "", "", "", "", "", "", "", "")
    destroy, burst = "-", "-"
    if c.test != "new":
        destroy, burst = f"{r.destroy_pct:.1f}", f"{r.expiry_peak_rate:,.0f}"
    return (c.tool, c.priority, c.test, str(c.repeat), rate_label(c.rate), f"{r.load.rate:,.0f}",
            f"{r.load.sent:,}", f"{r.flows:,}", f"{r.events.total:,}",
            f"{r.events.other + r.events.unparsed:,}",
            f"{r.received_pct:.1f}", destroy, burst, f"{r.socket.drops:,}",
            f"{r.us_per_event:.2f}", f"{r.cpu_s:.2f}", f"{r.loadgen_cpu_s:.2f}", r.sched)


def print_table(results: list[RunResult]) -> None:
    """Print the results as an aligned text table."""
    rows = [COLUMNS, *(table_row(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    for row in rows:
        print("  ".join(cell.rjust(widths[i]) for i, cell in enumerate(row)), flush=True)


def progress_line(r: RunResult) -> str:
    """A one-line summary of a finished case, for following a long run."""
    if r.error:
        return f"  error: {r.error}"
    return (f"  sent {r.load.sent:,} at {r.load.rate:,.0f}/s, flows {r.flows:,}, "
            f"events {r.events.total:,} (new {r.received_pct:.1f}%), drops {r.socket.drops:,}, "
            f"{r.us_per_event:.2f} µs/event")


def rate_label(rate: int) -> str:
    """'max' for 0, else the rate."""
    return "max" if rate == 0 else f"{rate:,}"


def first_line(argv: list[str]) -> str:
    """The first line a command prints (stdout or stderr), e.g. a version banner."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable: {exc}"
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return lines[0] if lines else ""


def metadata(opts: Options) -> dict[str, object]:
    """Machine, kernel, tool versions and settings, stored next to the runs."""
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "conntrack_version": first_line(["conntrack", "--version"]),
        "ulogd_version": first_line(["ulogd", "--version"]),
        "python": sys.version.split()[0],
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "host_sysctls": {k: topology.global_sysctl(k) for k in (
            "net.netfilter.nf_conntrack_max", "net.netfilter.nf_conntrack_buckets",
            "net.core.rmem_max", "net.core.netdev_max_backlog")},
    }


def write_json(path: Path, meta: dict[str, object], results: list[RunResult]) -> None:
    """Write metadata and runs as one JSON document."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "runs": [r.to_json() for r in results]}
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- main


def parse_size(text: str) -> int:
    """'8M', '512K' or a plain number of bytes."""
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return int(text[:-1] if mult > 1 else text) * mult


def parse_args(argv: list[str]) -> Options:
    """Parse the command line into Options."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rates", default="10000,50000,100000,max",
                    help="comma-separated flows/s; 'max' = as fast as the kernel allows")
    ap.add_argument("--count", type=int, default=200_000, help="flows per NEW-only run")
    ap.add_argument("--tools", default=",".join(DEFAULT_TOOLS),
                    help="subset of " + ",".join(TOOLS))
    ap.add_argument("--destroy-rate", type=int, default=25_000,
                    help="rate of the NEW+DESTROY test (0 skips it)")
    ap.add_argument("--destroy-count", type=int, default=0,
                    help="flows in the NEW+DESTROY test (default: --count)")
    ap.add_argument("--destroy-timeout", type=int, default=2,
                    help="router nf_conntrack_udp_timeout (s) in the NEW+DESTROY test")
    ap.add_argument("--repeat", type=int, default=1, help="run every case this many times")
    ap.add_argument("--priority", default="normal",
                    help="comma-separated listener priorities: normal, nice (nice -n -10), "
                         "rt (chrt -f 10); each is run for every tool")
    ap.add_argument("--bufsize", default="8M",
                    help="netlink receive buffer for conntrack -b and ulogd (conntrail: its "
                         "own default, 8M growing to 128M)")
    ap.add_argument("--ulogd-bufmax", default="",
                    help="ulogd netlink_socket_buffer_maxsize (default bufsize+1: no growth)")
    ap.add_argument("--conntrail-cmd", default=f"{sys.executable} -m conntrail",
                    help="how to run conntrail (PYTHONPATH gets this tree's src)")
    ap.add_argument("--conntrail-args", default="--no-rules",
                    help="extra arguments for `conntrail watch`")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="hard cap of one load")
    ap.add_argument("--ready-timeout", type=float, default=20.0)
    ap.add_argument("--drain-quiet", type=float, default=2.0,
                    help="output unchanged this long = drained")
    ap.add_argument("--drain-max", type=float, default=60.0)
    ap.add_argument("--loadgen-cpu", type=int, default=None,
                    help="pin the load generator (and so the kernel's forwarding and event "
                         "work, done in its context) to this CPU")
    ap.add_argument("--listener-cpu", type=int, default=None,
                    help="pin the listener to this CPU (same as --loadgen-cpu: they compete)")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds between the listener's subscription and the load")
    ap.add_argument("--keep", type=Path, default=None,
                    help="copy every run's output files into this directory")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "results" / f"e2e-{stamp}.json")
    a = ap.parse_args(argv)
    bufsize = parse_size(a.bufsize)
    return Options(
        rates=[0 if r.strip() == "max" else int(r) for r in a.rates.split(",") if r.strip()],
        count=a.count, tools=[t for t in a.tools.split(",") if t],
        destroy_rate=a.destroy_rate, destroy_count=a.destroy_count or a.count,
        destroy_timeout=a.destroy_timeout, repeat=max(1, a.repeat),
        priorities=[p for p in a.priority.split(",") if p], bufsize=bufsize,
        ulogd_bufmax=parse_size(a.ulogd_bufmax) if a.ulogd_bufmax else bufsize + 1,
        conntrail_cmd=shlex.split(a.conntrail_cmd), conntrail_args=shlex.split(a.conntrail_args),
        max_seconds=a.max_seconds, ready_timeout=a.ready_timeout, drain_quiet=a.drain_quiet,
        drain_max=a.drain_max, loadgen_cpu=a.loadgen_cpu, listener_cpu=a.listener_cpu,
        settle=a.settle, keep=a.keep, out=a.out)


def validate(opts: Options) -> None:
    """Reject unknown tools/priorities and missing privileges early."""
    bad = [t for t in opts.tools if t not in TOOLS]
    bad += [p for p in opts.priorities if p not in PRIORITIES]
    if bad:
        raise SystemExit(f"unknown tool or priority: {', '.join(bad)}")
    if os.geteuid() != 0:
        raise SystemExit("run as root: the harness creates network namespaces")


def conntrail_available(opts: Options) -> bool:
    """True when `conntrail watch --help` runs (the CLI may not exist yet)."""
    try:
        proc = subprocess.run([*opts.conntrail_cmd, "watch", "--help"], env=listener_env(),
                              capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def plan(opts: Options) -> list[Case]:
    """All cases: per repeat, per priority, per rate, per tool; then the NEW+DESTROY test.

    Tools alternate innermost so that slow drifts of the machine hit them alike.
    """
    cases: list[Case] = []
    for rep in range(1, opts.repeat + 1):
        for prio in opts.priorities:
            for rate in opts.rates:
                cases += [Case(tool, prio, "new", rate, opts.count, rep) for tool in opts.tools]
            if opts.destroy_rate:
                cases += [Case(tool, prio, "new+destroy", opts.destroy_rate, opts.destroy_count,
                               rep) for tool in opts.tools]
    return cases


@contextmanager
def conntrack_max_at_least(needed: int) -> Iterator[dict[str, str]]:
    """Raise the host-wide nf_conntrack_max if needed (it is global), restore it after."""
    key = "net.netfilter.nf_conntrack_max"
    before = topology.global_sysctl(key)
    notes = {"nf_conntrack_max_before": before}
    changed = int(before) < needed
    if changed:
        topology.set_global_sysctl(key, str(needed))
        notes["nf_conntrack_max_set"] = str(needed)
    try:
        yield notes
    finally:
        if changed:
            topology.set_global_sysctl(key, before)


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM into KeyboardInterrupt so every finally block cleans up."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    """Run every case, print the table and write the JSON results."""
    opts = parse_args(argv)
    validate(opts)
    signal.signal(signal.SIGTERM, on_sigterm)
    if set(CONNTRAIL_TOOLS) & set(opts.tools) and not conntrail_available(opts):
        print("conntrail CLI not available: skipping it", file=sys.stderr)
        opts.tools = [tool for tool in opts.tools if tool not in CONNTRAIL_TOOLS]
    meta = metadata(opts)
    results: list[RunResult] = []
    needed = max(opts.count, opts.destroy_count) + 10_000
    try:
        with tempfile.TemporaryDirectory(prefix="ctb-build-") as build, \
                conntrack_max_at_least(needed) as notes:
            meta["sysctl_changes"] = notes
            binary = compile_loadgen(Path(build))
            for case in plan(opts):
                print(f"# {case.tool} {case.priority} {case.test} "
                      f"{rate_label(case.rate)}/s x {case.count}", file=sys.stderr, flush=True)
                results.append(safe_measure(case, binary, opts))
                print(progress_line(results[-1]), file=sys.stderr, flush=True)
    finally:
        topology.delete_namespaces()
        if results:
            write_json(opts.out, meta, results)
            print(f"\nresults: {opts.out}")
            print_table(results)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt as interrupt:
        print(f"interrupted ({interrupt or 'SIGINT'}); cleaned up", file=sys.stderr)
        sys.exit(130)

"""Soak benchmark of the daemon (`conntrail run`) against ulogd2: is its RSS flat under load?

e2e.py's topology and loadgen: `--rate` fresh UDP flows/s for `--minutes`, each a NEW and,
once expired (short router UDP timeout), a DESTROY event. The daemon (as e2e.py's `daemon`)
and ulogd2 (as its `ulogd`, NEW|DESTROY) listen at the same time in the router namespace and
are sampled every `--interval` s (RSS, CPU, drops, output lines; the daemon's /metrics and
history size). Verdict: RSS after warm-up (min, max, slope per hour, also over the later
half), CPU % of one core, µs CPU per event, events lost; JSON in bench/results/.

Run as root:  python3 bench/daemon_soak.py [--minutes 60] [--rate 1000] [--udp-timeout 10]
              [--no-history]   (control: the daemon without its SQLite sink)
Traffic stays inside namespaces named ctb-*; everything is torn down on exit, failure or ^C.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import e2e
import topology
from topology import CLIENT, CLIENT_ADDR, ROUTER, SERVER_ADDR, Topology

TOOLS = ("daemon", "ulogd")
METRICS = ("conntrail_events_received_total", "conntrail_events_lost_kernel_total",
           "conntrail_kernel_overflows_total", "conntrail_resyncs_total",
           "conntrail_sink_events_written_total", "conntrail_sink_events_dropped_total",
           "conntrail_sink_queue_depth", "conntrail_sink_spill_pending")
# The harness's /metrics scrapes are loopback TCP in the router namespace: untracked, they
# add no events to either tool's output and no entries to the table the drain waits to empty.
NOTRACK_LOOPBACK = """table inet ctbsoak {
    chain prerouting { type filter hook prerouting priority raw; iifname "lo" notrack; }
    chain output { type filter hook output priority raw; oifname "lo" notrack; }
}
"""
SCRAPE = ("import sys, urllib.request; "  # runs inside the router namespace, bounded
          "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")


@dataclass
class SoakOptions:
    """Command-line settings."""

    minutes: float
    rate: int
    udp_timeout: int
    interval: float
    warmup: float
    history: bool
    ready_timeout: float
    tools: e2e.Options  # bufsize, ulogd buffer and how to start conntrail, as e2e.py has them
    out: Path


@dataclass
class ProcSample:
    """One process at one moment."""

    rss_kib: int
    rss_anon_kib: int  # heap and other private memory (RSS without files and shmem)
    threads: int
    fds: int
    cpu_ns: int  # process CPU clock (user+sys, all threads)
    cpu_ticks: int  # utime + stime from /proc/PID/stat
    drops: int  # kernel drop counter of its netfilter netlink sockets
    lines: int  # lines in its output file


@dataclass
class Sample:
    """Everything read at one instant (`t`: seconds since the load started)."""

    t: float
    phase: str  # "load", "expire" (load over, flows expiring) or "end" (drained)
    flows: int
    ct_entries: int
    state_bytes: int  # the daemon's state_dir (SQLite history + WAL) on disk
    procs: dict[str, ProcSample]
    metrics: dict[str, float]


class LineCounter:
    """Counts the lines of a growing file, reading only what was appended since last time."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.lines = path, 0, 0

    def count(self) -> int:
        """Lines now (reads at most 1 GiB per call, the rest next time)."""
        if not self.path.exists():
            return self.lines
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            for _ in range(1024):
                chunk = fh.read(1 << 20)
                if not chunk:
                    break
                self.offset += len(chunk)
                self.lines += chunk.count(b"\n")
        return self.lines


# ---------------------------------------------------------------- sampling


def sample_proc(pid: int, counter: LineCounter) -> ProcSample:
    """RSS, threads, fds, CPU and netlink drops of `pid`, and the lines of its output."""
    status: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "Threads"):
            status[key] = int(rest.split()[0])
    cpu = e2e.process_cpu(pid)
    return ProcSample(status["VmRSS"], status["RssAnon"], status["Threads"],
                      len(os.listdir(f"/proc/{pid}/fd")), cpu.total_ns,
                      cpu.user_ticks + cpu.sys_ticks, e2e.netlink_stats(pid).drops,
                      counter.count())


def scrape(port: int) -> dict[str, float]:
    """The daemon's METRICS summed over labels, plus their per-sink series ({}: failed)."""
    argv = ["ip", "netns", "exec", ROUTER, sys.executable, "-c", SCRAPE,
            f"http://127.0.0.1:{port}/metrics"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return {}
    values: dict[str, float] = {}
    for series, _, value in (line.rpartition(" ") for line in proc.stdout.splitlines()):
        if (name := series.split("{", 1)[0]) in METRICS:
            values[name] = values.get(name, 0.0) + float(value)
            values.update({series: float(value)} if "sink=" in series else {})
    return values


def dir_bytes(path: Path) -> int:
    """Total size of the files directly in `path` (0 if absent)."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.exists() else 0


# ---------------------------------------------------------------- the run


@dataclass
class Soak:
    """One soak run: its listeners, load, samples and findings."""

    opts: SoakOptions
    workdir: Path = Path()
    pids: dict[str, int] = field(default_factory=dict)
    counters: dict[str, LineCounter] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    port: int = 0
    start: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    load: dict[str, str] = field(default_factory=dict)
    exit_codes: dict[str, int] = field(default_factory=dict)
    events: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: dict[str, object] = field(default_factory=dict)

    def sample(self, phase: str) -> None:
        """Take, keep and print one sample."""
        procs = {tool: sample_proc(pid, self.counters[tool]) for tool, pid in self.pids.items()}
        s = Sample(round(time.monotonic() - self.start, 2), phase, topology.flows_created(),
                   e2e.ct_stats(self.pids["daemon"])["entries"],
                   dir_bytes(self.workdir / "state"), procs, scrape(self.port))
        self.samples.append(s)
        print(sample_row(s), flush=True)

    def sample_until(self, done: float, phase: str, wait: Callable[[float], bool]) -> None:
        """Sample on the interval grid until monotonic time `done`, or until `wait(pause)`
        (which waits up to `pause` s) says the phase is over."""
        interval = self.opts.interval
        for _ in range(int((done - time.monotonic()) / interval) + 2):
            self.sample(phase)
            now = time.monotonic()
            next_at = self.start + interval * (math.floor((now - self.start) / interval) + 1)
            if wait(min(next_at, done) - now) or time.monotonic() >= done:
                return


def start_listeners(soak: Soak, stack: ExitStack) -> dict[str, subprocess.Popen[bytes]]:
    """Start the daemon and ulogd in the router namespace; wait until both are subscribed."""
    topts, work = soak.opts.tools, soak.workdir
    argvs = {"daemon": e2e.daemon_command(work, True, topts, soak.opts.history)[0],
             "ulogd": ["ulogd", "-c", str(e2e.ulogd_config(work, True, topts))]}
    soak.outputs = {"daemon": work / "daemon.jsonl", "ulogd": work / "ulogd.json"}
    soak.notes["commands"] = {tool: shlex.join(argv) for tool, argv in argvs.items()}
    procs = {tool: stack.enter_context(e2e.listener(e2e.wrap(argv, "normal", None),
                                                    work / f"{tool}.stdout",
                                                    work / f"{tool}.stderr"))
             for tool, argv in argvs.items()}
    soak.port = e2e.wait_daemon_ready(procs["daemon"], soak.opts.ready_timeout)
    e2e.wait_ready(procs["ulogd"], soak.opts.ready_timeout)
    soak.pids = {tool: proc.pid for tool, proc in procs.items()}
    soak.counters = {tool: LineCounter(path) for tool, path in soak.outputs.items()}
    return procs


def run_load(soak: Soak, binary: Path, stack: ExitStack) -> None:
    """One paced loadgen run for the whole soak, sampled while it runs; keep its report."""
    seconds = soak.opts.minutes * 60
    argv = ["ip", "netns", "exec", CLIENT, str(binary), "-d", SERVER_ADDR, "-s", CLIENT_ADDR,
            "-r", str(soak.opts.rate), "-n", str(int(soak.opts.rate * seconds)),
            "-t", f"{seconds * 1.02 + 30:.0f}"]
    load = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stack.callback(stop_loadgen, load)
    soak.start = time.monotonic()
    soak.sample_until(soak.start + seconds * 1.02 + 60, "load", lambda pause: exited(load, pause))
    stop_loadgen(load)  # still running only if the bound passed
    out, err = load.communicate(timeout=60)
    soak.load = dict(item.split("=", 1) for item in out.split())
    soak.load["stderr"] = err.strip()
    soak.sample("load")


def exited(proc: subprocess.Popen[str], pause: float) -> bool:
    """Wait up to `pause` s for `proc` to exit; whether it has."""
    try:
        proc.wait(timeout=max(0.0, pause))
    except subprocess.TimeoutExpired:
        return False
    return True


def stop_loadgen(load: subprocess.Popen[str]) -> None:
    """Kill the load generator if it still runs, and reap it."""
    if load.poll() is None:
        load.kill()
        load.wait(timeout=10)


def drain(soak: Soak, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """Wait (bounded) for every flow to expire and both outputs to stop growing; stop both."""
    def expired(pause: float) -> bool:  # polled: the router's table is empty
        for _ in range(max(1, round(pause / 0.5))):
            if e2e.ct_stats(soak.pids["daemon"])["entries"] == 0:
                return True
            time.sleep(0.5)
        return False

    soak.sample_until(time.monotonic() + soak.opts.udp_timeout + 120.0, "expire", expired)
    for tool, proc in procs.items():
        e2e.wait_drained(proc, soak.outputs[tool], soak.opts.tools)
    soak.sample("end")
    for tool, proc in procs.items():
        soak.exit_codes[tool] = e2e.stop_process(proc, 30.0)
    soak.events = {tool: count_events(tool, path) for tool, path in soak.outputs.items()}


def soak_run(soak: Soak) -> None:
    """Build everything, run, tear everything down (also on failure or ^C)."""
    with ExitStack() as stack:  # unwinds: loadgen, listeners, namespaces, temp dirs
        build = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ctb-build-")))
        soak.workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ctb-soak-")))
        try:
            binary = e2e.compile_loadgen(build)
            topo = stack.enter_context(Topology(udp_timeout=soak.opts.udp_timeout))
            soak.notes["topology"] = topo.notes
            topology.in_ns(ROUTER, ["nft", "-f", "-"], stdin=NOTRACK_LOOPBACK)
            procs = start_listeners(soak, stack)
            soak.notes["daemon_startup"] = e2e.stderr_tail(soak.workdir / "daemon.stderr", 12)
            time.sleep(1.0)  # let both finish starting before the load
            print(HEADER, flush=True)
            run_load(soak, binary, stack)
            drain(soak, procs)
        finally:
            soak.notes["stderr_tail"] = {
                "daemon": e2e.stderr_tail(soak.workdir / "daemon.stderr"),
                "ulogd": e2e.stderr_tail(soak.workdir / "ulogd.log")}


def count_events(tool: str, path: Path) -> dict[str, int]:
    """NEW / DESTROY / other lines of an output; `loopback`: the harness's own scrapes
    (none expected, see NOTRACK_LOOPBACK)."""
    counts = {"new": 0, "destroy": 0, "other": 0, "unparsed": 0, "loopback": 0}
    with path.open("rb") as fh:
        for raw in fh:
            counts["loopback" if b"127.0.0.1" in raw else e2e.classify_line(tool, raw)] += 1
    return counts


# ---------------------------------------------------------------- report


HEADER = ("     t phase     flows  ct-tbl | daemon: RSS KiB   anon KiB thr fds  cpu s  "
          "lines drops  lost dropped qdepth  db MiB | ulogd: RSS KiB  cpu s      lines drops")


def sample_row(s: Sample) -> str:
    """One line per sample, printed as the run goes."""
    d, u, m = s.procs["daemon"], s.procs["ulogd"], s.metrics
    return (f"{s.t:6.0f} {s.phase:6} {s.flows:9,} {s.ct_entries:7,} | {d.rss_kib:14,} "
            f"{d.rss_anon_kib:10,} {d.threads:3} {d.fds:3} {d.cpu_ns / 1e9:6.1f} "
            f"{d.lines:10,} {d.drops:5} "
            f"{m.get('conntrail_events_lost_kernel_total', -1):5,.0f} "
            f"{m.get('conntrail_sink_events_dropped_total', -1):7,.0f} "
            f"{m.get('conntrail_sink_queue_depth', -1):6,.0f} {s.state_bytes / 2**20:7.1f} | "
            f"{u.rss_kib:14,} {u.cpu_ns / 1e9:6.1f} {u.lines:10,} {u.drops:5}")


def slope_per_hour(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, KiB) points, in KiB per hour."""
    fit = statistics.linear_regression([t / 3600 for t, _ in points], [y for _, y in points])
    return round(fit.slope, 1)


def rss_figures(steady: list[Sample], tool: str) -> dict[str, float]:
    """RSS after warm-up: min, max, slope over the window and over its later half."""
    points = [(s.t, s.procs[tool].rss_kib) for s in steady]
    if len(points) < 4:
        return {}
    later = points[len(points) // 2:]
    return {"min_kib": min(y for _, y in points), "max_kib": max(y for _, y in points),
            "slope_kib_per_h": slope_per_hour(points),
            "later_half_slope_kib_per_h": slope_per_hour(later),
            "window_s": points[-1][0] - points[0][0], "samples": len(points)}


def cpu_figures(soak: Soak, steady: list[Sample], tool: str, events: int) -> dict[str, float]:
    """CPU % of one core over the steady window; µs per written event over the whole run."""
    total_s = (soak.samples[-1].procs[tool].cpu_ns - soak.samples[0].procs[tool].cpu_ns) / 1e9
    figures = {"cpu_s_total": round(total_s, 3),
               "us_per_event": round(1e6 * total_s / events, 2) if events else 0.0}
    if len(steady) >= 2:
        used = (steady[-1].procs[tool].cpu_ns - steady[0].procs[tool].cpu_ns) / 1e9
        figures["cpu_pct_steady"] = round(100 * used / (steady[-1].t - steady[0].t), 2)
    return figures


def summarize(soak: Soak) -> dict[str, object]:
    """The verdict figures for both tools, and the daemon's own counters."""
    steady = [s for s in soak.samples if s.phase == "load" and s.t >= soak.opts.warmup]
    flows = soak.samples[-1].flows
    summary: dict[str, object] = {
        "flows": flows, "complete": bool(soak.events), "history": soak.opts.history,
        "ct_peak": max(s.ct_entries for s in soak.samples),
        "state_mib_end": round(soak.samples[-1].state_bytes / 2**20, 1),
        "daemon_metrics_end": {k: v for k, v in soak.samples[-1].metrics.items() if "{" not in k},
        "daemon_queue_depth_max": max(s.metrics.get("conntrail_sink_queue_depth", 0.0)
                                      for s in soak.samples)}
    for tool in TOOLS:
        counts = soak.events.get(tool, {})
        summary[tool] = {
            "rss_start_kib": soak.samples[0].procs[tool].rss_kib,
            "rss_peak_kib": max(s.procs[tool].rss_kib for s in soak.samples),
            "rss_after_warmup": rss_figures(steady, tool),
            **cpu_figures(soak, steady, tool, sum(counts.values())),
            "events": counts, "kernel_drops": soak.samples[-1].procs[tool].drops,
            "lost_new": flows - counts["new"] if counts else None,
            "lost_destroy": flows - counts["destroy"] if counts else None}
    return summary


def print_summary(summary: dict[str, object]) -> None:
    """The verdict table."""
    print(f"\nflows {summary['flows']:,}, conntrack table peak {summary['ct_peak']:,}, "
          f"history {summary['state_mib_end']} MiB")
    print("tool    RSS start KiB  after warm-up min..max KiB  slope KiB/h (later half)  "
          "CPU %  µs/ev  lost new/destroy  kernel drops")
    for tool in TOOLS:
        t = summary[tool]
        assert isinstance(t, dict)
        r = t["rss_after_warmup"] or {k: 0 for k in ("min_kib", "max_kib", "slope_kib_per_h",
                                                     "later_half_slope_kib_per_h")}
        print(f"{tool:6}  {t['rss_start_kib']:13,}  {r['min_kib']:12,}..{r['max_kib']:<12,}  "
              f"{r['slope_kib_per_h']:11,.0f} ({r['later_half_slope_kib_per_h']:,.0f})  "
              f"{t.get('cpu_pct_steady', 0):11.2f}  {t['us_per_event']:5.1f}  "
              f"{str(t['lost_new']) + '/' + str(t['lost_destroy']):16}  {t['kernel_drops']}")
    print(f"daemon /metrics at the end: {summary['daemon_metrics_end']}, "
          f"queue depth max {summary['daemon_queue_depth_max']:.0f}")


# ---------------------------------------------------------------- main


def parse_args(argv: list[str]) -> SoakOptions:
    """Parse the command line into SoakOptions."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--minutes", type=float, default=60.0, help="duration of the load")
    ap.add_argument("--rate", type=int, default=1000, help="new UDP flows per second")
    ap.add_argument("--udp-timeout", type=int, default=10,
                    help="router nf_conntrack_udp_timeout (s): flows expire (DESTROY) sooner")
    ap.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=120.0,
                    help="seconds of load left out of the RSS and CPU figures")
    ap.add_argument("--no-history", dest="history", action="store_false",
                    help="the daemon without its SQLite sink (a control)")
    ap.add_argument("--bufsize", default="8M", help="ulogd's netlink receive buffer")
    ap.add_argument("--ulogd-bufmax", default="", help="ulogd's buffer maximum (bufsize+1)")
    ap.add_argument("--conntrail-cmd", default=f"{sys.executable} -m conntrail",
                    help="how to run conntrail (PYTHONPATH gets this tree's src)")
    ap.add_argument("--ready-timeout", type=float, default=30.0)
    ap.add_argument("--out", type=Path,
                    default=e2e.BENCH_DIR / "results" / f"daemon-soak-{stamp}.json")
    a = ap.parse_args(argv)
    tools = e2e.parse_args(["--bufsize", a.bufsize, "--ulogd-bufmax", a.ulogd_bufmax,
                            "--conntrail-cmd", a.conntrail_cmd])
    return SoakOptions(a.minutes, a.rate, a.udp_timeout, a.interval, a.warmup, a.history,
                       a.ready_timeout, tools, a.out)


def validate(opts: SoakOptions) -> None:
    """Reject impossible settings and missing privileges early."""
    if min(opts.minutes, opts.rate, opts.interval, opts.udp_timeout) <= 0:
        raise SystemExit("--minutes, --rate, --interval and --udp-timeout must be positive")
    if opts.rate * opts.minutes * 60 > 1024 * 64512:  # loadgen's distinct 5-tuples
        raise SystemExit("too many flows for loadgen's source ports: lower --rate/--minutes")
    if os.geteuid() != 0:
        raise SystemExit("run as root: the harness creates network namespaces")


def main(argv: list[str]) -> int:
    """Run the soak, print the samples and the verdict, write the JSON."""
    opts = parse_args(argv)
    validate(opts)
    signal.signal(signal.SIGTERM, e2e.on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    meta = e2e.metadata(opts.tools)
    meta["options"] = {k: str(v) for k, v in asdict(opts).items() if k != "tools"}
    soak = Soak(opts)
    needed = opts.rate * (opts.udp_timeout + 120) + 10_000  # expired entries wait for the GC
    try:
        with e2e.conntrack_max_at_least(needed) as notes:
            soak.notes["sysctl_changes"] = notes
            soak_run(soak)
    finally:
        topology.delete_namespaces()
        if soak.samples:
            summary = summarize(soak)
            opts.out.parent.mkdir(parents=True, exist_ok=True)
            doc = {"meta": meta, "load": soak.load, "summary": summary, "notes": soak.notes,
                   "exit_codes": soak.exit_codes, "samples": [asdict(s) for s in soak.samples]}
            opts.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            print_summary(summary)
            print(f"results: {opts.out}")
    return 0 if soak.events and not any(soak.exit_codes.values()) else 1


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt as interrupt:
        print(f"interrupted ({str(interrupt) or 'SIGINT'}); cleaned up", file=sys.stderr)
        sys.exit(130)

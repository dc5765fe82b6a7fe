"""`conntrail run` as a real process: outputs, reload, status, drain, back-pressure, sd_notify,
privileges. Each test gets fresh namespaces and its own directories."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemon import NotifyListener, running_daemon, wait_until
from tests.integration.netenv import Netns, NetnsFactory

# `count` one-shot UDP sends from new sockets to 127.0.0.1:PORT; prints how many distinct
# flows that made (a source port reused within the burst is the same conntrack entry).
UDP_BURST = r"""
import socket, sys
count, port = int(sys.argv[1]), int(sys.argv[2])
ports = set()
for _ in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"x", ("127.0.0.1", port))
    ports.add(s.getsockname()[1])
    s.close()
print(len(ports))
"""


@pytest.fixture
def host(netns_factory: NetnsFactory) -> Netns:
    """A fresh namespace with loopback up: the daemon's host."""
    return netns_factory.new("daemon")


@pytest.fixture
def dirs() -> Iterator[Path]:
    """State and log directories every user can reach (the privilege test runs as nobody)."""
    base = Path(tempfile.mkdtemp(prefix="ctt-daemon-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def write_config(base: Path, netns: str, body: str, daemon: str = "") -> Path:
    """A config with [daemon] directories under `base`, one pipeline `p` in `netns`."""
    path = base / "conntrail.toml"
    path.write_text(f"""
[daemon]
state_dir = "{base}/state"
log_dir = "{base}/log"
drain_timeout = "10s"
{daemon}
[metrics]
listen = "127.0.0.1:0"

[pipelines.p]
netns = ["{netns}"]
events = ["new", "destroy"]
[pipelines.p.attribution]
ebpf = "off"
{body}
""")
    return path


def udp_burst(host: Netns, count: int, port: int = 9999) -> int:
    """About `count` new UDP flows in the namespace; how many exactly."""
    return int(host.python(UDP_BURST, str(count), str(port)).strip())


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON lines file's complete lines (a writer may be mid-line)."""
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()
            if line.strip()]


def new_udp_ports(records: list[dict[str, Any]], port: int) -> set[int]:
    """Source ports of NEW UDP events to `port` (ECS layout)."""
    found = set()
    for record in records:
        event, dest, src = record.get("event"), record.get("destination"), record.get("source")
        if isinstance(event, dict) and event.get("action") == "new" and \
                isinstance(dest, dict) and dest.get("port") == port and isinstance(src, dict):
            found.add(int(src["port"]))
    return found


def wait_flows(path: Path, port: int, flows: int, what: str, timeout: float = 10.0) -> None:
    """Until `path` holds a NEW event for each of `flows` UDP flows to `port`."""
    wait_until(lambda: path.exists() and len(new_udp_ports(json_lines(path), port)) == flows,
               timeout=timeout, what=what)


def recorded(db: sqlite3.Connection, port: int) -> int:
    """Flows to `port` in the history, open or closed."""
    return sum(db.execute(f"select count(*) from {table} where orig_dport = ?",
                          (port,)).fetchone()[0] for table in ("flows", "open_flows"))


OUTPUTS = """
[pipelines.p.sinks.flows]
type = "file"

[pipelines.p.sinks.text]
type = "file"
format = "text"
template = "{event} {proto} {src}:{sport} > {dst}:{dport}"
events = ["destroy"]

[pipelines.p.sinks.history]
type = "sqlite"
"""


def test_outputs_json_text_and_sqlite(host: Netns, dirs: Path) -> None:
    config = write_config(dirs, host.name, OUTPUTS)
    with running_daemon(config) as daemon:
        flows = udp_burst(host, 20, 9001)
        host.run("conntrack", "-F")  # DESTROY for all of them, now
        wait_until(lambda: (dirs / "log/text.log").exists()
                   and (dirs / "log/text.log").read_text().count("destroy udp") >= flows,
                   what="20 destroy lines")
        assert daemon.stop() == 0
    records = json_lines(dirs / "log/flows.jsonl")
    assert len(new_udp_ports(records, 9001)) == flows
    destroys = [r for r in records if r["event"]["action"] == "destroy"]
    assert len(destroys) >= 20
    # Attributed (uid from the labels; pids need the socket alive or eBPF, off here).
    assert all(r["user"] == {"id": "0"} for r in records
               if r["event"]["action"] == "new")
    text = (dirs / "log/text.log").read_text().splitlines()
    assert all(line.startswith("destroy ") for line in text) and len(text) >= 20
    assert oct((dirs / "log/flows.jsonl").stat().st_mode & 0o777) == "0o640"
    with sqlite3.connect(dirs / "state/history.sqlite") as db:
        closed = db.execute("select count(*) from flows where orig_dport = 9001"
                            ).fetchone()[0]
    assert closed == flows
    assert host.tables().strip() == ""  # our activation and label tables are gone


def test_reload_applies_valid_and_rejects_invalid(host: Netns, dirs: Path) -> None:
    config = write_config(dirs, host.name, OUTPUTS)
    with running_daemon(config) as daemon:
        flows_9002 = udp_burst(host, 5, 9002)
        wait_flows(dirs / "log/flows.jsonl", 9002, flows_9002, "flows before the reload")
        config.write_text(config.read_text() + '\n[pipelines.p.sinks.extra]\ntype = "file"\n')
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("configuration reloaded")
        flows_9003 = udp_burst(host, 5, 9003)
        wait_flows(dirs / "log/extra.jsonl", 9003, flows_9003, "the new sink's flows")
        config.write_text(config.read_text() + "\n[pipelines.p.sinks.bad]\ntype = 'file'\n"
                          "rotate_szie = '1M'\n")
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("reload rejected")
        assert "pipelines.p.sinks.bad.rotate_szie" in daemon.log
        flows_9004 = udp_burst(host, 5, 9004)
        wait_flows(dirs / "log/extra.jsonl", 9004, flows_9004,
                   "flows after the rejected reload")
        metrics = daemon.scrape()
        assert "conntrail_reloads_total 1" in metrics
        assert "conntrail_reload_failures_total 1" in metrics
        assert daemon.stop() == 0
    flows = json_lines(dirs / "log/flows.jsonl")
    assert {9002, 9003, 9004} <= {r["destination"]["port"] for r in flows}
    assert new_udp_ports(json_lines(dirs / "log/extra.jsonl"), 9002) == set()


def test_sigusr1_writes_status_and_metrics_count(host: Netns, dirs: Path) -> None:
    config = write_config(dirs, host.name, OUTPUTS)
    with running_daemon(config) as daemon:
        flows = udp_burst(host, 10, 9005)
        wait_flows(dirs / "log/flows.jsonl", 9005, flows, "the flows")
        daemon.signal(signal.SIGUSR1)
        wait_until((dirs / "state/status.json").exists, what="status.json")
        status = json.loads((dirs / "state/status.json").read_text())
        sinks = status["pipelines"]["p"]["sinks"]
        assert status["healthy"] is True and status["pipelines"]["p"]["events"] >= 10
        assert sinks["flows"]["written"] >= 10 and sinks["flows"]["dropped"] == 0
        metrics = daemon.scrape()
        assert 'conntrail_sink_events_written_total{pipeline="p",sink="flows"}' in metrics
        assert 'conntrail_attribution_total{pipeline="p",method=' in metrics
        assert 'conntrail_events_lost_kernel_total{pipeline="p",netns="' in metrics
        assert daemon.stop() == 0


def test_sigterm_drains_without_losing_events(host: Netns, dirs: Path) -> None:
    config = write_config(dirs, host.name, OUTPUTS)
    with running_daemon(config) as daemon:
        flows = udp_burst(host, 3000, 9006)
        assert daemon.stop() == 0  # at once: events still in the socket and the queues
    assert flows > 2000
    assert len(new_udp_ports(json_lines(dirs / "log/flows.jsonl"), 9006)) == flows
    with sqlite3.connect(dirs / "state/history.sqlite") as db:
        assert recorded(db, 9006) == flows


@pytest.fixture
def tiny_disk(dirs: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs as the log directory: a full disk on demand (room for the test's
    flows once the filler is gone)."""
    log = dirs / "log"
    log.mkdir(mode=0o750)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(log)], check=True)
    try:
        yield log
    finally:
        subprocess.run(["umount", "-l", str(log)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(1024):  # 4 MiB at most: the tmpfs is far smaller
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass  # full: what we wanted
    finally:
        os.close(fd)
    return filler


@pytest.mark.parametrize("policy", ["spill", "drop_oldest"])
def test_full_disk_triggers_the_policy(host: Netns, dirs: Path, tiny_disk: Path,
                                       policy: str) -> None:
    body = f"""
[pipelines.p.sinks.flows]
type = "file"
queue = 2
when_full = "{policy}"

[pipelines.p.sinks.history]
type = "sqlite"
"""
    config = write_config(dirs, host.name, body)
    with running_daemon(config) as daemon:
        filler = _fill(tiny_disk)
        flows = udp_burst(host, 1000, 9007)
        counter = "spilled" if policy == "spill" else "dropped"
        wait_until(lambda: 'conntrail_sink_failing{pipeline="p",sink="flows"} 1' in
                   (metrics := daemon.scrape()) and f'conntrail_sink_events_{counter}_total'
                   f'{{pipeline="p",sink="flows"}} 0' not in metrics,
                   what=f"the sink failing and events {counter}")
        # The other sink never stopped: every flow is in the history.
        with sqlite3.connect(dirs / "state/history.sqlite") as db:
            wait_until(lambda: recorded(db, 9007) == flows, what="history complete")
        filler.unlink()
        if policy == "spill":  # nothing lost: replayed in order once the disk has room
            wait_flows(tiny_disk / "flows.jsonl", 9007, flows, "every spilled flow written",
                       timeout=60)
        assert daemon.stop() == 0
    if policy == "drop_oldest":
        kept = new_udp_ports(json_lines(tiny_disk / "flows.jsonl"), 9007)
        assert 0 < len(kept) < flows


def test_sd_notify_ready_watchdog_reloading_stopping(host: Netns, dirs: Path) -> None:
    listener = NotifyListener(dirs / "notify.sock")
    listener.start()
    try:
        config = write_config(dirs, host.name, OUTPUTS)
        env = {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "600000"}
        with running_daemon(config, env=env) as daemon:
            wait_until(lambda: "READY=1" in listener.assignments(), what="READY=1")
            wait_until(lambda: listener.assignments().count("WATCHDOG=1") >= 2, what="watchdog")
            daemon.signal(signal.SIGHUP)
            wait_until(lambda: "RELOADING=1" in listener.assignments(), what="RELOADING=1")
            assert daemon.stop() == 0
        keys = listener.assignments()
        assert "STOPPING=1" in keys
        assert any(key.startswith("STATUS=running 1 pipeline") for key in keys)
        assert f"MAINPID={daemon.proc.pid}" in keys
    finally:
        listener.close()


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def test_privileges_are_dropped(host: Netns, dirs: Path) -> None:
    from conntrail.daemon import config as config_module
    from conntrail.daemon.lifecycle import needed_caps

    config = write_config(dirs, host.name, OUTPUTS, daemon='user = "nobody"')
    mask = sum(1 << cap for cap in needed_caps(config_module.load(config)))
    with running_daemon(config) as daemon:
        pid = daemon.proc.pid
        assert _status_field(pid, "Uid").split() == ["65534"] * 4
        assert int(_status_field(pid, "CapEff"), 16) == mask
        assert int(_status_field(pid, "CapBnd"), 16) == mask
        for task in os.listdir(f"/proc/{pid}/task"):  # every thread, not just the main one
            assert int(_status_field(int(task), "CapEff"), 16) == mask
        flows = udp_burst(host, 10, 9008)
        host.run("conntrack", "-F")
        wait_flows(dirs / "log/flows.jsonl", 9008, flows, "flows recorded after the drop")
        assert daemon.stop() == 0
    assert (dirs / "log/flows.jsonl").stat().st_uid == 65534
    assert host.tables().strip() == ""  # removed with the kept capabilities


UNIT_CAPS = "+net_admin,+sys_admin,+sys_ptrace,+dac_read_search,+bpf,+perfmon"


def test_runs_as_the_units_user_with_only_ambient_capabilities(host: Netns, dirs: Path) -> None:
    """As packaging/conntrail.service starts it: not root, the unit's ambient set only."""
    for directory in (dirs / "state", dirs / "log"):
        directory.mkdir(mode=0o750)
        os.chown(directory, 65534, 65534)
    config = write_config(dirs, host.name, OUTPUTS)
    setpriv = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
               f"--inh-caps={UNIT_CAPS}", f"--ambient-caps={UNIT_CAPS}",
               f"--bounding-set=-all,{UNIT_CAPS}", "--no-new-privs")
    with running_daemon(config, prefix=setpriv) as daemon:
        assert _status_field(daemon.proc.pid, "Uid").split() == ["65534"] * 4
        flows = udp_burst(host, 10, 9009)
        host.run("conntrack", "-F")
        wait_flows(dirs / "log/flows.jsonl", 9009, flows, "flows recorded without root")
        assert daemon.stop() == 0
    assert host.tables().strip() == ""
    with sqlite3.connect(dirs / "state/history.sqlite") as db:
        assert recorded(db, 9009) == flows


def test_keep_rules_is_per_pipeline(netns_factory: NetnsFactory, dirs: Path) -> None:
    kept, removed = netns_factory.new("kept"), netns_factory.new("removed")
    config = write_config(dirs, removed.name, """
[pipelines.p.sinks.out]
type = "file"
""")
    config.write_text(config.read_text() + f"""
[pipelines.q]
netns = ["{kept.name}"]
keep_rules = true
[pipelines.q.attribution]
enabled = false
[pipelines.q.sinks.out]
type = "file"
path = "{dirs}/log/q.jsonl"
""")
    with running_daemon(config) as daemon:
        assert "table inet conntrail" in kept.tables()
        assert "table inet conntrail" in removed.tables()
        assert daemon.stop() == 0
    assert "table inet conntrail" in kept.tables()  # left in place, as asked
    assert removed.tables().strip() == ""

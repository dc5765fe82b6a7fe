"""packaging/ and examples/: the examples build, the unit and logrotate files agree with the
daemon, and scripts/install-service --dry-run says what it would install (no root needed)."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conntrail.daemon import config as config_module
from conntrail.daemon.build import build_all
from conntrail.daemon.config import Config, DaemonSettings
from conntrail.daemon.lifecycle import needed_caps
from conntrail.kernel import bpf, sysctl
from conntrail.pipeline.queued import FullPolicy

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "conntrail.service"
LOGROTATE = ROOT / "packaging" / "conntrail.logrotate"
INSTALL = ROOT / "scripts" / "install-service"
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
VENV_CONNTRAIL = ROOT / ".venv" / "bin" / "conntrail"


def unit_settings(text: str) -> dict[str, list[str]]:
    """`Section.Key` → every value assigned (systemd adds up repeated list settings)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    """The unit file's settings."""
    return unit_settings(UNIT.read_text())


def one(unit: dict[str, list[str]], key: str) -> str:
    """A setting assigned exactly once."""
    values = unit.get(f"Service.{key}", [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def words(unit: dict[str, list[str]], key: str) -> set[str]:
    """A list setting's words over all its assignments."""
    return {word for value in unit.get(f"Service.{key}", []) for word in value.split()}


# --- examples -----------------------------------------------------------------------------

def test_the_three_examples_exist() -> None:
    assert [path.name for path in EXAMPLES] == [
        "nat-gateway-postgresql.toml", "openstack-network-node.toml", "workstation.toml"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.stem)
def test_example_parses_and_builds(path: Path) -> None:
    config = config_module.load(path)
    built = build_all(config)  # reads every sink's own keys; opens nothing
    assert sum(len(sinks) for sinks in built.values()) >= 2
    assert config.origin == str(path)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.stem)
def test_example_writes_only_where_the_unit_lets_it(path: Path,
                                                    unit: dict[str, list[str]]) -> None:
    """Under ProtectSystem=strict only the unit's directories are writable."""
    config = config_module.load(path)
    assert config.daemon.state_dir == Path("/var/lib") / one(unit, "StateDirectory")
    assert config.daemon.log_dir == Path("/var/log") / one(unit, "LogsDirectory")
    for pipeline in config.pipelines:
        for settings in pipeline.sinks:
            target = settings.data.get("path")
            if settings.type == "file" and isinstance(target, str):
                assert not target.startswith("/"), f"{settings.path}: {target}"
            if settings.type == "sqlite" and isinstance(target, str):
                assert Path(target).is_relative_to(config.daemon.state_dir), settings.path


def _example(name: str) -> Config:
    return config_module.load(ROOT / "examples" / name)


def _sinks(config: Config) -> dict[str, str]:
    return {sink.name: sink.type for pipeline in config.pipelines for sink in pipeline.sinks}


def test_workstation_example_is_an_attributed_audit() -> None:
    config = _example("workstation.toml")
    (pipeline,) = config.pipelines
    assert pipeline.netns == ("",)
    assert pipeline.attribution.enabled
    assert _sinks(config) == {"flows": "file", "history": "sqlite"}
    flows = pipeline.sinks[0].data
    assert flows["rotate_size"] and flows["rotate_interval"]
    assert pipeline.sinks[1].data["retention"]
    assert config.metrics.listen is not None and config.metrics.listen.startswith("127.")
    assert config.daemon.user is None  # the unit already runs as conntrail


def test_nat_gateway_example_feeds_postgresql_ulogd_and_syslog() -> None:
    config = _example("nat-gateway-postgresql.toml")
    (pipeline,) = config.pipelines
    assert {kind.name for kind in pipeline.events} == {"NEW", "DESTROY"}
    assert pipeline.accounting
    assert not pipeline.attribution.enabled
    assert _sinks(config) == {"history": "postgresql", "ulogd": "file", "siem": "syslog"}
    sinks = {sink.name: sink for sink in pipeline.sinks}
    assert sinks["history"].when_full is FullPolicy.BLOCK
    assert sinks["history"].data["dsn"] == "postgresql://conntrail@localhost/conntrail"
    assert sinks["ulogd"].data["format"] == "ulogd"
    assert sinks["siem"].data["transport"] == "tls"
    assert "ca_file" in sinks["siem"].data


def test_openstack_example_lists_router_and_dhcp_namespaces() -> None:
    config = _example("openstack-network-node.toml")
    prefixes = {pipeline.name: {name.split("-")[0] for name in pipeline.netns}
                for pipeline in config.pipelines}
    assert prefixes == {"routers": {"qrouter"}, "dhcp": {"qdhcp"}}
    assert all(len(pipeline.netns) >= 2 for pipeline in config.pipelines)
    assert config.daemon.user == "conntrail"


# --- the systemd unit ---------------------------------------------------------------------

def test_unit_is_a_notify_service_with_watchdog_and_hup_reload(
        unit: dict[str, list[str]]) -> None:
    assert one(unit, "Type") == "notify"
    assert one(unit, "ExecStart") == "@CONNTRAIL@ run"
    assert re.fullmatch(r"/bin/kill -HUP \$MAINPID", one(unit, "ExecReload"))
    assert one(unit, "WatchdogSec") == "30"
    assert one(unit, "Restart") == "on-failure"
    assert one(unit, "RestartSec") == "5"
    assert one(unit, "User") == "conntrail"
    assert one(unit, "UMask") == "0027"
    assert unit["Install.WantedBy"] == ["multi-user.target"]


def test_unit_stop_timeout_covers_the_drain(unit: dict[str, list[str]]) -> None:
    assert int(one(unit, "TimeoutStopSec")) > DaemonSettings().drain_timeout_s + 20


def test_unit_capabilities_are_what_the_daemon_keeps_plus_ebpf(
        unit: dict[str, list[str]]) -> None:
    # The widest configuration: a named namespace (setns) and attribution on.
    config = config_module.parse('[pipelines.p]\nnetns = ["x"]\n'
                                 '[pipelines.p.sinks.s]\ntype = "stdout"\n', "test")
    expected = {f"CAP_{cap.name}" for cap in needed_caps(config)} | {"CAP_BPF", "CAP_PERFMON"}
    assert words(unit, "AmbientCapabilities") == expected
    assert words(unit, "CapabilityBoundingSet") == expected


def test_unit_comments_every_capability() -> None:
    comments = "\n".join(line for line in UNIT.read_text().splitlines()
                         if line.startswith("#"))
    for cap in words(unit_settings(UNIT.read_text()), "AmbientCapabilities"):
        assert f"{cap}:" in comments or f"{cap} and" in comments, cap


def test_unit_directories_are_the_daemons(unit: dict[str, list[str]]) -> None:
    defaults = DaemonSettings()
    assert Path("/var/lib") / one(unit, "StateDirectory") == defaults.state_dir
    assert Path("/var/log") / one(unit, "LogsDirectory") == defaults.log_dir
    assert Path("/var/cache") / one(unit, "CacheDirectory") == Path(bpf.DEFAULT_CACHE).parent
    assert one(unit, "ConfigurationDirectory") == config_module.DEFAULT_PATH.parent.name
    assert one(unit, "LogsDirectoryMode") == "0750"


def test_unit_leaves_the_netfilter_sysctls_writable(unit: dict[str, list[str]]) -> None:
    assert one(unit, "ProtectKernelTunables") == "yes"
    writable = words(unit, "ReadWritePaths")
    for key in (sysctl.ACCT, sysctl.TIMESTAMP, sysctl.EVENTS):
        path = Path("/proc/sys") / key
        assert any(path.is_relative_to(place) for place in writable), path
    # Not deeper than /proc/sys/net: entries below it are per namespace (see the unit).
    assert all(Path(place) != Path("/proc/sys/net/netfilter") for place in writable)


def test_unit_sandbox_allows_what_the_daemon_uses(unit: dict[str, list[str]]) -> None:
    assert words(unit, "RestrictAddressFamilies") == {"AF_UNIX", "AF_INET", "AF_INET6",
                                                       "AF_NETLINK"}
    assert one(unit, "RestrictNamespaces") == "net"
    assert one(unit, "ProtectSystem") == "strict"
    assert one(unit, "NoNewPrivileges") == "yes"
    assert "Service.ProtectProc" not in unit  # attribution reads every process in /proc
    assert "Service.RestrictRealtime" not in unit


def test_unit_has_what_install_service_substitutes() -> None:
    lines = UNIT.read_text().splitlines()
    assert lines.count("ProtectHome=yes") == 1  # the script's sed matches the whole line
    assert sum("@CONNTRAIL@" in line for line in lines) == 1


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if not VENV_CONNTRAIL.exists():
        pytest.skip("no .venv/bin/conntrail (run scripts/bootstrap)")
    installed = tmp_path / "conntrail.service"
    installed.write_text(UNIT.read_text().replace("@CONNTRAIL@", str(VENV_CONNTRAIL)))
    proc = subprocess.run(["systemd-analyze", "verify", str(installed)], capture_output=True,
                          text=True, timeout=60, check=False)
    # Other units of this host may draw warnings; ours must draw none.
    ours = [line for line in proc.stderr.splitlines() if "conntrail" in line]
    assert proc.returncode == 0 and not ours, proc.stderr


# --- logrotate ----------------------------------------------------------------------------

def test_logrotate_file_has_the_policy() -> None:
    text = LOGROTATE.read_text()
    body = [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert body[0] == "/var/log/conntrail/*.jsonl /var/log/conntrail/*.log {"
    for directive in ("daily", "rotate 14", "compress", "delaycompress", "missingok",
                      "notifempty", "create 0640 conntrail conntrail", "sharedscripts"):
        assert directive in body, directive
    start, end = body.index("postrotate"), body.index("endscript")
    assert any("systemctl kill --kill-whom=main -s HUP conntrail.service" in line
               for line in body[start + 1:end])
    assert body[-1] == "}"
    assert "rotate_size" in text  # the comment: the sink's own rotation, one or the other


@pytest.fixture
def rotation_dir(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """The logrotate file, pointed at a temporary log directory, as this user, with a
    marker file instead of the HUP (no daemon of this host may get it)."""
    logs = tmp_path / "log"
    logs.mkdir(mode=0o700)
    marker = tmp_path / "hup"
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    lines = [f"echo hup >> {marker}" if "systemctl kill" in line else line
             for line in LOGROTATE.read_text().splitlines()]
    text = ("\n".join(lines).replace("/var/log/conntrail", str(logs))
            .replace("create 0640 conntrail conntrail", f"create 0640 {user} {group}"))
    config = tmp_path / "logrotate.conf"
    config.write_text(text)
    config.chmod(0o644)
    yield config, marker


def _logrotate(config: Path) -> None:
    state = config.parent / "state"
    proc = subprocess.run(["logrotate", "-f", "-s", str(state), str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate not installed")
def test_logrotate_rotates_our_files_and_signals_once(
        rotation_dir: tuple[Path, Path]) -> None:
    config, marker = rotation_dir
    logs = config.parent / "log"
    for name in ("flows.jsonl", "dhcp.log", "self-rotated.json"):
        (logs / name).write_text(f"{name} first\n")
    _logrotate(config)
    assert (logs / "flows.jsonl.1").read_text() == "flows.jsonl first\n"  # delaycompress
    assert (logs / "dhcp.log.1").exists()
    assert (logs / "flows.jsonl").stat().st_mode & 0o777 == 0o640  # create 0640
    assert (logs / "self-rotated.json").read_text() == "self-rotated.json first\n"
    assert marker.read_text() == "hup\n"  # sharedscripts: one HUP for both files
    (logs / "flows.jsonl").write_text("second\n")
    _logrotate(config)
    assert (logs / "flows.jsonl.1").read_text() == "second\n"
    assert (logs / "flows.jsonl.2.gz").exists()


# --- scripts/install-service --------------------------------------------------------------

def _install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(INSTALL), *args], capture_output=True, text=True, timeout=120,
                          check=False)


DESTINATIONS = ("/etc/systemd/system/conntrail.service", "/etc/logrotate.d/conntrail",
                "/etc/conntrail/conntrail.toml")


@pytest.fixture
def untouched() -> Iterator[None]:
    """The dry run must change nothing: the destinations stay as they were."""
    before = {path: os.path.lexists(path) for path in DESTINATIONS}
    yield
    assert {path: os.path.lexists(path) for path in DESTINATIONS} == before


@pytest.mark.usefixtures("untouched")
def test_install_dry_run_names_every_file() -> None:
    if not VENV_CONNTRAIL.exists():
        pytest.skip("no .venv/bin/conntrail (run scripts/bootstrap)")
    proc = _install("--dry-run")
    assert proc.returncode == 0, proc.stderr
    for path in DESTINATIONS:
        assert path in proc.stdout, path
    assert f"ExecStart={VENV_CONNTRAIL} run" in proc.stdout
    assert "conntrail check -c /etc/conntrail/conntrail.toml" in proc.stdout
    assert "systemctl enable --now" in proc.stdout or "systemd is not running" in proc.stdout
    assert "+ " not in proc.stdout  # nothing was run for real


@pytest.mark.usefixtures("untouched")
def test_install_dry_run_uninstall_names_the_removed_files() -> None:
    proc = _install("--dry-run", "--uninstall")
    assert proc.returncode == 0, proc.stderr
    for path in DESTINATIONS[:2]:
        assert path in proc.stdout, path
    assert "kept: /etc/conntrail" in proc.stdout


def test_install_refuses_unknown_arguments() -> None:
    proc = _install("--dry-run", "--frobnicate")
    assert proc.returncode == 2
    assert "unknown argument --frobnicate" in proc.stderr

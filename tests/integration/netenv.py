"""Test hosts in network namespaces: create, wire with veth, run commands, always clean up."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")
_COUNTER = itertools.count()


def sh(*args: str, check: bool = True, input_text: str | None = None) -> str:
    """Run a command, return stdout; a failure shows the command and its stderr."""
    proc = subprocess.run(list(args), capture_output=True, text=True, input=input_text,
                          check=False, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def unique_name(role: str) -> str:
    """A namespace name no other test or run uses at the same time."""
    return f"ctt-{os.getpid()}-{next(_COUNTER)}-{role}"


@dataclass
class Netns:
    """One test host: a named network namespace."""

    name: str

    def run(self, *args: str, check: bool = True, input_text: str | None = None) -> str:
        """Run a command inside the namespace."""
        return sh("ip", "netns", "exec", self.name, *args, check=check, input_text=input_text)

    def python(self, program: str, *args: str, check: bool = True) -> str:
        """Run a Python snippet inside the namespace."""
        return self.run(sys.executable, "-c", program, *args, check=check)

    @contextlib.contextmanager
    def spawn_python(self, program: str, *args: str) -> Iterator[subprocess.Popen[str]]:
        """A Python server in the namespace: waits for its 'ready' line, reaped on exit."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, sys.executable, "-c",
                                 program, *args], stdout=subprocess.PIPE, text=True)
        with proc:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                proc.kill()
                raise AssertionError(f"server in {self.name} did not start")
            try:
                yield proc
            finally:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def nft(self, ruleset: str) -> None:
        """Load an nft ruleset in the namespace."""
        self.run("nft", "-f", "-", input_text=ruleset)

    def sysctl(self, key: str, value: str) -> None:
        """Set a sysctl (dotted name) in the namespace."""
        self.run("sysctl", "-qw", f"{key}={value}")

    def tables(self) -> str:
        """`nft list tables` inside the namespace."""
        return self.run("nft", "list", "tables")


@dataclass
class NetnsFactory:
    """Creates namespaces for one test and removes every one of them afterwards."""

    created: list[Netns] = field(default_factory=list)

    def new(self, role: str) -> Netns:
        """A fresh namespace with loopback up."""
        ns = Netns(unique_name(role))
        sh("ip", "netns", "add", ns.name)
        self.created.append(ns)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def link(self, left: Netns, left_addrs: list[str], right: Netns,
             right_addrs: list[str]) -> tuple[str, str]:
        """A veth pair between two namespaces, with addresses; returns the interface names."""
        index = next(_COUNTER)
        a, b = f"ctva{os.getpid() % 10000}x{index}", f"ctvb{os.getpid() % 10000}x{index}"
        sh("ip", "link", "add", a, "netns", left.name, "type", "veth", "peer", "name", b,
           "netns", right.name)
        for ns, ifname, addrs in ((left, a, left_addrs), (right, b, right_addrs)):
            for addr in addrs:
                ns.run("ip", "addr", "add", addr, "dev", ifname, "nodad")
            ns.run("ip", "link", "set", ifname, "up")
        return a, b

    def cleanup(self) -> None:
        """Kill what runs inside, then delete every namespace we made."""
        for ns in self.created:
            pids = sh("ip", "netns", "pids", ns.name, check=False).split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns.name, check=False)
        self.created.clear()


@dataclass
class NatTopology:
    """client → router (masquerade) → server, IPv4 198.18.x and IPv6 2001:db8:x."""

    client: Netns
    router: Netns
    server: Netns
    client_v4: str = "198.18.1.2"
    router_inside_v4: str = "198.18.1.1"
    router_outside_v4: str = "198.18.2.1"
    server_v4: str = "198.18.2.2"
    client_v6: str = "2001:db8:1::2"
    router_outside_v6: str = "2001:db8:2::1"
    server_v6: str = "2001:db8:2::2"


def build_nat_topology(factory: NetnsFactory) -> NatTopology:
    """Three hosts; the router masquerades traffic leaving towards the server."""
    topo = NatTopology(factory.new("client"), factory.new("router"), factory.new("server"))
    factory.link(topo.client, ["198.18.1.2/24", "2001:db8:1::2/64"],
                 topo.router, ["198.18.1.1/24", "2001:db8:1::1/64"])
    _, outside = factory.link(topo.router, ["198.18.2.1/24", "2001:db8:2::1/64"],
                              topo.server, ["198.18.2.2/24", "2001:db8:2::2/64"])
    topo.router.sysctl("net.ipv4.ip_forward", "1")
    topo.router.sysctl("net.ipv6.conf.all.forwarding", "1")
    topo.client.run("ip", "route", "add", "default", "via", "198.18.1.1")
    topo.client.run("ip", "-6", "route", "add", "default", "via", "2001:db8:1::1")
    # The server has no route back to the client: only NAT makes replies possible.
    _ = outside
    router_outside = [link for link in topo.router.run("ip", "-o", "link").split("\n")
                      if "ctva" in link]
    out_if = router_outside[-1].split(":")[1].strip().split("@")[0]
    topo.router.nft(f"""
table inet ctt_nat {{
    chain post {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{out_if}" masquerade
    }}
}}
""")
    return topo


@dataclass
class Watch:
    """A running `conntrail watch` process and what it printed."""

    proc: subprocess.Popen[str]
    stdout: str = ""
    stderr: str = ""

    def stop(self, timeout: float = 10.0, settle: float = 0.5) -> Watch:
        """SIGINT, as Ctrl-C would, after letting in-flight events arrive; collect output."""
        time.sleep(settle)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=timeout)
        self.stdout, self.stderr = out, self.stderr + err
        return self


def start_watch(*args: str, ready_timeout: float = 15.0,
                env: dict[str, str] | None = None, listeners: int = 1) -> Watch:
    """Start `python -m conntrail -v watch ARGS` and wait until it listens (in `listeners`
    namespaces: each is prepared in turn, so the first may listen before the last)."""
    env = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "conntrail", "-v", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    deadline = time.monotonic() + ready_timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if "listening for" in line:
            listeners -= 1
            if listeners == 0:
                return Watch(proc, stderr="".join(seen))
    proc.kill()
    out, err = proc.communicate()
    raise AssertionError(f"watch did not start: {''.join(seen)}{err}{out}")


def run_cli(*args: str, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m conntrail ARGS` to completion."""
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "conntrail", *args], capture_output=True,
                          text=True, env=env, input=input_text, timeout=60, check=False)


def watch_lines(watch: Watch) -> Iterator[str]:
    """Non-empty stdout lines."""
    return (line for line in watch.stdout.splitlines() if line.strip())

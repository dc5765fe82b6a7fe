"""`conntrail inventory` on a real kernel: a router between two clients and a server.

    ctt-c1  198.18.1.2  2001:db8:1::2 ─┐
                                       ├─ ctt-rt (forwards; .1 on each side) ─ ctt-srv
    ctt-c2  198.18.3.2 ────────────────┘                     198.18.2.2  2001:db8:2::2

The inventory runs in the router. The same traffic is then replayed through a fresh router
that has only the emitted ruleset: it must pass, and flows never observed must not.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.netenv import Netns, NetnsFactory, Watch, run_cli, start_watch
from tests.integration.traffic import TCP_CLIENT, TCP_SERVER, ping

SERVER4, SERVER6 = "198.18.2.2", "2001:db8:2::2"
ROUTER_IN = "198.18.1.1"

UDP_SERVER = r"""
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
sock = socket.socket(family, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], int(sys.argv[2])))
sock.settimeout(float(sys.argv[4]))
print("ready", flush=True)
for _ in range(int(sys.argv[3])):
    data, peer = sock.recvfrom(100)
    sock.sendto(b"pong", peer)
"""

# Send one datagram, wait for an answer; prints "answered" or "silent".
UDP_CLIENT = r"""
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
sock = socket.socket(family, socket.SOCK_DGRAM)
sock.settimeout(float(sys.argv[3]))
sock.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
try:
    sock.recv(100)
    print("answered")
except OSError:
    print("silent")
"""

# Connect with a timeout; prints "connected" or "failed".
TCP_PROBE = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])
                             ).close()
    print("connected")
except OSError:
    print("failed")
"""


@dataclass
class Site:
    """The test network."""

    client1: Netns
    client2: Netns
    router: Netns
    server: Netns


def build_site(factory: NetnsFactory) -> Site:
    """Forwarding only (no NAT): the addresses rules see are the hosts' own."""
    site = Site(factory.new("c1"), factory.new("c2"), factory.new("rt"), factory.new("srv"))
    factory.link(site.client1, ["198.18.1.2/24", "2001:db8:1::2/64"],
                 site.router, ["198.18.1.1/24", "2001:db8:1::1/64"])
    factory.link(site.client2, ["198.18.3.2/24"], site.router, ["198.18.3.1/24"])
    factory.link(site.router, ["198.18.2.1/24", "2001:db8:2::1/64"],
                 site.server, ["198.18.2.2/24", "2001:db8:2::2/64"])
    site.router.sysctl("net.ipv4.ip_forward", "1")
    site.router.sysctl("net.ipv6.conf.all.forwarding", "1")
    site.client1.run("ip", "route", "add", "default", "via", "198.18.1.1")
    site.client1.run("ip", "-6", "route", "add", "default", "via", "2001:db8:1::1")
    site.client2.run("ip", "route", "add", "default", "via", "198.18.3.1")
    site.server.run("ip", "route", "add", "default", "via", "198.18.2.1")
    site.server.run("ip", "-6", "route", "add", "default", "via", "2001:db8:2::1")
    # UDP 9999 is never answered (no ICMP unreachable either): an unconfirmed flow.
    site.server.nft("table inet ctt_srv {\n chain in {\n type filter hook input priority 0;\n"
                    " udp dport 9999 drop\n }\n}\n")
    return site


@contextlib.contextmanager
def servers(site: Site, tcp4: int, tcp6: int, udp: int) -> Iterator[None]:
    """TCP 80 (IPv4 and IPv6) and UDP 53 servers in the server namespace."""
    with site.server.spawn_python(TCP_SERVER, SERVER4, "80", str(tcp4), "10"), \
            site.server.spawn_python(TCP_SERVER, SERVER6, "80", str(tcp6), "10"), \
            site.server.spawn_python(UDP_SERVER, SERVER4, "53", str(udp), "10"):
        yield


def observed_traffic(site: Site) -> None:
    """The traffic the inventory learns: 3+1 TCP, UDP answered and not, ICMP, IPv6."""
    with servers(site, tcp4=4, tcp6=1, udp=1):
        for _ in range(3):
            site.client1.python(TCP_CLIENT, SERVER4, "80")
        site.client2.python(TCP_CLIENT, SERVER4, "80")
        site.client1.python(TCP_CLIENT, SERVER6, "80")
        assert site.client1.python(UDP_CLIENT, SERVER4, "53", "3").strip() == "answered"
        assert site.client1.python(UDP_CLIENT, SERVER4, "9999", "0.3").strip() == "silent"
        ping(site.client1, SERVER4)
        ping(site.client1, ROUTER_IN)  # to the router itself: inbound


def signal_and_read_dump(watch: Watch) -> dict[str, Any]:
    """SIGUSR1, then the one-line JSON dump it prints; the process must keep running."""
    watch.proc.send_signal(signal.SIGUSR1)
    assert watch.proc.stdout is not None
    line = watch.proc.stdout.readline()
    assert watch.proc.poll() is None, "SIGUSR1 must not stop the inventory"
    doc: dict[str, Any] = json.loads(line)
    return doc


def entries_by_shape(doc: dict[str, Any]) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {(e["direction"], e["network"]["transport"], e["source"]["address"],
             e["source"].get("port"), e["destination"]["address"],
             e["destination"].get("port"), e.get("icmp", {}).get("type")): e
            for e in doc["entries"]}


@pytest.fixture
def site(netns_factory: NetnsFactory) -> Site:
    return build_site(netns_factory)


def test_inventory_collapses_confirms_and_dumps_on_signal(site: Site, tmp_path: Path) -> None:
    state = tmp_path / "inventory.state"
    watch = start_watch("inventory", "-n", site.router.name, "--format", "json",
                        "--state", str(state))
    try:
        observed_traffic(site)
        time.sleep(0.5)
        first = signal_and_read_dump(watch)
        assert first["inventory"]["reason"] == "signal"
        # after the dump, one more flow: the final dump must count it
        with site.server.spawn_python(TCP_SERVER, SERVER4, "80", "1", "10"):
            site.client2.python(TCP_CLIENT, SERVER4, "80")
    finally:
        watch.stop()
    final = json.loads(watch.stdout.splitlines()[-1])
    assert final["inventory"]["reason"] == "exit", watch.stderr
    shapes = entries_by_shape(final)
    tcp1 = shapes[("forwarded", "tcp", "198.18.1.2", None, SERVER4, 80, None)]
    assert (tcp1["flows"], tcp1["confirmed"]) == (3, True)  # ephemeral ports collapsed
    tcp2 = shapes[("forwarded", "tcp", "198.18.3.2", None, SERVER4, 80, None)]
    assert tcp2["flows"] == 2  # one before the SIGUSR1 dump, one after
    assert entries_by_shape(first)[("forwarded", "tcp", "198.18.3.2", None, SERVER4, 80,
                                    None)]["flows"] == 1
    assert shapes[("forwarded", "tcp", "2001:db8:1::2", None, SERVER6, 80, None)]["confirmed"]
    assert shapes[("forwarded", "udp", "198.18.1.2", None, SERVER4, 53, None)]["confirmed"]
    unanswered = shapes[("forwarded", "udp", "198.18.1.2", None, SERVER4, 9999, None)]
    assert unanswered["confirmed"] is False
    assert shapes[("forwarded", "icmp", "198.18.1.2", None, SERVER4, None, 8)]["confirmed"]
    assert shapes[("inbound", "icmp", "198.18.1.2", None, ROUTER_IN, None, 8)]["confirmed"]
    assert state.exists()

    # The state survives: a dump of the saved inventory has the same entries.
    proc = run_cli("inventory", "--from-state", "--state", str(state), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert entries_by_shape(json.loads(proc.stdout)).keys() == shapes.keys()


def learn(site: Site, state: Path) -> str:
    """Run the inventory through the observed traffic; return the ruleset it emits."""
    watch = start_watch("inventory", "-n", site.router.name, "--state", str(state))
    try:
        observed_traffic(site)
    finally:
        watch.stop()
    proc = run_cli("inventory", "--from-state", "--state", str(state), "--emit", "nft")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_emitted_ruleset_admits_what_was_seen_and_nothing_else(
        site: Site, netns_factory: NetnsFactory, tmp_path: Path) -> None:
    ruleset = learn(site, tmp_path / "inventory.state")
    assert "table inet conntrail_policy" in ruleset and "9999" not in _rules_only(ruleset)

    fresh = build_site(netns_factory)
    fresh.router.run("nft", "-c", "-f", "-", input_text=ruleset)
    fresh.router.nft(ruleset)
    observed_traffic(fresh)  # asserts every exchange succeeds
    # Flows never observed are dropped: another port, another client to the router.
    with fresh.server.spawn_python(TCP_SERVER, SERVER4, "8080", "1", "3"):
        assert fresh.client1.python(TCP_PROBE, SERVER4, "8080", "1").strip() == "failed"
    result = subprocess.run(["ip", "netns", "exec", fresh.client2.name, "ping", "-c", "1",
                             "-W", "1", ROUTER_IN], capture_output=True, check=False)
    assert result.returncode != 0, "a ping never observed must be dropped"


def test_check_against_reports_what_a_ruleset_would_drop(
        site: Site, netns_factory: NetnsFactory, tmp_path: Path) -> None:
    state = tmp_path / "inventory.state"
    ruleset = learn(site, state)
    complete = tmp_path / "complete.nft"
    complete.write_text(ruleset)
    proc = run_cli("inventory", "--from-state", "--state", str(state), "--check-against",
                   str(complete))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 confirmed entries, 6 pass, 0 would be DROPPED" in proc.stdout, proc.stdout

    # Without the rule for DNS, the kernel drops that flow and only that one.
    lines = ruleset.splitlines()
    dns = [line for line in lines if "udp dport 53 " in line and "accept" in line]
    assert len(dns) == 1, dns
    partial = tmp_path / "partial.nft"
    partial.write_text("\n".join(line for line in lines if line not in dns) + "\n")
    proc = run_cli("inventory", "--from-state", "--state", str(state), "--check-against",
                   str(partial), "--format", "json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert (report["check"]["passed"], report["check"]["dropped"]) == (5, 1)
    [dropped] = report["flows"]
    assert (dropped["verdict"], dropped["destination"], dropped["network"]["transport"]) == \
        ("dropped", {"address": SERVER4, "port": 53}, "udp")

    # The live ruleset of a namespace: the emitted table (conntrail_policy) is the firewall
    # being checked, while conntrail's own activation table there is left out.
    firewall = netns_factory.new("fw")
    firewall.nft(partial.read_text())
    firewall.nft("table inet conntrail {\n chain c {\n type filter hook input priority 0;"
                 " policy drop;\n }\n}\n")
    proc = run_cli("inventory", "--from-state", "--state", str(state), "--check-against",
                   f"netns:{firewall.name}")
    assert proc.returncode == 1 and "5 pass, 1 would be DROPPED" in proc.stdout, proc.stdout
    firewall.nft(ruleset)  # reloading the complete file replaces the table
    proc = run_cli("inventory", "--from-state", "--state", str(state), "--check-against",
                   f"netns:{firewall.name}")
    assert proc.returncode == 0 and "0 would be DROPPED" in proc.stdout, proc.stdout


def _rules_only(ruleset: str) -> str:
    return "\n".join(line for line in ruleset.splitlines()
                     if not line.strip().startswith("#"))


def test_inventory_from_history_matches_the_live_one(site: Site, tmp_path: Path) -> None:
    store = tmp_path / "history.sqlite"
    recorder = start_watch("watch", "-n", site.router.name, "--store", str(store), "-q")
    live = start_watch("inventory", "-n", site.router.name, "--format", "json", "--no-state")
    try:
        observed_traffic(site)
        time.sleep(0.5)
    finally:
        live.stop()
        recorder.stop()
    live_shapes = entries_by_shape(json.loads(live.stdout.splitlines()[-1]))
    proc = run_cli("inventory", "--from-history", "--store", str(store), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    stored = entries_by_shape(json.loads(proc.stdout))
    assert stored.keys() == live_shapes.keys()
    for shape, entry in live_shapes.items():
        assert (stored[shape]["flows"], stored[shape]["confirmed"]) == \
            (entry["flows"], entry["confirmed"]), shape
    assert json.loads(proc.stdout)["inventory"]["reason"] == "history"


def test_bad_options_are_clear_errors(tmp_path: Path) -> None:
    damaged = tmp_path / "inventory.state"
    damaged.write_bytes(b"conntrail-inventory\n" + b"\x00" * 40)
    for args, message in [
        (("--group-by", "/40"), "--group-by: IPv4 prefix /40"),
        (("--merge-families",), "--merge-families: needs --ports-only"),
        (("--ephemeral", "9-5"), "--ephemeral: '9-5'"),
        (("--interval", "0s"), "--interval"),
        (("--from-history", "--state", "x"), "--from-history"),
        (("--store", "x.sqlite"), "only apply with --from-history"),
        (("--from-state", "--state", str(tmp_path / "none")), "no saved inventory"),
        (("--from-state", "--state", str(damaged)), "damaged at byte"),
        (("--check-against", str(tmp_path / "none.nft")), "no such ruleset file"),
        (("--check-against", "netns:ctt-does-not-exist"), "ctt-does-not-exist"),
        (("--emit", "nft", "--table", "9bad"), "--table"),
    ]:
        proc = run_cli("inventory", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr

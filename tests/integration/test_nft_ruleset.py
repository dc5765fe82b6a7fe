"""Rendered inventory rulesets on a real kernel: every golden loads, and a router enforces one.

(a) Each tests/data/inventory/*.nft passes `nft -c -f` in a namespace where its table does
    not exist yet, loads, and loads again (the reload replaces the table).
(b) client → router (masquerade) → server: the router loads a ruleset rendered from
    hand-built entries; the admitted flows pass, everything else is dropped (or rejected), and
    IPv6 keeps working through the drop policy (neighbour discovery admitted).
Every wait is bounded: probes time out after PROBE_TIMEOUT seconds, servers exit on their own.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conntrail.inventory.model import Direction, InventoryEntry
from conntrail.inventory.nftables import RulesetOptions, render_ruleset
from conntrail.model import AF_INET, AF_INET6
from tests.integration.netenv import NatTopology, Netns, NetnsFactory

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "data" / "inventory"
GOLDENS = sorted(GOLDEN_DIR.glob("*.nft"))
PROBE_TIMEOUT = 2.0
SETTLE_TIMEOUT = 5.0  # the first round in a fresh topology, before any ruleset
SERVER_LIFETIME = 30.0  # seconds; the test terminates servers earlier, this is the backstop

# Serves every `tcp:PORT` / `udp:PORT` argument on both families ("::", not v6-only): reads a
# request and answers b"pong". Prints "ready" once bound.
SERVER = r"""
import select, socket, sys, time
lifetime = float(sys.argv[1])
kinds = {}
for spec in sys.argv[2:]:
    proto, port = spec.split(":")
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::", int(port)))
    if kind == socket.SOCK_STREAM:
        sock.listen(16)
    kinds[sock] = kind
print("ready", flush=True)
deadline = time.monotonic() + lifetime
while (left := deadline - time.monotonic()) > 0:
    readable, _, _ = select.select(list(kinds), [], [], left)
    for sock in readable:
        if kinds[sock] == socket.SOCK_STREAM:
            conn, _ = sock.accept()
            conn.settimeout(2)
            try:
                conn.recv(100)
                conn.sendall(b"pong")
            except OSError:
                pass
            conn.close()
        else:
            _, peer = sock.recvfrom(100)
            sock.sendto(b"pong", peer)
"""

# Runs every probe [name, proto, host, port] at once (threads), each bounded by argv[1]
# seconds; prints {name: "ok" | "timeout" | errno name} and how long each took.
PROBE = r"""
import errno, json, socket, sys, threading, time
timeout = float(sys.argv[1])
results = {}
def probe(name, proto, host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    start = time.monotonic()
    sock = socket.socket(family, kind)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
        sock.send(b"ping")
        outcome = "ok" if sock.recv(100) == b"pong" else "wrong answer"
    except TimeoutError:
        outcome = "timeout"
    except OSError as exc:
        outcome = errno.errorcode.get(exc.errno or 0, str(exc))
    finally:
        sock.close()
    results[name] = [outcome, round(time.monotonic() - start, 2)]
threads = [threading.Thread(target=probe, args=spec) for spec in json.loads(sys.argv[2])]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join(timeout + 5)
print(json.dumps(results))
"""


# --- (a) the goldens load ---------------------------------------------------------------------

def test_goldens_exist() -> None:
    assert len(GOLDENS) >= 5, f"no goldens in {GOLDEN_DIR}: run the unit tests --regen-golden"


@pytest.mark.parametrize("golden", GOLDENS, ids=[path.stem for path in GOLDENS])
def test_golden_ruleset_loads(netns_factory: NetnsFactory, golden: Path) -> None:
    text = golden.read_text(encoding="utf-8")
    table = re.search(r"^table inet (\w+) \{$", text, re.MULTILINE)
    assert table is not None
    ns = netns_factory.new("nftgold")
    assert table.group(1) not in ns.tables()
    ns.run("nft", "-c", "-f", "-", input_text=text)  # check only, the table does not exist
    assert table.group(1) not in ns.tables()
    ns.nft(text)
    ns.nft(text)  # loading again replaces the table instead of failing or duplicating
    ns.run("nft", "-c", "-f", "-", input_text=text)  # and checks while it exists
    listed = ns.run("nft", "list", "table", "inet", table.group(1))
    for chain in ("input", "output", "forward"):
        assert listed.count(f"chain {chain} {{") == 1
    expected_rules = len(re.findall(r" accept comment \"flows ", text))
    assert len(re.findall(r" accept comment \"flows ", listed)) == expected_rules


# --- (b) a router enforces a rendered ruleset -------------------------------------------------

def _entry(direction: Direction, family: int, proto: int, src: str, dst: str, *,
           dport: int | None = None, icmp: tuple[int, int] | None = None,
           confirmed: bool = True) -> InventoryEntry:
    now = time.time_ns()
    return InventoryEntry(netns="", direction=direction, family=family, proto=proto, src=src,
                          dst=dst, sport=None, dport=dport,
                          icmp_type=icmp[0] if icmp else None,
                          icmp_code=icmp[1] if icmp else None, first_ns=now - 60_000_000_000,
                          last_ns=now, flows=3, confirmed=confirmed, packets=12, bytes=900)


def _router_entries(topo: NatTopology) -> list[InventoryEntry]:
    """What an inventory of the router would hold: addresses as its filter hooks see them."""
    fwd, inbound = Direction.FORWARDED, Direction.INBOUND
    return [
        _entry(fwd, AF_INET, 6, topo.client_v4, topo.server_v4, dport=80),
        _entry(fwd, AF_INET, 17, topo.client_v4, topo.server_v4, dport=53),
        _entry(fwd, AF_INET, 1, topo.client_v4, topo.server_v4, icmp=(8, 0)),
        _entry(fwd, AF_INET6, 6, topo.client_v6, topo.server_v6, dport=80),
        _entry(inbound, AF_INET, 6, topo.client_v4, topo.router_inside_v4, dport=22),
        # seen but never answered: must stay closed
        _entry(fwd, AF_INET, 6, topo.client_v4, topo.server_v4, dport=81, confirmed=False),
    ]


@contextlib.contextmanager
def _serving(ns: Netns, *specs: str) -> Iterator[None]:
    with ns.spawn_python(SERVER, str(SERVER_LIFETIME), *specs) as proc:
        try:
            yield
        finally:
            proc.terminate()


def _probe(client: Netns, probes: list[tuple[str, str, str, int]],
           timeout: float = PROBE_TIMEOUT) -> dict[str, list[object]]:
    output = client.python(PROBE, str(timeout), json.dumps(probes))
    results: dict[str, list[object]] = json.loads(output)
    assert set(results) == {name for name, *_ in probes}
    return results


def _ping(client: Netns, address: str) -> bool:
    output = client.run("ping", "-n", "-c", "1", "-W", str(int(PROBE_TIMEOUT)), address,
                        check=False)
    return " 1 received" in output


def _load_policy(topo: NatTopology, policy: str) -> str:
    text = render_ruleset(_router_entries(topo),
                          RulesetOptions(generated_ns=time.time_ns(), policy=policy))
    topo.router.nft(text)
    return text


def _outcomes(results: dict[str, list[object]]) -> dict[str, object]:
    return {name: outcome for name, (outcome, _) in results.items()}


def test_router_admits_only_the_observed_flows(nat_topology: NatTopology) -> None:
    topo = nat_topology
    # Before the policy everything passes: the probes and servers work, so what fails later
    # fails because of the ruleset. (A fresh topology's first IPv6 connection takes about a
    # second, with or without a ruleset: this round waits longer.)
    with _serving(topo.server, "tcp:80", "tcp:81", "udp:53", "udp:54"), \
            _serving(topo.router, "tcp:22", "tcp:23"):
        probes = [("tcp80", "tcp", topo.server_v4, 80), ("tcp81", "tcp", topo.server_v4, 81),
                  ("udp53", "udp", topo.server_v4, 53), ("udp54", "udp", topo.server_v4, 54),
                  ("tcp80v6", "tcp", topo.server_v6, 80),
                  ("router22", "tcp", topo.router_inside_v4, 22),
                  ("router23", "tcp", topo.router_inside_v4, 23)]
        before = _outcomes(_probe(topo.client, probes, timeout=SETTLE_TIMEOUT))
        assert set(before.values()) == {"ok"}, before
        assert _ping(topo.client, topo.server_v4) and _ping(topo.client, topo.server_v6)

        text = _load_policy(topo, "drop")
        assert "# not admitted (no reply seen): ip saddr 198.18.1.2 ip daddr 198.18.2.2 " \
               "tcp dport 81" in text
        # new connections after the load (the probes use fresh source ports)
        after = _outcomes(_probe(topo.client, probes))
        assert after == {"tcp80": "ok", "tcp81": "timeout", "udp53": "ok",
                         "udp54": "timeout", "tcp80v6": "ok", "router22": "ok",
                         "router23": "timeout"}, after
        assert _ping(topo.client, topo.server_v4)  # ICMP echo admitted
        assert not _ping(topo.client, topo.server_v6)  # ICMPv6 echo was never observed


ND_PROBE = """
table inet ctt_nd_probe {
    chain input {
        type filter hook input priority filter - 10; policy accept;
        icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ct state untracked counter
        icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ct state invalid counter
        icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ct state new,established \
            counter
    }
}
"""


def test_ipv6_neighbour_discovery_survives_the_drop_policy(nat_topology: NatTopology) -> None:
    """With empty neighbour caches, the v6 flow needs NS/NA through the router's input and
    output chains. Conntrack never tracks them (6.18: `ct state untracked`; older kernels:
    `invalid`), so `established` cannot admit them: the ruleset's explicit accepts, placed
    before `ct state invalid drop`, must."""
    topo = nat_topology
    probe = [("tcp80v6", "tcp", topo.server_v6, 80)]
    with _serving(topo.server, "tcp:80"):
        assert _outcomes(_probe(topo.client, probe, SETTLE_TIMEOUT)) == {"tcp80v6": "ok"}
        _load_policy(topo, "drop")
        topo.router.nft(ND_PROBE)
        for ns in (topo.client, topo.router, topo.server):
            ns.run("ip", "-6", "neigh", "flush", "all")
        results = _outcomes(_probe(topo.client, probe))
    assert results == {"tcp80v6": "ok"}
    neighbours = topo.router.run("ip", "-6", "neigh", "show")
    assert topo.client_v6 in neighbours and topo.server_v6 in neighbours
    counters = [int(n) for n in re.findall(r"counter packets (\d+)",
                                           topo.router.run("nft", "list", "table", "inet",
                                                           "ctt_nd_probe"))]
    untracked, invalid, tracked = counters
    assert untracked + invalid > 0 and tracked == 0, counters


def test_reject_policy_answers_at_once(nat_topology: NatTopology) -> None:
    topo = nat_topology
    text = _load_policy(topo, "reject")
    assert "reject with icmpx admin-prohibited" in text
    with _serving(topo.server, "tcp:80", "tcp:81", "udp:54"):
        results = _probe(topo.client, [("tcp80", "tcp", topo.server_v4, 80),
                                       ("tcp81", "tcp", topo.server_v4, 81),
                                       ("udp54", "udp", topo.server_v4, 54),
                                       ("router23", "tcp", topo.router_inside_v4, 23)])
    outcomes = _outcomes(results)
    assert outcomes["tcp80"] == "ok", results
    for name in ("tcp81", "udp54", "router23"):
        outcome, seconds = results[name]
        # admin-prohibited reaches the socket as "no route to host", well before the timeout
        assert outcome in ("EHOSTUNREACH", "ECONNREFUSED", "EACCES"), results
        assert isinstance(seconds, float | int) and seconds < PROBE_TIMEOUT / 2, results

"""History on a real gateway: SNAT and DNAT through a router, `who` and `query` answers.

Topology (fresh namespaces per test):
    client1 198.18.1.2 ─┐
                        router ── server 198.18.2.2
    client2 198.18.3.2 ─┘   (inside 198.18.1.1 / 198.18.3.1, outside 198.18.2.1)
The router masquerades everything leaving on its outside link (SNAT) and forwards
198.18.2.1:8080 to client1:80 (DNAT). conntrail records in the router's namespace.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conntrail.history.spool import SUFFIX as SPOOL_SUFFIX
from tests.integration.netenv import Netns, NetnsFactory, Watch, run_cli, start_watch

PUBLIC = "198.18.2.1"
SERVER = "198.18.2.2"

# Connect from a fixed source port, exchange, print the port the server saw (after NAT).
CLIENT_FIXED_PORT = r"""
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("0.0.0.0", int(sys.argv[3])))
sock.settimeout(5)
sock.connect((sys.argv[1], int(sys.argv[2])))
sock.sendall(b"ping")
print(sock.recv(100).decode())
sock.close()
"""

# Accept `count` connections; answer each with the peer port it saw ("198.18.2.1:40000").
ECHO_PEER_SERVER = r"""
import socket, sys
server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen(16)
server.settimeout(20)
print("ready", flush=True)
for _ in range(int(sys.argv[3])):
    conn, peer = server.accept()
    conn.recv(100)
    conn.sendall(f"{peer[0]}:{peer[1]}".encode())
    conn.close()
"""

UDP_ONE_SHOT = r"""
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", int(sys.argv[3])))
sock.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
"""


@dataclass
class Gateway:
    """Two inside clients, a masquerading and port-forwarding router, an outside server."""

    client1: Netns
    client2: Netns
    router: Netns
    server: Netns


def build_gateway(factory: NetnsFactory) -> Gateway:
    """The topology of the module docstring."""
    gw = Gateway(factory.new("c1"), factory.new("c2"), factory.new("gw"), factory.new("srv"))
    factory.link(gw.client1, ["198.18.1.2/24"], gw.router, ["198.18.1.1/24"])
    factory.link(gw.client2, ["198.18.3.2/24"], gw.router, ["198.18.3.1/24"])
    _, _ = factory.link(gw.router, ["198.18.2.1/24"], gw.server, ["198.18.2.2/24"])
    gw.router.sysctl("net.ipv4.ip_forward", "1")
    gw.client1.run("ip", "route", "add", "default", "via", "198.18.1.1")
    gw.client2.run("ip", "route", "add", "default", "via", "198.18.3.1")
    gw.router.nft(f"""
table ip ctt_nat {{
    chain pre {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {PUBLIC} tcp dport 8080 dnat to 198.18.1.2:80
    }}
    chain post {{
        type nat hook postrouting priority srcnat; policy accept;
        ip daddr 198.18.2.0/24 masquerade
    }}
}}
""")
    return gw


@pytest.fixture
def gateway(netns_factory: NetnsFactory) -> Gateway:
    """A fresh gateway topology, removed after the test."""
    return build_gateway(netns_factory)


def record(gw: Gateway, store: Path, *extra: str) -> Watch:
    """`conntrail watch --store` in the router, printing nothing."""
    return start_watch("watch", "-n", gw.router.name, "--store", str(store), "-q", *extra)


def cli_json(*args: str) -> tuple[int, list[dict[str, Any]], str]:
    """Run a history command with JSON output: (exit status, documents, stderr)."""
    proc = run_cli(*args)
    docs = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode, docs, proc.stderr


def iso(ns: int) -> str:
    """Epoch seconds with nanoseconds, as `--at` accepts."""
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def test_who_finds_the_inside_host_behind_each_snat_port(gateway: Gateway,
                                                        tmp_path: Path) -> None:
    store = tmp_path / "h.sqlite"
    watch = record(gateway, store)
    before = time.time_ns()
    time.sleep(0.5)
    # Both clients use source port 40000: the router keeps it for the first and must remap
    # the second, so one public address carries both and only the store can tell them apart.
    seen: dict[str, str] = {}
    with gateway.server.spawn_python(ECHO_PEER_SERVER, SERVER, "7000", "4"):
        for client, inside, port in ((gateway.client1, "198.18.1.2", 40000),
                                     (gateway.client2, "198.18.3.2", 40000),
                                     (gateway.client1, "198.18.1.2", 40001),
                                     (gateway.client2, "198.18.3.2", 40002)):
            public = client.python(CLIENT_FIXED_PORT, SERVER, "7000", str(port)).strip()
            seen[public] = inside
    during = time.time_ns()
    watch.stop()
    assert watch.proc.returncode == 0, watch.stderr
    assert len(seen) == 4 and all(p.startswith(PUBLIC + ":") for p in seen), seen
    assert sum(inside == "198.18.3.2" for inside in seen.values()) == 2

    for public, inside in seen.items():
        status, docs, err = cli_json("who", public, "--at", iso(during), "--store", str(store),
                                     "--json")
        assert status == 0, err
        assert [(d["role"], d["inside"]["address"]) for d in docs] == [("snat", inside)], docs

    # Before the first flow, while recording: covered, and no flow.
    some_public = next(iter(seen))
    status, docs, err = cli_json("who", some_public, "--at", iso(before + 200_000_000),
                                 "--store", str(store), "--json")
    assert (status, docs) == (1, []), err
    assert "the store covers that time" in err
    # Long before recording began: the store says it cannot know.
    proc = run_cli("who", some_public, "--at", "2020-01-01T00:00:00Z", "--store", str(store))
    assert proc.returncode == 3, proc.stderr
    assert "does not cover that time" in proc.stderr


def test_who_answers_a_port_forward_and_one_shot_udp(gateway: Gateway, tmp_path: Path) -> None:
    store = tmp_path / "h.sqlite"
    watch = record(gateway, store)
    with gateway.client1.spawn_python(ECHO_PEER_SERVER, "198.18.1.2", "80", "1"):
        answer = gateway.server.python(CLIENT_FIXED_PORT, PUBLIC, "8080", "45000").strip()
    assert answer == f"{SERVER}:45000"  # DNAT only: the inside host saw the real client
    gateway.client2.python(UDP_ONE_SHOT, SERVER, "5353", "41000")
    during = time.time_ns()
    time.sleep(0.3)
    watch.stop()

    status, docs, err = cli_json("who", f"{PUBLIC}:8080", "--at", iso(during), "--store",
                                 str(store), "--json")
    assert status == 0, err
    [dnat] = docs
    assert dnat["role"] == "dnat"
    assert dnat["inside"] == {"address": "198.18.1.2", "port": 80}
    assert dnat["flow"]["orig_src"] == SERVER

    status, docs, err = cli_json("who", f"{PUBLIC}:41000", "-p", "udp", "--at", iso(during),
                                 "--store", str(store), "--json")
    assert status == 0, err
    assert [(d["role"], d["inside"]) for d in docs] == [
        ("snat", {"address": "198.18.3.2", "port": 41000})]


def test_destroy_closes_rows_with_counters_and_query_filters(gateway: Gateway,
                                                            tmp_path: Path) -> None:
    store = tmp_path / "h.sqlite"
    watch = record(gateway, store)
    for port in (42000, 42001, 42002):
        gateway.client1.python(UDP_ONE_SHOT, SERVER, "5353", str(port))
    time.sleep(0.3)
    gateway.router.run("conntrack", "-D", "-p", "udp", "--orig-port-src", "42001", check=False)
    time.sleep(0.5)
    watch.stop()

    status, docs, err = cli_json("query", "--store", str(store), "--format", "json",
                                 "-f", "udp and sport in 42000-42002")
    assert status == 0, err
    by_port = {d["orig_sport"]: d for d in docs}
    assert sorted(by_port) == [42000, 42001, 42002]
    closed = by_port[42001]
    assert closed["closed_by"] == "destroy" and closed["end"] is not None
    assert closed["orig_bytes"] is not None and closed["orig_bytes"] > 0
    assert closed["nat"] == "snat" and closed["reply_dst"] == PUBLIC
    assert all(by_port[p]["end"] is None for p in (42000, 42002))

    status, docs, _ = cli_json("query", "--store", str(store), "--format", "json", "--closed",
                               "-f", "udp and src == 198.18.1.0/24")
    assert [d["orig_sport"] for d in docs] == [42001]
    status, docs, _ = cli_json("query", "--store", str(store), "--format", "json",
                               "-f", "dport == 5353 and src == 198.18.3.0/24")
    assert status == 1 and docs == []


def test_open_flows_are_reconciled_at_the_next_start(gateway: Gateway, tmp_path: Path) -> None:
    store = tmp_path / "h.sqlite"
    watch = record(gateway, store)
    for port in (43000, 43001):
        gateway.client1.python(UDP_ONE_SHOT, SERVER, "5353", str(port))
    time.sleep(0.3)
    watch.stop()
    stopped = time.time_ns()
    # While nobody records, one flow ends (flushed); the other lives on.
    gateway.router.run("conntrack", "-D", "-p", "udp", "--orig-port-src", "43000")
    watch = record(gateway, store)
    time.sleep(0.5)
    watch.stop()

    _, docs, err = cli_json("query", "--store", str(store), "--format", "json",
                            "-f", "sport in 43000-43001")
    by_port = {d["orig_sport"]: d for d in docs}
    assert sorted(by_port) == [43000, 43001], (docs, err)  # one row each: no duplicates
    gone = by_port[43000]
    assert gone["closed_by"] == "unrecorded"
    assert gone["end_ns"] <= stopped  # bounded by the first run's last record, not by now
    assert by_port[43001]["end"] is None


def test_unreachable_or_missing_store_and_bad_times_are_clear_errors(tmp_path: Path) -> None:
    proc = run_cli("who", "198.18.2.1:1", "--store", str(tmp_path / "none.sqlite"))
    assert proc.returncode == 2 and "no history at" in proc.stderr
    proc = run_cli("who", "198.18.2.1:1", "--at", "yesterday-ish", "--store", "x")
    assert proc.returncode == 2 and "--at: not a time: 'yesterday-ish'" in proc.stderr
    proc = run_cli("who", "198.18.2.1:1", "--at", "2026-11-17T14:02:00", "--store", "x")
    assert proc.returncode == 2 and "has no zone" in proc.stderr
    proc = run_cli("query", "--store", str(tmp_path / "x"), "-f", "colour == red")
    assert proc.returncode == 2 and "colour" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("watch", "--store", "postgresql://nobody@127.0.0.1:1/none", "-c", "1")
    assert proc.returncode == 2, proc.stderr
    assert "--store: cannot connect" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("watch", "--store", "postgresql://nobody@127.0.0.1:1/none", "--retention",
                   "30d", "-c", "1")
    assert proc.returncode == 2
    assert "--retention/--max-size: apply to the SQLite store only" in proc.stderr


def test_postgres_store_answers_who_across_a_database_restart(gateway: Gateway,
                                                              tmp_path: Path) -> None:
    from tests.integration.pg import pg_cluster

    with pg_cluster(fsync=False) as cluster:
        dsn = cluster.create_database("trail")
        env_spool = tmp_path / "spool"
        watch = start_watch("watch", "-n", gateway.router.name, "--store", dsn, "-q",
                            env={"CONNTRAIL_SPOOL": str(env_spool)})
        seen: dict[str, str] = {}
        with gateway.server.spawn_python(ECHO_PEER_SERVER, SERVER, "7000", "3"):
            public = gateway.client1.python(CLIENT_FIXED_PORT, SERVER, "7000", "40000")
            seen[public.strip()] = "198.18.1.2"
            time.sleep(0.3)
            cluster.stop()  # the database goes away while flows keep coming: spooled
            for client, inside, port in ((gateway.client2, "198.18.3.2", "40000"),
                                         (gateway.client1, "198.18.1.2", "40001")):
                public = client.python(CLIENT_FIXED_PORT, SERVER, "7000", port)
                seen[public.strip()] = inside
            time.sleep(1.5)
            cluster.start()
        during = time.time_ns()
        gateway.client2.python(UDP_ONE_SHOT, SERVER, "5353", "41000")  # written after replay
        time.sleep(2.5)  # the writer's backoff retries, replays the spool, then writes on
        watch.stop()
        assert watch.proc.returncode == 0, watch.stderr
        assert len(seen) == 3, seen

        for public, inside in seen.items():
            status, docs, err = cli_json("who", public, "--at", iso(during), "--store", dsn,
                                         "--json")
            assert status == 0, err + watch.stderr
            assert [(d["role"], d["inside"]["address"]) for d in docs] == [("snat", inside)]
        status, docs, err = cli_json("query", "--store", dsn, "--format", "json")
        keys = [(d["netns"], d["ct_id"], d["start_ns"]) for d in docs]
        assert len(keys) == len(set(keys)) == 4, docs  # every flow once: no loss, no duplicate
        assert not list(env_spool.rglob(f"*{SPOOL_SUFFIX}"))  # replayed, then removed

"""Oracle: real ulogd2 (NFCT → IP2STR → JSON) and conntrail's ulogd profile on the same traffic.

Both listen in the NAT router's namespace; records are paired by (`ct.id`, `ct.event`) and
must have the same keys in the same order and equal values, except for the keys listed in
RECEIPT_KEYS, which each listener fills from its own clock (see there).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.integration.netenv import SRC, NatTopology, Netns
from tests.integration.traffic import TCP_CLIENT, TCP_SERVER, ping

ULOGD = Path("/usr/sbin/ulogd")
PLUGINS = Path("/usr/lib/x86_64-linux-gnu/ulogd")
STACK = ("ulogd_inpflow_NFCT.so", "ulogd_filter_IP2STR.so", "ulogd_output_JSON.so")
WAIT_S = 10.0

pytestmark = pytest.mark.skipif(
    not ULOGD.exists() or not all((PLUGINS / name).exists() for name in STACK),
    reason="needs Debian's ulogd2 and ulogd2-json (/usr/sbin/ulogd, NFCT/IP2STR/JSON plugins)")

# Keys each listener fills from its own clock, so they legitimately differ (checked close):
# `timestamp`: when that listener wrote the line (ulogd: time(NULL), local time, seconds).
# NEW `flow.start.*`: the kernel sends no start time in NEW events; ulogd takes
#   gettimeofday() on receipt, conntrail the kernel's event stamp (or its receipt time).
# DESTROY `flow.end.*` only with nf_conntrack_timestamp=0: the kernel sends no stop time;
#   each side takes its own clock.
RECEIPT_KEYS = {"timestamp"}
NEW_RECEIPT_KEYS = {"flow.start.sec", "flow.start.usec"}
UNTIMED_DESTROY_KEYS = {"flow.end.sec", "flow.end.usec"}
TOLERANCE_S = 2.0

# conntrail's side: the library in a subprocess, NEW and DESTROY only (ulogd's default
# event_mask), each record formatted by UlogdFormat; stops when stdin closes.
CONNTRAIL_LISTENER = r"""
import select, sys, time
from conntrail.formats.ulogd import UlogdFormat
from conntrail.kernel.netns import resolve
from conntrail.model import EventKind
from conntrail.sources.conntrack import ConntrackOptions, ConntrackSource
kinds = frozenset({EventKind.NEW, EventKind.DESTROY})
source = ConntrackSource(resolve(sys.argv[1]), ConntrackOptions(kinds=kinds))
source.start()
fmt = UlogdFormat()
with open(sys.argv[2], "ab", buffering=0) as out:
    print("ready", flush=True)
    deadline = time.monotonic() + float(sys.argv[3])
    while time.monotonic() < deadline:
        ready, _, _ = select.select([source.fileno(), sys.stdin], [], [], 0.2)
        if source.fileno() in ready:
            out.write(b"".join(fmt(record) for record in source.read()))
        if sys.stdin in ready and not sys.stdin.read(1):
            break
source.stop()
"""

UDP_SERVER = r"""
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
sock = socket.socket(family, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], int(sys.argv[2])))
sock.settimeout(10)
print("ready", flush=True)
data, peer = sock.recvfrom(100)
sock.sendto(b"pong", peer)
"""

UDP_CLIENT = r"""
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
sock = socket.socket(family, socket.SOCK_DGRAM)
sock.settimeout(5)
sock.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
assert sock.recv(100) == b"pong"
print(sock.getsockname()[1])
"""


def _ulogd_conf(tmp: Path) -> str:
    plugins = "\n".join(f'plugin="{PLUGINS / name}"' for name in STACK)
    return f"""[global]
logfile="{tmp / 'ulogd.log'}"
loglevel=3
{plugins}
stack=ct1:NFCT,ip2str1:IP2STR,json1:JSON

[ct1]
hash_enable=0

[json1]
file="{tmp / 'ulogd.json'}"
sync=1
"""


@dataclass
class Listeners:
    """The two listeners' output files."""

    ulogd: Path
    conntrail: Path


def _wait_for(path: Path, text: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.1)
    log = path.read_text() if path.exists() else "(no log)"
    raise AssertionError(f"ulogd did not start (exit {proc.poll()}): {log[-2000:]}")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@contextlib.contextmanager
def _ulogd(ns: Netns, tmp: Path) -> Iterator[Path]:
    """ulogd in the foreground inside `ns` (ip netns exec execs it: same pid)."""
    conf = tmp / "ulogd.conf"
    conf.write_text(_ulogd_conf(tmp))
    proc = subprocess.Popen(["ip", "netns", "exec", ns.name, str(ULOGD), "-c", str(conf),
                             "-p", str(tmp / "ulogd.pid")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    with proc:
        try:
            _wait_for(tmp / "ulogd.log", "entering main loop", proc)
            yield tmp / "ulogd.json"
        finally:
            _stop(proc)


@contextlib.contextmanager
def _conntrail(ns: Netns, tmp: Path) -> Iterator[Path]:
    """The library's listener in a subprocess; stopped by closing its stdin."""
    out = tmp / "conntrail.json"
    proc = subprocess.Popen([sys.executable, "-c", CONNTRAIL_LISTENER, ns.name, str(out),
                             "60"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": SRC})
    with proc:  # closes the pipes on the way out
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            yield out
        finally:
            with contextlib.suppress(BrokenPipeError):
                assert proc.stdin is not None
                proc.stdin.close()
            _stop(proc)


@contextlib.contextmanager
def _both(ns: Netns, tmp: Path) -> Iterator[Listeners]:
    with _ulogd(ns, tmp) as ulogd_out, _conntrail(ns, tmp) as conntrail_out:
        yield Listeners(ulogd_out, conntrail_out)


def _records(path: Path) -> dict[tuple[int, int], dict[str, Any]]:
    out: dict[tuple[int, int], dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            doc = json.loads(line)
            if "ct.id" in doc:
                out[(doc["ct.id"], doc["ct.event"])] = doc
    return out


def _settled(listeners: Listeners, destroys: int) -> tuple[dict[Any, Any], dict[Any, Any]]:
    """Both sides' records once each has the same pairs and at least `destroys` DESTROYs."""
    deadline = time.monotonic() + WAIT_S
    while True:
        ulogd, ours = _records(listeners.ulogd), _records(listeners.conntrail)
        ends = sum(1 for _, event in ulogd if event == 4)
        if (ends >= destroys and ulogd.keys() == ours.keys()) or time.monotonic() > deadline:
            return ulogd, ours
        time.sleep(0.2)


def _ulogd_time(text: str) -> float:
    """ulogd's timestamp: local time, seconds, +HHMM only when the offset is not zero."""
    if text[-5] in "+-":
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()


def _clock(doc: dict[str, Any], key: str) -> float:
    if key == "timestamp":
        return _ulogd_time(doc[key])
    prefix = key.rsplit(".", 1)[0]
    return float(doc[f"{prefix}.sec"] + doc[f"{prefix}.usec"] / 1e6)


def _compare(ulogd: dict[str, Any], ours: dict[str, Any], receipt: set[str]) -> None:
    """Same keys in the same order, equal values but for `receipt` keys (close clocks)."""
    assert list(ours) == list(ulogd), f"key sets differ:\nulogd {ulogd}\nours  {ours}"
    for key in receipt & ulogd.keys():
        assert abs(_clock(ours, key) - _clock(ulogd, key)) <= TOLERANCE_S, (key, ulogd, ours)
    assert {k: v for k, v in ours.items() if k not in receipt} == \
        {k: v for k, v in ulogd.items() if k not in receipt}, f"\nulogd {ulogd}\nours  {ours}"


def _receipt_keys(event: int, timed: bool) -> set[str]:
    keys = set(RECEIPT_KEYS)
    if event == 1:
        keys |= NEW_RECEIPT_KEYS
    if event == 4 and not timed:
        keys |= UNTIMED_DESTROY_KEYS
    return keys


def _compare_all(ulogd: dict[Any, Any], ours: dict[Any, Any], timed: bool) -> None:
    assert ulogd.keys() == ours.keys(), (sorted(ulogd), sorted(ours))
    for pair, doc in ulogd.items():
        _compare(doc, ours[pair], _receipt_keys(pair[1], timed))


def _one(records: dict[Any, Any], event: int, **where: Any) -> dict[str, Any]:
    found: list[dict[str, Any]] = [doc for (_, ev), doc in records.items()
             if ev == event and all(doc.get(key.replace("_", ".")) == value
                                    for key, value in where.items())]
    assert len(found) == 1, (event, where, records)
    return found[0]


def _prepare_router(topo: NatTopology, timed: bool) -> None:
    flag = "1" if timed else "0"
    topo.router.sysctl("net.netfilter.nf_conntrack_acct", flag)
    topo.router.sysctl("net.netfilter.nf_conntrack_timestamp", flag)
    # DNAT 198.18.1.1:7777 to the server, and a conntrack mark on the UDP flow.
    topo.router.nft(f"""
table ip ctt_dnat {{
    chain pre {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {topo.router_inside_v4} tcp dport 7777 dnat to {topo.server_v4}:9000
    }}
}}
table inet ctt_mark {{
    chain fw {{
        type filter hook forward priority filter; policy accept;
        udp dport 5353 ct mark set 42
    }}
}}
""")


def _traffic(topo: NatTopology) -> dict[str, int]:
    """TCP v4 SNAT, TCP v4 DNAT+SNAT, TCP v6, UDP v4, ICMP, ICMPv6; returns source ports."""
    ports: dict[str, int] = {}
    with topo.server.spawn_python(TCP_SERVER, topo.server_v4, "9000", "2", "10"):
        ports["tcp4"] = int(topo.client.python(TCP_CLIENT, topo.server_v4, "9000"))
        ports["dnat"] = int(topo.client.python(TCP_CLIENT, topo.router_inside_v4, "7777"))
    with topo.server.spawn_python(TCP_SERVER, topo.server_v6, "9001", "1", "10"):
        ports["tcp6"] = int(topo.client.python(TCP_CLIENT, topo.server_v6, "9001"))
    with topo.server.spawn_python(UDP_SERVER, topo.server_v4, "5353"):
        ports["udp4"] = int(topo.client.python(UDP_CLIENT, topo.server_v4, "5353"))
    ping(topo.client, topo.server_v4)
    ping(topo.client, topo.server_v6)
    return ports


def test_ulogd_and_conntrail_write_the_same_records(nat_topology: NatTopology,
                                                    tmp_path: Path) -> None:
    topo = nat_topology
    _prepare_router(topo, timed=True)
    with _both(topo.router, tmp_path) as listeners:
        ports = _traffic(topo)
        topo.router.run("conntrack", "-F")
        ulogd, ours = _settled(listeners, destroys=6)
    _compare_all(ulogd, ours, timed=True)
    tcp4 = _one(ulogd, 4, orig_l4_sport=ports["tcp4"], orig_l4_dport=9000)
    assert tcp4["src_ip"] == topo.client_v4 and tcp4["dest_ip"] == topo.server_v4
    assert tcp4["reply.ip.daddr.str"] == topo.router_outside_v4  # SNAT
    assert tcp4["orig.raw.pktcount"] >= 3 and "flow.start.sec" in tcp4
    dnat = _one(ulogd, 4, orig_l4_sport=ports["dnat"], orig_l4_dport=7777)
    assert (dnat["reply.ip.saddr.str"], dnat["reply.l4.sport"]) == (topo.server_v4, 9000)
    tcp6 = _one(ulogd, 4, orig_l4_sport=ports["tcp6"], orig_l4_dport=9001)
    assert tcp6["oob.family"] == 10 and tcp6["dest_ip"] == topo.server_v6
    for event in (1, 4):
        assert _one(ulogd, event, orig_l4_sport=ports["udp4"])["ct.mark"] == 42
    assert _one(ulogd, 4, orig_ip_protocol=1)["icmp.type"] == 8
    assert "icmp.type" not in _one(ulogd, 4, orig_ip_protocol=58)
    assert len(ulogd) >= 12


def test_without_acct_and_timestamps_both_use_their_clocks(nat_topology: NatTopology,
                                                           tmp_path: Path) -> None:
    topo = nat_topology
    _prepare_router(topo, timed=False)
    with _both(topo.router, tmp_path) as listeners:
        ping(topo.client, topo.server_v4)
        with topo.server.spawn_python(UDP_SERVER, topo.server_v4, "5353"):
            topo.client.python(UDP_CLIENT, topo.server_v4, "5353")
        topo.router.run("conntrack", "-F")
        ulogd, ours = _settled(listeners, destroys=2)
    _compare_all(ulogd, ours, timed=False)
    destroy = _one(ulogd, 4, orig_ip_protocol=1)
    assert destroy["orig.raw.pktcount"] == 0 and "flow.start.sec" not in destroy
    assert "flow.end.sec" in destroy

"""`conntrail watch` against the real kernel: protocols, families, NAT, counters, rules."""

from __future__ import annotations

import json
from typing import Any

from tests.integration.netenv import NatTopology, NetnsFactory, start_watch, watch_lines
from tests.integration.traffic import TCP_CLIENT, TCP_SERVER, ping, tcp_exchange, udp_exchange


def _events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def _find(events: list[dict[str, Any]], action: str, transport: str,
          **where: Any) -> list[dict[str, Any]]:
    found = []
    for event in events:
        if event["event"]["action"] != action or event["network"]["transport"] != transport:
            continue
        if all(_get(event, key) == value for key, value in where.items()):
            found.append(event)
    return found


def _get(doc: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("__"):
        doc = doc.get(part, {}) if isinstance(doc, dict) else {}
    return doc if doc != {} else None


def test_tcp_udp_icmp_both_families(netns_factory: NetnsFactory) -> None:
    ns = netns_factory.new("host")
    watch = start_watch("watch", "--json", "--netns", ns.name)
    try:
        tcp_exchange(ns, "127.0.0.1", 8080)
        tcp_exchange(ns, "::1", 8081)
        udp_port_v4 = udp_exchange(ns, "127.0.0.1", 5353)
        udp_port_v6 = udp_exchange(ns, "::1", 5354)
        ping(ns, "127.0.0.1")
        ping(ns, "::1")
        ns.run("conntrack", "-F")  # destroy everything now: DESTROY events with counters
    finally:
        watch.stop()
    events = _events(watch.stdout)
    assert _find(events, "new", "tcp", destination__port=8080, destination__ip="127.0.0.1")
    assert _find(events, "new", "tcp", destination__port=8081, destination__ip="::1")
    assert _find(events, "new", "udp", source__port=udp_port_v4, destination__port=5353)
    assert _find(events, "new", "udp", source__port=udp_port_v6, destination__port=5354)
    icmp = _find(events, "new", "icmp", network__type="ipv4")
    assert icmp and icmp[0]["conntrail"]["icmp"]["type"] == 8
    icmp6 = _find(events, "new", "ipv6-icmp", network__type="ipv6")
    assert icmp6 and icmp6[0]["conntrail"]["icmp"]["type"] == 128
    assert _find(events, "update", "tcp", destination__port=8080)
    for port in (8080, 8081):
        (destroy,) = _find(events, "destroy", "tcp", destination__port=port)
        assert destroy["source"]["packets"] >= 3 and destroy["destination"]["bytes"] > 0
        assert destroy["event"]["duration"] >= 0 and destroy["event"]["start"]
    assert "0 lost in kernel" in watch.stderr


def test_nat_shows_both_tuples(nat_topology: NatTopology) -> None:
    topo = nat_topology
    with topo.server.spawn_python(TCP_SERVER, topo.server_v4, "9000", "1", "10"):
        watch = start_watch("watch", "--json", "--netns", topo.router.name, "-e", "new")
        try:
            sport = int(topo.client.python(TCP_CLIENT, topo.server_v4, "9000").strip())
        finally:
            watch.stop()
    (event,) = _find(_events(watch.stdout), "new", "tcp", source__port=sport)
    assert event["source"]["ip"] == topo.client_v4
    assert event["destination"] == {"ip": topo.server_v4, "port": 9000}
    assert event["source"]["nat"]["ip"] == topo.router_outside_v4
    assert "SRC_NAT" in event["conntrail"]["ct"]["status"]
    assert event["conntrail"]["ct"]["nat"] == "snat"


def test_text_line_shows_reply_tuple_under_nat(nat_topology: NatTopology) -> None:
    topo = nat_topology
    watch = start_watch("watch", "--netns", topo.router.name, "-e", "new", "-p", "icmp")
    try:
        ping(topo.client, topo.server_v4)
    finally:
        watch.stop()
    (line,) = list(watch_lines(watch))
    assert f"ipv4/icmp {topo.client_v4} > {topo.server_v4} type=8" in line
    assert f"snat reply {topo.server_v4} > {topo.router_outside_v4}" in line


def test_several_namespaces_at_once(netns_factory: NetnsFactory) -> None:
    first, second = netns_factory.new("a"), netns_factory.new("b")
    watch = start_watch("watch", "--json", "-e", "new", "--netns", first.name,
                        "--netns", f"/run/netns/{second.name}", listeners=2)
    try:
        udp_exchange(first, "127.0.0.1", 5401)
        udp_exchange(second, "127.0.0.1", 5402)
    finally:
        watch.stop()
    seen = {(doc["conntrail"]["netns"], doc["destination"]["port"])
            for doc in _events(watch.stdout)}
    assert seen == {(first.name, 5401), (f"/run/netns/{second.name}", 5402)}
    assert "table inet conntrail" not in first.tables() + second.tables()

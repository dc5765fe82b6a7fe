"""`conntrail watch` says who opened each flow: real processes under distinct uids, gids
and cgroups, in namespaces; the labels layer (always) and sock_diag + process table (while
the socket lives)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.netenv import NatTopology, Netns, start_watch
from tests.integration.test_attrlabels import (
    CLIENT,
    Cgroups,
    cgroups,
    client_output,
    run_client,
    topo,
)
from tests.integration.traffic import TCP_SERVER

__all__ = ["cgroups", "topo"]  # fixtures, imported for pytest

# Connects, reports its pid and port, keeps the socket open a while (for sock_diag).
LINGERING_CLIENT = r"""
import os, socket, sys, time
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
sock.sendall(b"ping")
print(os.getpid(), sock.getsockname()[1], flush=True)
time.sleep(1.5)
sock.close()
"""

# Connects or sends once, reports its pid and port, exits at once.
ONESHOT_CLIENT = r"""
import os, socket, sys
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
if kind == "tcp":
    sock = socket.create_connection((host, port), timeout=5)
else:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.sendto(b"ping", (host, port))
print(os.getpid(), sock.getsockname()[1], flush=True)
"""


def run_traced(ns: Netns, cgroup: Path, uid: int, gid: int, *args: str) -> tuple[int, int]:
    """run_client for the clients above: (pid, source port)."""
    pid, port = client_output(ns, cgroup, uid, gid, *args)[-2:]
    return int(pid), int(port)


def new_events(stdout: str, netns: str) -> dict[int, dict[str, Any]]:
    """NEW events of one namespace by source port."""
    events = {}
    for line in stdout.splitlines():
        doc = json.loads(line)
        if doc.get("event", {}).get("action") == "new" and "port" in doc["source"] \
                and doc["conntrail"].get("netns") == netns:
            events[doc["source"]["port"]] = doc
    return events


def test_watch_attributes_uid_gid_cgroup_and_pid(topo: NatTopology, cgroups: Cgroups) -> None:
    service = cgroups.make("app.slice/web.service")
    oneshot = cgroups.make("batch.scope")
    # Without eBPF: the sock_diag layer names the process that still holds its socket.
    watch = start_watch("watch", "--json", "-e", "new", "--ebpf", "off",
                        "-n", topo.client.name, "-n", topo.router.name, listeners=2)
    try:
        with topo.server.spawn_python(TCP_SERVER, "::", "7300", "2", "10"):
            long_pid, long_port = run_traced(topo.client, service, 4242, 4343,
                                             LINGERING_CLIENT, "198.18.2.2", "7300")
            v6_pid, v6_port = run_traced(topo.client, oneshot, 4545, 4646, ONESHOT_CLIENT,
                                         "tcp", "2001:db8:2::2", "7300")
        udp_pid, udp_port = run_traced(topo.client, oneshot, 4444, 4545, ONESHOT_CLIENT,
                                       "udp", "198.18.2.2", "7301")
    finally:
        watch.stop()
    client_events = new_events(watch.stdout, topo.client.name)
    # A process holding its socket: found by sock_diag in its own cgroup's processes.
    held = client_events[long_port]
    assert (held["user"], held["group"]) == ({"id": "4242"}, {"id": "4343"})
    attribution = held["conntrail"]["attribution"]
    assert attribution["cgroup"].endswith("/app.slice/web.service")
    assert attribution["unit"] == "web.service"
    assert attribution["confidence"] == "exact", held
    assert attribution["method"] == "labels+sockdiag+proc"
    assert held["process"]["command_line"].startswith("/usr/bin/python3 -I -c")
    assert held["process"]["pid"] == long_pid
    # Processes gone at once: uid, gid and cgroup exact from the labels, pid unknown.
    for port, uid, gid, pid in ((v6_port, 4545, 4646, v6_pid), (udp_port, 4444, 4545, udp_pid)):
        doc = client_events[port]
        assert (doc["user"]["id"], doc["group"]["id"]) == (str(uid), str(gid))
        assert doc["conntrail"]["attribution"]["cgroup"].endswith("/batch.scope")
        assert doc["conntrail"]["attribution"]["unit"] == "batch.scope"
        if doc["conntrail"]["attribution"]["confidence"] == "exact":  # never a wrong pid
            assert doc["process"]["pid"] == pid, doc
    # The router only forwarded (and masqueraded) these: no process, not a miss.
    routed = list(new_events(watch.stdout, topo.router.name).values())
    assert routed and all(doc["conntrail"]["attribution"] == {
        "method": "forwarded", "confidence": "none"} for doc in routed)
    assert "process" not in routed[0] and "user" not in routed[0]


def test_ebpf_names_processes_gone_at_once(topo: NatTopology, cgroups: Cgroups) -> None:
    from conntrail.kernel import bpf

    support = bpf.probe()
    if not support.usable:
        pytest.skip(f"eBPF tier unavailable here: {support.describe()}")
    group = cgroups.make("jobs.slice/once.service")
    watch = start_watch("watch", "--json", "-e", "new", "--ebpf", "on",
                        "-n", topo.client.name)
    try:
        with topo.server.spawn_python(TCP_SERVER, "::", "7320", "2", "10"):
            tcp = [run_traced(topo.client, group, 4242, 4343, ONESHOT_CLIENT, "tcp", host,
                              "7320") for host in ("198.18.2.2", "2001:db8:2::2")]
        udp = run_traced(topo.client, group, 4444, 4545, ONESHOT_CLIENT, "udp", "198.18.2.2",
                         "7321")
    finally:
        watch.stop()
    events = new_events(watch.stdout, topo.client.name)
    for (pid, port), uid in ((tcp[0], 4242), (tcp[1], 4242), (udp, 4444)):
        doc = events[port]
        assert doc["process"]["pid"] == pid, doc
        attribution = doc["conntrail"]["attribution"]
        assert attribution["confidence"] == "exact", doc
        assert attribution["method"].startswith("labels+ebpf"), doc
        assert doc["user"]["id"] == str(uid)
        assert doc["process"]["command_line"].startswith("/usr/bin/python3 -I -c"), doc


def test_nflog_gives_uid_and_gid_where_labels_are_not_used(topo: NatTopology,
                                                           cgroups: Cgroups) -> None:
    group = cgroups.make("fallback.service")
    watch = start_watch("watch", "--json", "-e", "new", "--identity-from", "nflog",
                        "--ebpf", "off", "-n", topo.client.name)
    try:
        assert "conntrail_attr" not in topo.client.tables()
        assert "conntrail_nflog" in topo.client.tables()
        udp_port = run_client(topo.client, group, 4444, 4545, CLIENT, "udp", "198.18.2.2",
                              "7331")
        udp6_port = run_client(topo.client, group, 4646, 4747, CLIENT, "udp",
                               "2001:db8:2::2", "7331")
    finally:
        watch.stop()
    assert "conntrail_nflog" not in topo.client.tables()
    events = new_events(watch.stdout, topo.client.name)
    for port, uid, gid in ((udp_port, 4444, 4545), (udp6_port, 4646, 4747)):
        doc = events[port]
        assert (doc["user"]["id"], doc["group"]["id"]) == (str(uid), str(gid)), doc
        assert doc["conntrail"]["attribution"]["method"].startswith("nflog")


def test_text_lines_and_filters(topo: NatTopology, cgroups: Cgroups) -> None:
    group = cgroups.make("team.slice/api.service")
    watch = start_watch("watch", "-e", "new", "-n", topo.client.name, "-f",
                        'user.id == 4242 and service == "api.service"')
    try:
        with topo.server.spawn_python(TCP_SERVER, "198.18.2.2", "7310", "2", "10"):
            port = run_client(topo.client, group, 4242, 4343, LINGERING_CLIENT,
                              "198.18.2.2", "7310")
            run_client(topo.client, group, 4343, 4343, LINGERING_CLIENT, "198.18.2.2",
                       "7310")  # another user: filtered out
    finally:
        watch.stop()
    lines = watch.stdout.splitlines()
    assert len(lines) == 3, watch.stdout  # one event: conntrack-logger's three lines
    assert f"198.18.2.1/{port} > 198.18.2.2/7310 :: new" in lines[0] or \
        f"/{port} > 198.18.2.2/7310 :: new" in lines[0]
    pid, owner, service, colons = lines[1].split()
    assert int(pid) > 1 and owner == "4242:4343" and colons == "::"
    assert service.endswith("/team.slice/api.service")
    # The command line's newlines are escaped: a process cannot forge lines of our log.
    assert lines[2].startswith("\t/usr/bin/python3 -I -c \\nimport os, socket, sys, time\\n")


def test_no_attribution_leaves_no_table(topo: NatTopology, tmp_path: Path) -> None:
    watch = start_watch("watch", "--no-attribution", "-n", topo.client.name)
    try:
        assert "conntrail_attr" not in topo.client.tables()
    finally:
        watch.stop()
    watch = start_watch("watch", "-n", topo.client.name)
    try:
        assert "conntrail_attr" in topo.client.tables()
    finally:
        watch.stop()
    assert "conntrail_attr" not in topo.client.tables()  # removed on exit


def test_other_label_users_make_us_use_nflog(topo: NatTopology, cgroups: Cgroups) -> None:
    """Someone's `ct label` rules: our labels would mix with theirs, so NFLOG it is."""
    topo.client.nft("table inet theirs {\n chain out {\n type filter hook output priority 10;"
                    "\n ct label 5 counter\n }\n}\n")
    group = cgroups.make("mixed.service")
    watch = start_watch("watch", "--json", "-e", "new", "--ebpf", "off", "-n",
                        topo.client.name)
    try:
        assert "conntrail_attr" not in topo.client.tables()
        _, port = run_traced(topo.client, group, 4242, 4343, ONESHOT_CLIENT, "udp",
                             "198.18.2.2", "7341")
    finally:
        watch.stop()
    assert "other rules use conntrack labels" in watch.stderr
    doc = new_events(watch.stdout, topo.client.name)[port]
    assert doc["user"]["id"] == "4242" and doc["conntrail"]["attribution"]["method"] \
        .startswith("nflog")

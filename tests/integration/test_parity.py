"""`conntrail watch --json` sees the same events as `conntrack -E`, flow for flow."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

from tests.integration.netenv import NetnsFactory, start_watch
from tests.integration.traffic import ping, tcp_exchange, udp_burst, udp_exchange

_CT_LINE = re.compile(r"\[(NEW|UPDATE|DESTROY)\]\s+(\S+)")
_CT_ID = re.compile(r"\bid=(\d+)")


def _conntrack_events(output: str) -> set[tuple[str, int]]:
    """(action, ct id) from `conntrack -E -o id` lines; the ct id is the last id= field."""
    events = set()
    for line in output.splitlines():
        match = _CT_LINE.search(line)
        if match:
            ids = _CT_ID.findall(line.split("[USERSPACE]")[0])
            events.add((match.group(1).lower(), int(ids[-1])))
    return events


def test_same_events_as_conntrack_tool(netns_factory: NetnsFactory) -> None:
    ns = netns_factory.new("host")
    watch = start_watch("watch", "--json", "--netns", ns.name)  # installs the ct rule
    reference = subprocess.Popen(["ip", "netns", "exec", ns.name, "conntrack", "-E", "-o", "id",
                                  "-b", str(8 << 20)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # conntrack -E prints nothing once subscribed: give it time
        tcp_exchange(ns, "127.0.0.1", 7001)
        tcp_exchange(ns, "::1", 7002)
        udp_exchange(ns, "127.0.0.1", 7003)
        # Paced: conntrack -E itself drops events in an unpaced burst of this size.
        udp_burst(ns, "127.0.0.1", 100, first_port=30000, pause=0.002)
        ping(ns, "127.0.0.1")
        ping(ns, "::1")
        ns.run("conntrack", "-F")
        time.sleep(0.5)
    finally:
        watch.stop()
        reference.send_signal(signal.SIGINT)
        ref_out, ref_err = reference.communicate(timeout=10)
    assert "ENOBUFS" not in ref_err, "the reference lost events: the comparison is void"
    ours = {(doc["event"]["action"], doc["conntrail"]["ct"]["id"])
            for doc in map(json.loads, watch.stdout.splitlines())}
    theirs = _conntrack_events(ref_out)
    assert len(theirs) > 200  # 100+ flows, each NEW and DESTROY, plus TCP updates
    assert ours == theirs

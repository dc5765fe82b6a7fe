"""Start-up dump, conntrail's own nft table, loss under overflow, sysctls, record/decode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.netenv import SRC, NetnsFactory, run_cli, start_watch
from tests.integration.traffic import udp_burst, udp_exchange

CT_RULE = """
table inet tenant {
    chain c { type filter hook output priority 0; ct state new accept; }
}
"""


def test_rule_installed_then_removed(netns_factory: NetnsFactory) -> None:
    ns = netns_factory.new("host")
    assert "conntrail" not in ns.tables()
    watch = start_watch("watch", "--netns", ns.name)
    assert "table inet conntrail" in ns.tables()
    watch.stop()
    assert watch.proc.returncode == 0
    assert "conntrail" not in ns.tables()


def test_keep_rules_leaves_table(netns_factory: NetnsFactory) -> None:
    ns = netns_factory.new("host")
    start_watch("watch", "--netns", ns.name, "--keep-rules").stop()
    assert "table inet conntrail" in ns.tables()


def test_existing_conntrack_rule_means_no_table(netns_factory: NetnsFactory) -> None:
    ns = netns_factory.new("host")
    ns.nft(CT_RULE)
    watch = start_watch("watch", "--netns", ns.name)
    try:
        udp_exchange(ns, "127.0.0.1", 4000)
        tables = [line.strip() for line in ns.tables().splitlines()]
        assert "table inet conntrail" not in tables  # no activation table: theirs suffices
        assert "table inet conntrail_attr" in tables  # attribution's labels, removed on exit
    finally:
        watch.stop()
    assert "ipv4/udp 127.0.0.1/" in watch.stdout
    assert ns.tables().split() == ["table", "inet", "tenant"]


def test_no_rules_option_sees_nothing_in_fresh_namespace(netns_factory: NetnsFactory) -> None:
    ns = netns_factory.new("host")
    watch = start_watch("watch", "--netns", ns.name, "--no-rules")
    try:
        udp_exchange(ns, "127.0.0.1", 4001)
    finally:
        watch.stop()
    assert watch.stdout == ""  # the kernel tracks nothing without a conntrack rule
    assert "conntrail" not in ns.tables()


def test_dump_shows_flows_older_than_watch(netns_factory: NetnsFactory) -> None:
    ns = netns_factory.new("host")
    ns.nft(CT_RULE)
    sport = udp_exchange(ns, "127.0.0.1", 4002)
    with_dump = start_watch("watch", "--json", "--dump", "--netns", ns.name).stop()
    without = start_watch("watch", "--json", "--netns", ns.name).stop()
    dumped = [json.loads(line) for line in with_dump.stdout.splitlines()]
    assert any(doc["event"]["action"] == "dump" and doc["source"]["port"] == sport
               for doc in dumped)
    assert without.stdout == ""


def test_accounting_sysctls_enabled_per_namespace(netns_factory: NetnsFactory) -> None:
    ns = netns_factory.new("host")
    assert ns.run("sysctl", "-n", "net.netfilter.nf_conntrack_acct").strip() == "0"
    start_watch("watch", "--netns", ns.name).stop()
    assert ns.run("sysctl", "-n", "net.netfilter.nf_conntrack_acct").strip() == "1"
    assert ns.run("sysctl", "-n", "net.netfilter.nf_conntrack_timestamp").strip() == "1"
    other = netns_factory.new("other")
    start_watch("watch", "--netns", other.name, "--no-accounting").stop()
    assert other.run("sysctl", "-n", "net.netfilter.nf_conntrack_acct").strip() == "0"


def test_overflow_is_counted_reported_and_resynced(netns_factory: NetnsFactory) -> None:
    ns = netns_factory.new("host")
    ns.nft(CT_RULE)
    # A buffer far too small for a 3000-flow burst; the process must survive and say so.
    watch = start_watch("watch", "--json", "--netns", ns.name, "-e", "new",
                        "--buffer", "4k", "--buffer-max", "8k", "--nice", "19")
    try:
        udp_burst(ns, "127.0.0.1", 3000, first_port=20000)
    finally:
        watch.stop(settle=1.0)
    assert watch.proc.returncode == 0
    docs = [json.loads(line) for line in watch.stdout.splitlines()]
    notices = [doc for doc in docs if doc["event"]["action"] == "events-lost"]
    assert notices and notices[0]["conntrail"]["lost"] > 0, watch.stderr
    assert any(doc["event"]["action"] == "dump" for doc in docs)  # the resync dump
    summary = watch.stderr.strip().splitlines()[-1]
    lost = int(summary.split(" lost in kernel")[0].rsplit(" ", 1)[1])
    news = sum(doc["event"]["action"] == "new" for doc in docs)
    # Every flow is either received or counted as lost.
    assert lost > 0 and news + lost >= 3000 - 5, (news, lost, watch.stderr)


def test_record_then_decode(netns_factory: NetnsFactory, tmp_path: Path) -> None:
    ns = netns_factory.new("host")
    recording = tmp_path / "udp.hex"
    ns.nft(CT_RULE)
    proc = subprocess.Popen([sys.executable, "-m", "conntrail", "record", "--netns", ns.name,
                             "-o", str(recording), "-c", "2", "-t", "10",
                             "--comment", "one UDP exchange on loopback"],
                            env={"PYTHONPATH": SRC, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    time.sleep(1.0)  # record prints nothing when subscribed: give it time
    sport = udp_exchange(ns, "127.0.0.1", 4003)
    assert proc.wait(15) == 0
    text = recording.read_text()
    assert text.startswith("# recorded by conntrail record on Linux")
    assert "# one UDP exchange on loopback" in text
    decoded = run_cli("decode", str(recording))
    assert decoded.returncode == 0, decoded.stderr
    docs = [json.loads(line) for line in decoded.stdout.splitlines()]
    assert [doc["event"]["action"] for doc in docs] == ["new", "update"]
    assert docs[0]["source"]["port"] == sport


def test_priority_options_apply(netns_factory: NetnsFactory) -> None:
    ns = netns_factory.new("host")
    watch = start_watch("watch", "--netns", ns.name, "--realtime", "5", "--nice", "-3")
    try:
        pid = watch.proc.pid
        assert os.sched_getscheduler(pid) == os.SCHED_FIFO
        assert os.sched_getparam(pid).sched_priority == 5
        assert os.getpriority(os.PRIO_PROCESS, pid) == -3
    finally:
        watch.stop()
    assert watch.proc.returncode == 0

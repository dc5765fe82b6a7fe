"""check_ruleset / live_ruleset against the real kernel: verdicts, calibration, clean-up, scale."""

from __future__ import annotations

import collections
import os
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator

import pytest

from conntrail.errors import ConfigError, KernelError
from conntrail.kernel import fwcheck
from conntrail.kernel.fwcheck import Hook, Probe, Verdict, check_ruleset, live_ruleset
from conntrail.kernel.netns import NETNS_RUN_DIR, resolve
from tests.integration.netenv import NetnsFactory, sh

V4, V6 = socket.AF_INET, socket.AF_INET6
TCP, UDP, ICMP, ICMPV6, SCTP, UDPLITE, GRE = 6, 17, 1, 58, 132, 136, 47
PASSED, DROPPED, UNTESTABLE = Verdict.PASSED, Verdict.DROPPED, Verdict.UNTESTABLE

RULESET = """\
table inet fw {
    chain input {
        type filter hook input priority filter; policy drop;
        iif lo accept
        ip daddr 198.18.1.1 tcp dport 22 accept
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ip saddr 198.18.1.2 ip daddr 198.18.2.2 tcp dport 80 accept
        meta nfproto ipv6 udp dport 53 accept
    }
    chain output {
        type filter hook output priority filter; policy drop;
        oif lo accept
        ip daddr 198.18.2.2 icmp type echo-request accept
    }
}
"""

ACCEPT_ALL = """\
table inet fw {
    chain input { type filter hook input priority filter; policy accept; }
    chain forward { type filter hook forward priority filter; policy accept; }
    chain output { type filter hook output priority filter; policy accept; }
}
"""

ALLOWED = [
    Probe(Hook.FORWARD, V4, TCP, "198.18.1.2", "198.18.2.2", dport=80),
    Probe(Hook.FORWARD, V6, UDP, "2001:db8:1::2", "2001:db8:2::2", dport=53),
    Probe(Hook.FORWARD, V6, UDP, "2001:db8:1::3", "2001:db8:2::9", sport=5353, dport=53),
    Probe(Hook.INPUT, V4, TCP, "198.18.1.2", "198.18.1.1", dport=22),
    Probe(Hook.INPUT, V4, TCP, "198.18.3.3", "198.18.1.1", sport=1234, dport=22),
    Probe(Hook.OUTPUT, V4, ICMP, "198.18.1.1", "198.18.2.2", icmp_type=8, icmp_code=0),
    Probe(Hook.OUTPUT, V4, ICMP, "198.18.1.1", "198.18.2.2"),  # echo request by default
    Probe(Hook.LOCAL, V4, TCP, "127.0.0.1", "127.0.0.1", dport=5432),
    Probe(Hook.LOCAL, V6, UDP, "::1", "::1", dport=53),
    Probe(Hook.LOCAL, V4, TCP, "198.18.1.1", "198.18.1.1", dport=8080),  # own address, via lo
]
DENIED = [
    Probe(Hook.FORWARD, V4, TCP, "198.18.1.2", "198.18.2.2", dport=81),
    Probe(Hook.FORWARD, V4, TCP, "198.18.1.3", "198.18.2.2", dport=80),
    Probe(Hook.FORWARD, V4, TCP, "198.18.1.2", "198.18.2.3", dport=80),
    Probe(Hook.FORWARD, V4, UDP, "198.18.1.2", "198.18.2.2", dport=80),
    Probe(Hook.FORWARD, V4, UDP, "198.18.1.2", "198.18.2.2", dport=53),  # the rule is IPv6 only
    Probe(Hook.FORWARD, V6, UDP, "2001:db8:1::2", "2001:db8:2::2", dport=54),
    Probe(Hook.FORWARD, V6, TCP, "2001:db8:1::2", "2001:db8:2::2", dport=53),
    Probe(Hook.INPUT, V4, TCP, "198.18.1.2", "198.18.1.1", dport=23),
    Probe(Hook.INPUT, V4, TCP, "198.18.1.2", "198.18.1.9", dport=22),
    Probe(Hook.INPUT, V4, UDP, "198.18.1.2", "198.18.1.1", dport=22),
    Probe(Hook.INPUT, V6, TCP, "2001:db8:1::2", "2001:db8:1::1", dport=22),
    Probe(Hook.OUTPUT, V4, ICMP, "198.18.1.1", "198.18.2.3"),
    Probe(Hook.OUTPUT, V4, ICMP, "198.18.1.1", "198.18.2.2", icmp_type=13),  # timestamp
    Probe(Hook.OUTPUT, V4, TCP, "198.18.1.1", "198.18.2.2", dport=443),
    Probe(Hook.OUTPUT, V6, ICMPV6, "2001:db8:1::1", "2001:db8:2::2"),
]


def _ours() -> list[str]:
    prefix = f"{fwcheck.NS_PREFIX}{os.getpid()}-"
    try:
        return sorted(name for name in os.listdir(NETNS_RUN_DIR) if name.startswith(prefix))
    except FileNotFoundError:
        return []


@pytest.fixture(autouse=True)
def _no_namespace_left() -> Iterator[None]:
    """Every test, passing or failing on purpose, must leave no ctc- namespace of ours."""
    yield
    assert _ours() == []


def _names(verdicts: Iterable[Verdict]) -> list[str]:
    return [verdict.name for verdict in verdicts]


def test_allowed_flows_pass_the_others_are_dropped() -> None:
    verdicts = check_ruleset(RULESET, ALLOWED + DENIED)
    assert _names(verdicts) == ["PASSED"] * len(ALLOWED) + ["DROPPED"] * len(DENIED)


def test_accept_all_passes_everything() -> None:
    assert set(check_ruleset(ACCEPT_ALL, ALLOWED + DENIED)) == {PASSED}
    assert set(check_ruleset("", ALLOWED + DENIED)) == {PASSED}


def test_flush_ruleset_at_the_top_is_fine() -> None:
    """Rulesets from /etc/nftables.conf start so; the probe table is added after it."""
    verdicts = check_ruleset("flush ruleset\n" + RULESET, [ALLOWED[0], DENIED[0]])
    assert verdicts == [PASSED, DROPPED]


def test_syntax_error_names_the_line() -> None:
    broken = RULESET.replace("tcp dport 22 accept", "tcp dport 22 acept")
    with pytest.raises(KernelError) as caught:
        check_ruleset(broken, ALLOWED)
    message = str(caught.value)
    assert "ruleset:5:" in message and "acept" in message
    with pytest.raises(KernelError, match=r"ruleset:1:"):
        check_ruleset("tabel inet x {}\n", [])  # checked even without probes


def test_every_protocol_is_built_right() -> None:
    """`ct state invalid drop` first: a wrong checksum or header would show as DROPPED."""
    ruleset = """\
table inet fw {
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state invalid drop
        tcp dport 1 accept
        udp dport 2 accept
        sctp dport 4 accept
        icmp type { echo-request, timestamp-request } accept
        icmpv6 type echo-request accept
        meta l4proto gre accept
    }
}
"""
    probes, expected = [], []
    for family, src, dst in ((V4, "198.18.1.2", "198.18.2.2"),
                             (V6, "2001:db8:1::2", "2001:db8:2::2")):
        icmp = ICMP if family == V4 else ICMPV6
        for proto, port in ((TCP, 1), (UDP, 2), (SCTP, 4)):
            probes += [Probe(Hook.FORWARD, family, proto, src, dst, dport=port),
                       Probe(Hook.FORWARD, family, proto, src, dst, dport=port + 10)]
            expected += [PASSED, DROPPED]
        probes += [Probe(Hook.FORWARD, family, icmp, src, dst),
                   Probe(Hook.FORWARD, family, icmp, src, dst, icmp_type=3 if family == V4
                         else 1, icmp_code=1),
                   Probe(Hook.FORWARD, family, GRE, src, dst),
                   Probe(Hook.FORWARD, family, 50, src, dst)]  # ESP: another protocol
        expected += [PASSED, DROPPED, PASSED, DROPPED]
    probes.append(Probe(Hook.FORWARD, V4, ICMP, "198.18.1.2", "198.18.2.2", icmp_type=13))
    expected.append(PASSED)
    assert check_ruleset(ruleset, probes) == expected


def test_udplite_is_sent_as_real_senders_do() -> None:
    """RFC 3828 checksum; this kernel's conntrack checks UDP-Lite with UDP's pseudo-header,
    so only a ruleset that does not drop ct-invalid packets lets it through from outside."""
    ruleset = RULESET.replace("meta nfproto ipv6 udp dport 53 accept",
                              "meta l4proto udplite th dport 3 accept")
    probes = [Probe(Hook.FORWARD, V4, UDPLITE, "198.18.1.2", "198.18.2.2", dport=3),
              Probe(Hook.FORWARD, V6, UDPLITE, "2001:db8:1::2", "2001:db8:2::2", dport=3),
              Probe(Hook.FORWARD, V4, UDPLITE, "198.18.1.2", "198.18.2.2", dport=4)]
    assert check_ruleset(ruleset, probes) == [PASSED, PASSED, DROPPED]


def test_reject_nat_and_notrack_are_judged_on_what_was_sent() -> None:
    """A reject's reset carries the probe's conntrack entry and must not count as passing;
    NAT changes the packet, so probes are recognised by conntrack's original tuple."""
    ruleset = """\
table inet fw {
    chain input {
        type filter hook input priority filter; policy accept;
        tcp dport 23 reject with tcp reset
        udp dport 69 reject
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct status dnat accept
        ip saddr 198.18.1.2 tcp dport 80 accept
        udp dport 53 accept
    }
}
table ip nat {
    chain pre {
        type nat hook prerouting priority dstnat;
        ip daddr 198.18.1.1 tcp dport 8080 dnat to 198.18.2.7:80
    }
    chain post {
        type nat hook postrouting priority srcnat;
        oifname "ctc-out" masquerade
    }
}
table inet raw {
    chain pre {
        type filter hook prerouting priority raw;
        udp dport 53 notrack
    }
}
"""
    cases = [
        (Probe(Hook.INPUT, V4, TCP, "198.18.1.2", "198.18.1.1", dport=23), DROPPED),
        (Probe(Hook.INPUT, V4, UDP, "198.18.1.2", "198.18.1.1", dport=69), DROPPED),
        (Probe(Hook.INPUT, V4, TCP, "198.18.1.2", "198.18.1.1", dport=25), PASSED),
        (Probe(Hook.INPUT, V4, TCP, "198.18.1.3", "198.18.1.1", dport=8080), PASSED),  # DNAT
        (Probe(Hook.FORWARD, V4, TCP, "198.18.1.2", "198.18.2.2", dport=80), PASSED),  # masq.
        (Probe(Hook.FORWARD, V4, TCP, "198.18.1.3", "198.18.2.2", dport=80), DROPPED),
        (Probe(Hook.FORWARD, V4, UDP, "198.18.1.3", "198.18.2.2", dport=53), PASSED),
        (Probe(Hook.INPUT, V4, UDP, "198.18.1.3", "198.18.1.1", dport=53), PASSED),
    ]
    assert check_ruleset(ruleset, [probe for probe, _ in cases]) == [v for _, v in cases]


def test_interface_names_can_be_given() -> None:
    ruleset = """\
table inet fw {
    chain forward {
        type filter hook forward priority filter; policy drop;
        iifname "eth0" oifname "eth1" tcp dport 80 accept
    }
    chain input {
        type filter hook input priority filter; policy drop;
        iif "eth0" tcp dport 22 accept
    }
}
"""
    probes = [Probe(Hook.FORWARD, V4, TCP, "198.18.1.2", "198.18.2.2", dport=80),
              Probe(Hook.INPUT, V4, TCP, "198.18.1.2", "198.18.1.1", dport=22),
              Probe(Hook.INPUT, V4, TCP, "198.18.1.2", "198.18.1.1", dport=23)]
    assert check_ruleset(ruleset, probes, interfaces=("eth0", "eth1")) == \
        [PASSED, PASSED, DROPPED]
    # Without them, `iif "eth0"` names an interface R does not have.
    with pytest.raises(KernelError, match="ruleset:8:"):
        check_ruleset(ruleset, probes)
    with pytest.raises(ConfigError):
        check_ruleset(ruleset, probes, interfaces=("eth0", "eth0"))


def test_what_the_bare_harness_cannot_deliver_is_untestable() -> None:
    probes = [
        Probe(Hook.FORWARD, V4, TCP, "198.18.1.2", "127.0.0.5", dport=22),  # loopback dst
        Probe(Hook.INPUT, V4, TCP, "127.0.0.9", "198.18.1.1", dport=22),  # martian source
        Probe(Hook.FORWARD, V6, TCP, "fe80::2", "2001:db8:2::5", dport=22),  # link-local src
        Probe(Hook.INPUT, V4, UDP, "198.18.1.2", "224.0.0.251", 5353, 5353),  # multicast: ok
        Probe(Hook.INPUT, V6, UDP, "fe80::2", "ff02::fb", 5353, 5353),
        Probe(Hook.INPUT, V6, TCP, "fe80::2", "fe80::1:1", dport=22),
    ]
    expected = [UNTESTABLE, UNTESTABLE, UNTESTABLE, PASSED, PASSED, PASSED]
    assert check_ruleset(ACCEPT_ALL, probes) == expected
    drop_all = ACCEPT_ALL.replace("policy accept", "policy drop")
    assert check_ruleset(drop_all, probes) == [UNTESTABLE] * 3 + [DROPPED] * 3


def test_conflicting_probes_go_to_separate_rounds() -> None:
    """198.18.2.2 is local for the INPUT probe and remote for the FORWARD one."""
    ruleset = RULESET.replace("ip daddr 198.18.1.1 tcp dport 22", "tcp dport 22")
    probes = [Probe(Hook.INPUT, V4, TCP, "198.18.1.2", "198.18.2.2", dport=22),
              Probe(Hook.FORWARD, V4, TCP, "198.18.1.2", "198.18.2.2", dport=80),
              Probe(Hook.FORWARD, V4, TCP, "198.18.1.2", "198.18.2.2", dport=22),
              Probe(Hook.INPUT, V4, TCP, "198.18.1.2", "198.18.2.2", dport=80)]
    assert len(fwcheck._plan(probes)) == 2
    assert check_ruleset(ruleset, probes) == [PASSED, PASSED, DROPPED, DROPPED]


def test_a_packet_lost_in_the_harness_is_resent() -> None:
    original = fwcheck._Harness.send
    calls: collections.Counter[str] = collections.Counter()

    def lossy(self: fwcheck._Harness, packets: Iterable[fwcheck._Packet]
              ) -> tuple[dict[int, str], int]:
        packets = list(packets)
        calls[self.r.name] += 1
        if calls[self.r.name] > 1:
            return original(self, packets)
        kept = [pk for pk in packets  # lose a third of what P sends
                if pk.index % 3 or pk.probe.hook not in (Hook.INPUT, Hook.FORWARD)]
        errors, from_p = original(self, kept)
        return errors, from_p + len(packets) - len(kept)  # "sent", never arrived

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fwcheck._Harness, "send", lossy)
        verdicts = check_ruleset(RULESET, ALLOWED + DENIED)
    assert _names(verdicts) == ["PASSED"] * len(ALLOWED) + ["DROPPED"] * len(DENIED)
    assert max(calls.values()) == 2


def test_a_packet_always_lost_is_untestable_not_dropped() -> None:
    original = fwcheck._Harness.send

    def loses_first(self: fwcheck._Harness, packets: Iterable[fwcheck._Packet]
                    ) -> tuple[dict[int, str], int]:
        packets = list(packets)
        if self.role != "ruleset":
            return original(self, packets)
        kept = [pk for pk in packets if pk.index != 0]
        errors, from_p = original(self, kept)
        return errors, from_p + len(packets) - len(kept)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fwcheck._Harness, "send", loses_first)
        verdicts = check_ruleset(RULESET, [DENIED[0], ALLOWED[0]])
    assert verdicts == [UNTESTABLE, PASSED]


@pytest.mark.parametrize("where", ["_open_sockets", "send", "observe"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_no_namespace_survives_an_exception(where: str, error: type[BaseException]) -> None:
    def explode(*_args: object) -> None:
        raise error("forced")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fwcheck._Harness, where, explode)
        with pytest.raises(error, match="forced"):
            check_ruleset(RULESET, ALLOWED)
    # the autouse fixture checks that no namespace is left


def test_no_namespace_survives_ctrl_c() -> None:
    """SIGINT while the workers are busy: the main thread gets KeyboardInterrupt, stops both
    runs and waits for their clean-up before raising."""
    original = fwcheck._Harness.send

    def interrupted(self: fwcheck._Harness, packets: Iterable[fwcheck._Packet]
                    ) -> tuple[dict[int, str], int]:
        # As Ctrl-C does: the signal reaches the main thread, which waits on the workers.
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
        time.sleep(0.2)  # the main thread handles it meanwhile
        return original(self, packets)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fwcheck._Harness, "send", interrupted)
        with pytest.raises(KeyboardInterrupt):
            check_ruleset(RULESET, ALLOWED)


def test_timeout_bounds_the_check() -> None:
    started = time.monotonic()
    with pytest.raises(KernelError, match="timed out"):
        check_ruleset(RULESET, ALLOWED, timeout=0.005)
    assert time.monotonic() - started < 2.0


def test_namespaces_of_dead_processes_are_removed() -> None:
    with open("/proc/sys/kernel/pid_max", encoding="ascii") as handle:
        dead = int(handle.read()) + 1  # no process can have it
    stale = f"{fwcheck.NS_PREFIX}{dead}-0-r"
    sh("ip", "netns", "add", stale)
    try:
        check_ruleset(RULESET, ALLOWED[:1])  # too young: may be a live run in another pidns
        assert os.path.exists(os.path.join(NETNS_RUN_DIR, stale))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(fwcheck, "_STALE_AFTER", 0.0)
            check_ruleset(RULESET, ALLOWED[:1])
        assert not os.path.exists(os.path.join(NETNS_RUN_DIR, stale))
    finally:
        sh("ip", "netns", "del", stale, check=False)


def test_bad_probes_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"probes\[1\]\.dst"):
        check_ruleset(RULESET, [ALLOWED[0], Probe(Hook.INPUT, V4, TCP, "198.18.1.2",
                                                  "2001:db8::1", dport=22)])
    with pytest.raises(ConfigError, match=r"probes\[0\]\.dport"):
        check_ruleset(RULESET, [Probe(Hook.INPUT, V4, TCP, "198.18.1.2", "198.18.1.1",
                                      dport=70000)])


def test_live_ruleset_leaves_out_conntrails_tables(netns_factory: NetnsFactory) -> None:
    ns = netns_factory.new("fw")
    ns.nft("""
table inet conntrail {
    chain track { type filter hook prerouting priority raw + 1; policy accept; ct state new; }
}
table inet conntrail_fwcheck {
    chain c { type filter hook input priority 0; policy drop; }
}
table inet conntrail_policy {
    chain c { type filter hook input priority 0; policy accept; }
}
table ip keep {
    chain input { type filter hook input priority 0; policy drop; tcp dport 22 accept; }
}
""")
    text = live_ruleset(resolve(ns.name))
    assert "table ip keep {" in text
    assert "table inet conntrail {" not in text and "conntrail_fwcheck" not in text
    assert "table inet conntrail_policy {" in text  # a ruleset we emitted is the user's
    assert "tcp dport 22 accept" in text
    # What it returns loads again, so the live firewall can be checked as it stands.
    probes = [Probe(Hook.INPUT, V4, TCP, "198.18.1.2", "198.18.1.1", dport=22),
              Probe(Hook.INPUT, V4, TCP, "198.18.1.2", "198.18.1.1", dport=23)]
    assert check_ruleset(text, probes) == [PASSED, DROPPED]


def _many(count: int) -> tuple[list[Probe], list[Verdict]]:
    """`count` probes over every hook and both families, with their verdicts under RULESET."""
    probes: list[Probe] = []
    expected: list[Verdict] = []
    for i in range(count):
        ok = i % 2 == 0
        kind = i // 2 % 5
        if kind == 0:
            probe = Probe(Hook.FORWARD, V4, TCP, "198.18.1.2", "198.18.2.2",
                          dport=80 if ok else 1000 + i)
        elif kind == 1:
            probe = Probe(Hook.FORWARD, V6, UDP, f"2001:db8:1::{i:x}", f"2001:db8:2::{i:x}",
                          dport=53 if ok else 54)
        elif kind == 2:
            probe = Probe(Hook.INPUT, V4, TCP, f"198.18.{4 + i // 250}.{i % 250 + 1}",
                          "198.18.1.1" if ok else "198.18.1.2", dport=22)
        elif kind == 3:
            probe = Probe(Hook.OUTPUT, V4, ICMP, "198.18.1.1",
                          "198.18.2.2" if ok else f"198.19.{i // 250}.{i % 250 + 1}")
        else:
            probe = Probe(Hook.LOCAL, V4, UDP, "127.0.0.1", "127.0.0.1", dport=i) if ok \
                else Probe(Hook.INPUT, V6, TCP, "2001:db8:5::1", "2001:db8:1::1", dport=i)
        probes.append(probe)
        expected.append(PASSED if ok else DROPPED)
    return probes, expected


def test_two_thousand_probes_in_under_three_seconds() -> None:
    probes, expected = _many(2000)
    started = time.monotonic()
    verdicts = check_ruleset(RULESET, probes, timeout=10)
    elapsed = time.monotonic() - started
    print(f"\nfwcheck: 2000 probes (ruleset + calibration) in {elapsed:.2f} s")
    assert verdicts == expected
    assert elapsed < 3.0

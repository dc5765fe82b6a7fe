"""Text lines: the default layout, templates, conntrack-logger aliases, time formats."""

from __future__ import annotations

import pytest
from tests.unit.formats.sample import ICMP, PLAIN_UDP6, SNAT_TCP, T0

from conntrail.errors import ConfigError
from conntrail.formats.text import TextFormat
from conntrail.model import LossNotice


def test_default_line_with_nat_reply_and_counters() -> None:
    line = TextFormat()(SNAT_TCP).decode()
    assert line == (
        "2026-11-22T02:05:59.361752Z: ipv4/tcp 198.18.1.2/40000 > 198.18.2.2/443 :: destroy "
        "TIME_WAIT snat reply 198.18.2.2/443 > 198.18.2.1/61000 mark=0x2a packets=11 "
        "bytes=1600 duration=1.500s netns=qrouter-1\n")


def test_default_line_without_nat_is_short() -> None:
    assert TextFormat()(PLAIN_UDP6).decode() == (
        "2026-11-22T02:05:57.861752Z: ipv6/udp 2001:db8::1/5000 > 2001:db8::2/53 :: new\n")


def test_icmp_identity() -> None:
    assert "198.18.1.2 > 198.18.2.2 type=8 code=0 id=7 :: new" in TextFormat()(ICMP).decode()


def test_conntrack_logger_template_names() -> None:
    fmt = TextFormat("{ts}: {ev.proto} {ev.src}/{ev.sport} > {ev.dst}/{ev.dport}", "epoch")
    assert fmt(PLAIN_UDP6) == f"{T0 // 10**9}: ipv6/udp 2001:db8::1/5000 > 2001:db8::2/53\n" \
        .encode()


@pytest.mark.parametrize(("spec", "expected"), [
    ("epoch-ms", str(T0 // 10**6)), ("epoch-ns", str(T0)), ("%H:%M", "02:05"),
])
def test_time_formats(spec: str, expected: str) -> None:
    assert TextFormat("{ts}", spec)(PLAIN_UDP6).decode() == expected + "\n"


def test_every_field_renders() -> None:
    from conntrail.formats.fields import FIELDS

    for name in FIELDS:
        for event in (SNAT_TCP, PLAIN_UDP6, ICMP):
            assert TextFormat("{" + name + "}")(event).endswith(b"\n")


def test_unknown_field_names_the_option() -> None:
    with pytest.raises(ConfigError, match=r"--format: unknown field \{sprot\}"):
        TextFormat("{sprot}")


def test_broken_template_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--format: invalid template"):
        TextFormat("{src")


def test_loss_notice_line() -> None:
    line = TextFormat()(LossNotice("ns1", "enobufs", 12, T0)).decode()
    assert line == "2026-11-22T02:05:57.861752Z: !! lost 12 events in netns ns1 (enobufs); " \
        "resync dump follows\n"

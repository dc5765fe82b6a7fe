"""The ulogd profile against real ulogd2 2.0.8 output (tests/data/ulogd), plus edge cases."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.unit.formats.sample import ICMP, PLAIN_UDP6, SNAT_TCP, T0

from conntrail.formats import ulogd
from conntrail.formats.ulogd import UlogdFormat, inet_ntop6, ulogd_timestamp, utc_offset
from conntrail.model import (
    AF_INET,
    AF_INET6,
    Counters,
    CtStatus,
    EventKind,
    Flow,
    FlowEvent,
    FlowTuple,
    LossNotice,
    TableSnapshot,
)

GOLDEN = Path(__file__).resolve().parents[2] / "data" / "ulogd" / "ulogd-2.0.8.jsonl"
NEW, DESTROY = EventKind.NEW, EventKind.DESTROY
SNAT = CtStatus.CONFIRMED | CtStatus.ASSURED | CtStatus.SEEN_REPLY | CtStatus.SRC_NAT
FORMAT = UlogdFormat()


def _golden() -> dict[str, str]:
    cases: dict[str, str] = {}
    name = ""
    for line in GOLDEN.read_text().splitlines():
        if line.startswith("# case: "):
            name = line.removeprefix("# case: ")
        elif line and not line.startswith("#"):
            cases[name] = line
    return cases


@pytest.fixture
def tz(request: pytest.FixtureRequest) -> Iterator[None]:
    """Run under a given TZ (param), restoring the process's zone and the stamp cache."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = getattr(request, "param", "UTC")
    time.tzset()
    ulogd._STAMPS.clear()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()
        ulogd._STAMPS.clear()


def _ns(sec: int, usec: int) -> int:
    """Epoch ns with a sub-microsecond rest, so truncation to usec is exercised."""
    return sec * 1_000_000_000 + usec * 1000 + 417


def _tcp(family: int, proto: int, orig: tuple[str, str, int, int],
         reply: tuple[str, str, int, int], **flow: object) -> Flow:
    return Flow(orig=FlowTuple(family, proto, *orig), reply=FlowTuple(family, proto, *reply),
                **flow)  # type: ignore[arg-type]


def _icmp(family: int, src: str, dst: str, reply_dst: str, types: tuple[int, int],
          **flow: object) -> Flow:
    proto = 1 if family == AF_INET else 58
    return Flow(orig=FlowTuple(family, proto, src, dst, icmp_type=types[0], icmp_code=0,
                               icmp_id=26336),
                reply=FlowTuple(family, proto, dst, reply_dst, icmp_type=types[1],
                                icmp_code=0, icmp_id=26336),
                **flow)  # type: ignore[arg-type]


# The flows of the recording, as `conntrack -L` showed them (see the golden file's header).
TCP4_SNAT = _tcp(AF_INET, 6, ("198.18.1.2", "198.18.2.2", 45518, 9000),
                 ("198.18.2.2", "198.18.2.1", 9000, 45518), status=SNAT, ct_id=2388711573)
TCP6 = _tcp(AF_INET6, 6, ("2001:db8:1::2", "2001:db8:2::2", 59138, 9001),
            ("2001:db8:2::2", "2001:db8:1::2", 9001, 59138), ct_id=3292399031)
TCP4_DNAT = _tcp(AF_INET, 6, ("198.18.1.2", "198.18.1.1", 39210, 7777),
                 ("198.18.2.2", "198.18.2.1", 9000, 39210),
                 status=SNAT | CtStatus.DST_NAT, ct_id=936878015)
UDP4_SNAT = _tcp(AF_INET, 17, ("198.18.1.2", "198.18.2.2", 45431, 5353),
                 ("198.18.2.2", "198.18.2.1", 5353, 45431), status=SNAT, ct_id=777368935)
ICMP4 = _icmp(AF_INET, "198.18.1.2", "198.18.2.2", "198.18.2.1", (8, 0), ct_id=607157670)
ICMP6 = _icmp(AF_INET6, "2001:db8:1::2", "2001:db8:2::2", "2001:db8:1::2", (128, 129),
              ct_id=2293705872)
ICMP4_UNTIMED = _icmp(AF_INET, "198.18.1.2", "198.18.2.2", "198.18.2.1", (8, 0),
                      ct_id=2166400347)


def _new(flow: Flow, received_us: int) -> FlowEvent:
    """A NEW as the kernel sends it: no counters, no start (ulogd then takes its clock)."""
    return FlowEvent(NEW, flow, "router", _ns(1795332336, received_us))


def _destroy(flow: Flow, start_us: int, stop_us: int, orig: Counters,
             reply: Counters, mark: int | None = None) -> FlowEvent:
    done = flow._replace(start_ns=_ns(1795332336, start_us), stop_ns=_ns(1795332337, stop_us),
                         counters_orig=orig, counters_reply=reply, mark=mark)
    return FlowEvent(DESTROY, done, "router", _ns(1795332337, 950_000))


CASES: dict[str, FlowEvent] = {
    "tcp4_snat_new": _new(TCP4_SNAT, 889543),
    "tcp6_new": _new(TCP6, 889874),
    "tcp4_dnat_new": _new(TCP4_DNAT, 890021),
    "udp4_snat_new": _new(UDP4_SNAT, 890122),
    "icmp4_new": _new(ICMP4, 897593),
    "icmp6_new": _new(ICMP6, 899045),
    "icmp4_destroy": _destroy(ICMP4, 897565, 906703, Counters(1, 84), Counters(1, 84)),
    "udp4_snat_destroy": _destroy(UDP4_SNAT, 890106, 906803, Counters(1, 32),
                                  Counters(1, 32)),
    "tcp6_destroy_mark": _destroy(TCP6, 889829, 906840, Counters(5, 372), Counters(5, 372),
                                  mark=42),
    "tcp4_dnat_destroy": _destroy(TCP4_DNAT, 890000, 906868, Counters(6, 324),
                                  Counters(4, 220)),
    "tcp4_snat_destroy": _destroy(TCP4_SNAT, 889435, 906891, Counters(6, 324),
                                  Counters(4, 220)),
    "icmp6_destroy": _destroy(ICMP6, 899014, 906916, Counters(1, 104), Counters(1, 104)),
    # nf_conntrack_acct/timestamp off: no counters, no kernel times; ulogd uses its clock.
    "icmp4_new_untimed": FlowEvent(NEW, ICMP4_UNTIMED, "router", _ns(1795332338, 911267)),
    "icmp4_destroy_untimed": FlowEvent(DESTROY, ICMP4_UNTIMED, "router",
                                       _ns(1795332339, 914493)),
}


def _as_jansson(line: bytes) -> str:
    """Our line re-serialised with jansson's separators: equal text means equal keys, order,
    value types and values."""
    return json.dumps(orjson.loads(line))


def test_golden_file_covers_every_case() -> None:
    assert set(_golden()) == {*CASES, "tcp4_snat_new_tz"}


@pytest.mark.usefixtures("tz")
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_recorded_ulogd_output(case: str) -> None:
    line = FORMAT(CASES[case])
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert _as_jansson(line) == _golden()[case]


@pytest.mark.parametrize("tz", ["America/St_Johns"], indirect=True)
@pytest.mark.usefixtures("tz")
def test_local_time_with_negative_half_hour_offset() -> None:
    # The second ulogd of the recording read the same event 39 µs earlier.
    event = _new(TCP4_SNAT, 889504)
    assert _as_jansson(FORMAT(event)) == _golden()["tcp4_snat_new_tz"]


@pytest.mark.parametrize(("gmtoff", "text"), [
    (0, ""), (3600, "+0100"), (-18000, "-0500"), (19800, "+0530"), (-12600, "-0330"),
    (45900, "+1245"),
    (-1800, "+0030"),  # C's "%+03d" of a truncated 0 hours: ulogd loses the sign; so do we
])
def test_utc_offset_as_ulogd_computes_it(gmtoff: int, text: str) -> None:
    assert utc_offset(gmtoff) == text


@pytest.mark.usefixtures("tz")
def test_timestamp_falls_back_to_event_time_without_receipt_time() -> None:
    event = FlowEvent(NEW, TCP4_SNAT._replace(start_ns=T0))
    doc = orjson.loads(FORMAT(event))
    assert doc["timestamp"] == "2026-11-22T02:05:57"
    assert (doc["flow.start.sec"], doc["flow.start.usec"]) == (1795313157, 861752)
    assert ulogd_timestamp(T0) == "2026-11-22T02:05:57"


@pytest.mark.usefixtures("tz")
@pytest.mark.parametrize("kind", [EventKind.UPDATE, EventKind.DUMP])
def test_update_and_dump_are_event_2_with_kernel_start_only(kind: EventKind) -> None:
    doc = orjson.loads(FORMAT(SNAT_TCP._replace(kind=kind)))
    assert doc["ct.event"] == 2
    assert (doc["flow.start.sec"], doc["flow.start.usec"]) == (1795313157, 861752)
    assert "flow.end.sec" not in doc and "flow.end.usec" not in doc
    no_start = orjson.loads(FORMAT(PLAIN_UDP6._replace(kind=kind)))
    assert "flow.start.sec" not in no_start


@pytest.mark.usefixtures("tz")
def test_destroy_prefers_kernel_stop_then_event_stamp() -> None:
    doc = orjson.loads(FORMAT(SNAT_TCP))
    assert (doc["flow.end.sec"], doc["flow.end.usec"]) == (1795313159, 361752)
    stamped = SNAT_TCP._replace(flow=SNAT_TCP.flow._replace(stop_ns=None,
                                                             event_ns=T0 + 7_000_000_123))
    doc = orjson.loads(FORMAT(stamped))
    assert (doc["flow.end.sec"], doc["flow.end.usec"]) == (1795313164, 861752)
    assert doc["timestamp"] == "2026-11-22T02:05:59"  # receipt time, not the event's


@pytest.mark.usefixtures("tz")
@pytest.mark.parametrize(("proto", "ported"), [(132, True), (33, True), (136, True),
                                               (47, False), (2, False)])
def test_ports_only_for_protocols_ulogd_reads_ports_of(proto: int, ported: bool) -> None:
    flow = _tcp(AF_INET, proto, ("10.0.0.1", "10.0.0.2", 1000, 2000),
                ("10.0.0.2", "10.0.0.1", 2000, 1000), ct_id=5)
    doc = orjson.loads(FORMAT(FlowEvent(NEW, flow, "", T0)))
    keys = {"orig.l4.sport", "orig.l4.dport", "reply.l4.sport", "reply.l4.dport"}
    assert (keys <= doc.keys()) is ported and (keys & doc.keys() == set()) is not ported
    assert doc["orig.ip.protocol"] == doc["reply.ip.protocol"] == proto
    assert "icmp.type" not in doc


@pytest.mark.usefixtures("tz")
def test_icmpv6_has_no_icmp_keys_and_icmp_has_no_ports() -> None:
    icmp = orjson.loads(FORMAT(ICMP))
    assert (icmp["icmp.type"], icmp["icmp.code"]) == (8, 0)
    assert not any(key.endswith(("sport", "dport")) for key in icmp)
    icmp6 = orjson.loads(FORMAT(CASES["icmp6_new"]))
    assert not any(key.startswith("icmp") for key in icmp6)


@pytest.mark.usefixtures("tz")
def test_nothing_conntrail_only_leaks_into_the_document() -> None:
    doc = orjson.loads(FORMAT(SNAT_TCP))
    assert doc["ct.mark"] == 42 and doc["ct.id"] == 99
    assert not [key for key in doc if "conntrail" in key or "netns" in key]
    assert "qrouter-1" not in doc.values() and "TIME_WAIT" not in doc.values()


@pytest.mark.usefixtures("tz")
def test_flow_without_reply_tuple_keeps_counters_only() -> None:
    flow = Flow(orig=FlowTuple(AF_INET, 6, "10.0.0.1", "10.0.0.2", 1, 2), ct_id=1)
    doc = orjson.loads(FORMAT(FlowEvent(NEW, flow, "", T0)))
    assert not [key for key in doc if key.startswith("reply.") and "raw" not in key]
    assert doc["reply.raw.pktlen"] == doc["reply.raw.pktcount"] == 0


@pytest.mark.usefixtures("tz")
def test_ipv4_mapped_addresses_written_as_glibc_does() -> None:
    # The codec writes ipaddress's text: ::ffff:c612:102 (Python 3.11) for ::ffff:198.18.1.2.
    mapped = ipaddress.IPv6Address("::ffff:198.18.1.2").compressed
    compat = ipaddress.IPv6Address("::198.18.1.2").compressed
    flow = _tcp(AF_INET6, 6, (mapped, "::1", 1, 2), ("::1", compat, 2, 1), ct_id=1)
    doc = orjson.loads(FORMAT(FlowEvent(NEW, flow, "", T0)))
    assert (doc["src_ip"], doc["dest_ip"]) == ("::ffff:198.18.1.2", "::1")
    assert doc["reply.ip.daddr.str"] == "::198.18.1.2"


@given(st.binary(min_size=16, max_size=16), st.integers(0, 3))
def test_inet_ntop6_equals_glibc(raw: bytes, zeroed: int) -> None:
    # Bias towards the interesting shapes: a zero prefix, ffff or 0 in word 5.
    raw = bytes(10) + (b"\xff\xff", b"\0\0", raw[10:12], raw[10:12])[zeroed] + raw[12:] \
        if zeroed < 3 else raw
    text = ipaddress.IPv6Address(raw).compressed
    glibc = socket.inet_ntop(socket.AF_INET6, raw)
    assert inet_ntop6(text) == glibc
    if not text.startswith("::"):  # the formatter converts only these
        assert text == glibc


@pytest.mark.usefixtures("tz")
def test_loss_notice_is_a_line_with_ulogd_header_and_conntrail_keys() -> None:
    doc = json.loads(FORMAT(LossNotice("router", "enobufs", 17, T0)))
    assert doc == {"timestamp": "2026-11-22T02:05:57", "dvc": "Netfilter",
                   "conntrail.lost": 17, "conntrail.reason": "enobufs",
                   "conntrail.netns": "router"}
    unknown = json.loads(FORMAT(LossNotice("", "enobufs", None, T0)))
    assert unknown["conntrail.lost"] is None and "conntrail.netns" not in unknown


def test_table_snapshot_writes_nothing() -> None:
    assert FORMAT(TableSnapshot("router", 3, T0)) == b""


def test_not_a_record_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="not a record"):
        FORMAT("text")  # type: ignore[arg-type]

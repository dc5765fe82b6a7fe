"""Dump views (grouping, ports only, order), the state file, and the dump formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.unit.inventory.test_aggregate import LOCALITY, T0, S, flow_event

from conntrail.errors import ConfigError
from conntrail.formats.inventory import DumpInfo, csv_text, json_document, table_lines
from conntrail.inventory import persist
from conntrail.inventory.aggregate import Inventory
from conntrail.inventory.model import ANY_FAMILY, Direction, InventoryEntry
from conntrail.inventory.view import ViewOptions, build_view, parse_group_by
from conntrail.model import AF_INET, AF_INET6, Counters, CtStatus, EventKind


def entry(src: str, dst: str, dport: int | None, *, proto: int = 6, flows: int = 1,
          direction: Direction = Direction.FORWARDED, confirmed: bool = True,
          at: int = T0, icmp: tuple[int, int] | None = None) -> InventoryEntry:
    family = AF_INET6 if ":" in src else AF_INET
    return InventoryEntry("", direction, family, proto, src, dst, None, dport,
                          icmp[0] if icmp else None, icmp[1] if icmp else None, at, at, flows,
                          confirmed, 0, 0)


def test_sorted_like_conntracker_protocol_then_family_then_addresses() -> None:
    entries = [
        entry("2001:db8:1::2", "2001:db8:2::2", 80),
        entry("198.18.1.2", "198.18.2.2", None, proto=1, icmp=(8, 0)),
        entry("198.18.1.10", "198.18.2.2", 53, proto=17),
        entry("198.18.1.9", "198.18.2.2", 443),
        entry("198.18.1.10", "198.18.2.2", 80),
    ]
    ordered = build_view(entries, ViewOptions())
    assert [(e.family, e.proto, e.src, e.dport) for e in ordered] == [
        (AF_INET, 6, "198.18.1.9", 443), (AF_INET, 6, "198.18.1.10", 80),  # numeric order
        (AF_INET, 17, "198.18.1.10", 53), (AF_INET, 1, "198.18.1.2", None),
        (AF_INET6, 6, "2001:db8:1::2", 80)]


def test_group_by_subnet_sums_and_widens() -> None:
    entries = [entry("198.18.1.2", "198.18.2.2", 80, flows=2, at=T0, confirmed=False),
               entry("198.18.1.3", "198.18.2.2", 80, flows=3, at=T0 + S),
               entry("2001:db8:1::2", "2001:db8:2::2", 80),
               entry("198.18.1.3", "198.18.2.2", 443)]
    view = build_view(entries, ViewOptions(24, 64))
    assert [(e.src, e.dst, e.dport, e.flows, e.confirmed) for e in view] == [
        ("198.18.1.0/24", "198.18.2.0/24", 80, 5, True),
        ("198.18.1.0/24", "198.18.2.0/24", 443, 1, True),
        ("2001:db8:1::/64", "2001:db8:2::/64", 80, 1, True)]
    assert (view[0].first_ns, view[0].last_ns) == (T0, T0 + S)


def test_ports_only_and_merged_families() -> None:
    entries = [entry("198.18.1.2", "198.18.2.2", 22, direction=Direction.INBOUND),
               entry("198.18.1.3", "198.18.2.2", 22, direction=Direction.INBOUND),
               entry("2001:db8:1::2", "2001:db8:2::2", 22, direction=Direction.INBOUND)]
    by_port = build_view(entries, ViewOptions(ports_only=True))
    assert [(e.family, e.src, e.dst, e.flows) for e in by_port] == [
        (AF_INET, "", "", 2), (AF_INET6, "", "", 1)]
    merged = build_view(entries, ViewOptions(ports_only=True, merge_families=True))
    assert [(e.family, e.flows) for e in merged] == [(ANY_FAMILY, 3)]


def test_only_ports_seen_over_both_families_merge() -> None:
    entries = [entry("198.18.1.2", "198.18.2.2", 22, direction=Direction.INBOUND),
               entry("2001:db8:1::2", "2001:db8:2::2", 22, direction=Direction.INBOUND),
               entry("198.18.1.2", "198.18.2.2", 25, direction=Direction.INBOUND),
               entry("198.18.1.2", "198.18.2.2", None, proto=1, icmp=(8, 0)),
               entry("2001:db8:1::2", "2001:db8:2::2", None, proto=58, icmp=(128, 0))]
    merged = build_view(entries, ViewOptions(ports_only=True, merge_families=True))
    assert sorted((e.family, e.proto, e.dport) for e in merged) == [
        (ANY_FAMILY, 6, 22), (AF_INET, 1, None), (AF_INET, 6, 25), (AF_INET6, 58, None)]


@pytest.mark.parametrize(("text", "expected"), [("host", (32, 128)), ("/24", (24, 64)),
                                                 ("/16,/48", (16, 48)), ("24", (24, 64))])
def test_group_by_parsing(text: str, expected: tuple[int, int]) -> None:
    assert parse_group_by(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("/33", "0-32"), ("/24,/129", "0-128"), ("/x", "expected host"),
    ("/1,/2,/3", "expected host")])
def test_group_by_errors_name_the_option(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_group_by(text)
    assert caught.value.path == "--group-by"


def test_merge_families_needs_ports_only() -> None:
    with pytest.raises(ConfigError, match="--ports-only"):
        ViewOptions(merge_families=True)


def _filled() -> Inventory:
    inventory = Inventory(lambda _ns: LOCALITY)
    inventory.add(flow_event("198.18.1.1", "198.18.2.2", 40000, 443, status=CtStatus.ASSURED))
    inventory.add(flow_event("2001:db8:1::1", "2001:db8:2::2", 40000, 53, proto=17,
                             netns="gw", kind=EventKind.DESTROY, counters=Counters(1, 80)))
    return inventory


def test_state_round_trip_merges_into_another_numbering(tmp_path: Path) -> None:
    path = tmp_path / "inventory.state"
    persist.save(path, _filled().snapshot(), T0)
    other = Inventory(lambda _ns: LOCALITY)
    other.add(flow_event("198.18.1.1", "198.18.2.2", 40000, 22, netns="gw"))  # gw is 0 here
    persist.load(path, other)
    persist.load(path, other)  # loaded twice: counts add up, entries do not duplicate
    entries = sorted(other.entries(), key=lambda e: (e.netns, e.dport or 0))
    assert [(e.netns, e.dport, e.flows, e.confirmed, e.bytes) for e in entries] == [
        ("", 443, 2, True, 0), ("gw", 22, 1, False, 0), ("gw", 53, 2, False, 320)]


def test_a_missing_state_file_is_an_empty_start(tmp_path: Path) -> None:
    inventory = Inventory(lambda _ns: LOCALITY)
    assert persist.load(tmp_path / "absent", inventory) == 0
    assert len(inventory) == 0


@pytest.mark.parametrize(("damage", "where"), [
    (lambda data: b"garbage" + data[7:], "byte 0: not a conntrail"),
    (lambda data: data[:-9] + data[-8:], "checksum mismatch"),
    (lambda data: data[:60], "checksum mismatch"),
    (lambda data: data[:25], "truncated"),
])
def test_a_damaged_state_file_is_refused_with_the_offset(tmp_path: Path, damage: object,
                                                         where: str) -> None:
    path = tmp_path / "inventory.state"
    persist.save(path, _filled().snapshot(), T0)
    assert callable(damage)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ConfigError, match=where) as caught:
        persist.load(path, Inventory(lambda _ns: LOCALITY))
    assert caught.value.path == "--state" and "--reset" in str(caught.value)


def test_a_record_overrunning_the_body_names_its_offset() -> None:
    data = persist.encode_state(_filled().snapshot(), T0)
    body = bytearray(data[:-4])
    first_record = body.index(b"}") + 1
    body[first_record:first_record + 2] = (60000).to_bytes(2, "little")
    import zlib

    damaged = bytes(body) + zlib.crc32(bytes(body)).to_bytes(4, "little")
    with pytest.raises(persist.StateError, match=f"byte {first_record}: record of 60000"):
        persist.decode_state(damaged, Inventory(lambda _ns: LOCALITY))


INFO = DumpInfo(T0 + 60 * S, 12, 0, "signal")


def test_table_dump() -> None:
    entries = build_view(_filled().entries(), ViewOptions())
    lines = list(table_lines(entries, INFO))
    assert lines[0] == ("# conntrail inventory at 2026-11-18T11:07:40Z (signal): 2 entries, "
                        "1 confirmed, from 12 events")
    assert lines[1] == "# netns (host)"
    assert lines[2].split() == ["PROTO", "DIR", "SOURCE", "DESTINATION", "PORT", "FLOWS",
                                "CONFIRMED", "FIRST", "SEEN", "LAST", "SEEN", "PACKETS",
                                "BYTES"]
    assert lines[3].split() == ["TCPv4", "out", "198.18.1.1", "198.18.2.2", "443", "1", "yes",
                                "2026-11-18T11:06:40Z", "2026-11-18T11:06:40Z", "0", "0"]
    assert lines[4] == "# netns gw"
    assert lines[6].split()[:5] == ["UDPv6", "out", "2001:db8:1::1", "2001:db8:2::2", "53"]


def test_table_dump_warns_of_losses() -> None:
    lines = list(table_lines([], DumpInfo(T0, 5, 3, "exit")))
    assert "3 events LOST" in lines[0]


def test_json_and_csv_dumps() -> None:
    entries = build_view(_filled().entries(), ViewOptions())
    doc = json.loads(json_document(entries, INFO))
    assert doc["inventory"] == {"taken": "2026-11-18T11:07:40.000000Z", "reason": "signal",
                                "entries": 2, "events": 12, "lost": 0}
    first = doc["entries"][0]
    assert first["network"] == {"type": "ipv4", "transport": "tcp", "iana_number": "6"}
    assert first["source"] == {"address": "198.18.1.1"}
    assert first["destination"] == {"address": "198.18.2.2", "port": 443}
    assert (first["direction"], first["confirmed"], first["flows"]) == ("outbound", True, 1)
    rows = csv_text(entries).splitlines()
    assert rows[0].startswith("netns,direction,family,proto,src,sport,dst,dport")
    assert rows[2].split(",")[:8] == ["gw", "outbound", "ipv6", "udp", "2001:db8:1::1", "",
                                      "2001:db8:2::2", "53"]

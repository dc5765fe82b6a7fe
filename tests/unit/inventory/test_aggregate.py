"""The inventory's ingest (sans-IO): keys, directions, ephemeral ports, confirmation, counts."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from conntrail.inventory.aggregate import Inventory, SourcePorts, classify
from conntrail.inventory.model import Direction, InventoryEntry
from conntrail.model import (
    AF_INET,
    AF_INET6,
    Counters,
    CtStatus,
    EventKind,
    Flow,
    FlowEvent,
    FlowTuple,
)

S = 1_000_000_000
T0 = 1_795_000_000 * S
REPLIED = CtStatus.CONFIRMED | CtStatus.SEEN_REPLY


@dataclass(frozen=True)
class FakeLocality:
    """A namespace owning 198.18.1.1 and 2001:db8:1::1, listening on TCP 22 and 8080."""

    addresses: frozenset[str] = frozenset({"198.18.1.1", "2001:db8:1::1", "127.0.0.1",
                                           "::1"})
    port_range: tuple[int, int] = (32768, 60999)
    tcp_listening: frozenset[int] = frozenset({22, 8080})
    udp_bound: frozenset[int] = frozenset({5353})
    broadcasts: frozenset[str] = field(default=frozenset({"198.18.1.255"}))

    def is_local_destination(self, address: str) -> bool:
        return address in self.addresses or address in self.broadcasts or \
            address == "255.255.255.255"


LOCALITY = FakeLocality()


def flow_event(src: str, dst: str, sport: int | None, dport: int | None, *,
               proto: int = 6, kind: EventKind = EventKind.NEW, at: int = T0,
               status: CtStatus = CtStatus.CONFIRMED, reply_src: str | None = None,
               reply_sport: int | None = None, counters: Counters | None = None,
               netns: str = "", icmp: tuple[int, int] | None = None) -> FlowEvent:
    family = AF_INET6 if ":" in src else AF_INET
    icmp_type, icmp_code = icmp or (None, None)
    orig = FlowTuple(family, proto, src, dst, sport, dport, icmp_type, icmp_code)
    reply = FlowTuple(family, proto, reply_src or dst, src,
                      reply_sport if reply_sport is not None else dport, sport,
                      None if icmp is None else 0, icmp_code)
    flow = Flow(orig=orig, reply=reply, status=status, counters_orig=counters,
                counters_reply=counters, event_ns=at)
    return FlowEvent(kind, flow, netns, at)


def only(inventory: Inventory) -> InventoryEntry:
    entries = list(inventory.entries())
    assert len(entries) == 1, entries
    return entries[0]


@pytest.fixture
def inventory() -> Inventory:
    return Inventory(lambda _netns: LOCALITY)


def test_ephemeral_source_ports_collapse_into_one_entry(inventory: Inventory) -> None:
    for index in range(5):
        inventory.add(flow_event("198.18.1.1", "198.18.2.2", 40000 + index, 443,
                                 at=T0 + index * S))
    entry = only(inventory)
    assert (entry.direction, entry.src, entry.dst, entry.sport, entry.dport) == \
        (Direction.OUTBOUND, "198.18.1.1", "198.18.2.2", None, 443)
    assert (entry.flows, entry.first_ns, entry.last_ns) == (5, T0, T0 + 4 * S)


@pytest.mark.parametrize(("src", "dst", "sport", "dport", "proto", "kept"), [
    ("198.18.1.1", "198.18.2.2", 500, 500, 17, True),  # IKE: a fixed low port is the service
    ("198.18.1.1", "198.18.2.2", 32768, 443, 6, False),  # range bounds are inclusive
    ("198.18.1.1", "198.18.2.2", 60999, 8443, 6, False),
    ("198.18.1.1", "198.18.2.2", 5000, 8443, 6, True),  # out of range, both high: kept
    ("198.18.1.1", "198.18.2.2", 5000, 53, 17, False),  # above 1023 towards a well-known port
    ("198.18.9.9", "198.18.1.1", 5000, 8080, 6, False),  # towards a local TCP listener
    ("198.18.9.9", "198.18.1.1", 5000, 5353, 17, False),  # towards a local UDP socket
    ("198.18.9.9", "198.18.1.1", 5000, 9090, 6, True),  # nobody listens on 9090
    ("198.18.9.9", "198.18.8.8", 5000, 8080, 6, True),  # forwarded: listeners are not ours
])
def test_source_port_collapse_rules(inventory: Inventory, src: str, dst: str, sport: int,
                                    dport: int, proto: int, kept: bool) -> None:
    inventory.add(flow_event(src, dst, sport, dport, proto=proto))
    assert only(inventory).sport == (sport if kept else None)


def test_source_port_options() -> None:
    keep = Inventory(lambda _ns: LOCALITY, SourcePorts(keep_all=True))
    keep.add(flow_event("198.18.1.1", "198.18.2.2", 40000, 443))
    assert only(keep).sport == 40000
    wide = Inventory(lambda _ns: LOCALITY, SourcePorts(ephemeral=(1024, 65535)))
    wide.add(flow_event("198.18.1.1", "198.18.2.2", 5000, 8443))
    assert only(wide).sport is None


@pytest.mark.parametrize(("src", "dst", "direction"), [
    ("198.18.1.1", "198.18.2.2", Direction.OUTBOUND),
    ("198.18.2.2", "198.18.1.1", Direction.INBOUND),
    ("198.18.2.2", "198.18.3.3", Direction.FORWARDED),
    ("127.0.0.1", "127.0.0.1", Direction.LOCAL),
    ("127.0.0.1", "127.0.0.53", Direction.LOCAL),  # all of 127/8 is local, not only lo's address
    ("2001:db8:1::1", "2001:db8:2::2", Direction.OUTBOUND),
    ("0.0.0.0", "255.255.255.255", Direction.INBOUND),  # a DHCP discover reaching a server
    ("198.18.1.9", "198.18.1.255", Direction.INBOUND),  # subnet broadcast
    ("198.18.1.1", "198.18.1.255", Direction.OUTBOUND),  # our own broadcast goes out
])
def test_direction_from_the_namespace_point_of_view(src: str, dst: str,
                                                    direction: Direction) -> None:
    assert classify(LOCALITY, src, dst) is direction


def test_without_a_locality_only_loopback_is_told_apart() -> None:
    assert classify(None, "127.0.0.1", "127.0.0.1") is Direction.LOCAL
    assert classify(None, "::1", "::1") is Direction.LOCAL
    assert classify(None, "198.18.1.1", "198.18.2.2") is Direction.FORWARDED


def test_destination_is_the_one_after_dnat(inventory: Inventory) -> None:
    """A port forward 198.18.1.1:8022 → 198.18.5.5:22: the forward hook sees the latter."""
    inventory.add(flow_event("198.18.9.9", "198.18.1.1", 40000, 8022, reply_src="198.18.5.5",
                             reply_sport=22))
    entry = only(inventory)
    assert (entry.direction, entry.dst, entry.dport) == (Direction.FORWARDED, "198.18.5.5", 22)


def test_confirmed_when_either_reply_bit_is_seen_later(inventory: Inventory) -> None:
    inventory.add(flow_event("198.18.1.1", "198.18.2.2", 40000, 80))
    assert not only(inventory).confirmed
    inventory.add(flow_event("198.18.1.1", "198.18.2.2", 40000, 80, kind=EventKind.UPDATE,
                             status=REPLIED))
    entry = only(inventory)
    assert entry.confirmed and entry.flows == 1  # an update is not a new flow
    inventory.add(flow_event("198.18.1.1", "198.18.2.2", 40001, 80))
    assert only(inventory).confirmed  # stays confirmed


def test_assured_alone_confirms(inventory: Inventory) -> None:
    inventory.add(flow_event("198.18.1.1", "198.18.2.2", 40000, 80,
                             status=CtStatus.CONFIRMED | CtStatus.ASSURED))
    assert only(inventory).confirmed


def test_destroy_brings_counters_and_a_destroy_alone_is_a_flow(inventory: Inventory) -> None:
    counters = Counters(3, 300)
    inventory.add(flow_event("198.18.1.1", "198.18.2.2", 40000, 80, kind=EventKind.DESTROY,
                             counters=counters, at=T0 + S))
    entry = only(inventory)
    assert (entry.flows, entry.packets, entry.bytes) == (1, 6, 600)
    inventory.add(flow_event("198.18.1.1", "198.18.2.2", 40001, 80, kind=EventKind.NEW, at=T0))
    inventory.add(flow_event("198.18.1.1", "198.18.2.2", 40001, 80, kind=EventKind.DESTROY,
                             counters=counters, at=T0 + 2 * S))
    entry = only(inventory)
    assert (entry.flows, entry.packets, entry.first_ns, entry.last_ns) == \
        (2, 12, T0, T0 + 2 * S)


def test_a_whole_flow_counts_once_with_its_span_and_counters(inventory: Inventory) -> None:
    event = flow_event("198.18.1.1", "198.18.2.2", 40000, 80, kind=EventKind.DUMP,
                       counters=Counters(2, 100))
    event = event._replace(flow=event.flow._replace(start_ns=T0, stop_ns=T0 + 9 * S))
    inventory.add(event, whole=True)
    inventory.add(event, whole=True)
    entry = only(inventory)
    assert (entry.flows, entry.first_ns, entry.last_ns, entry.bytes) == \
        (2, T0, T0 + 9 * S, 400)


def test_icmp_keys_on_type_and_code(inventory: Inventory) -> None:
    for ident in range(3):
        inventory.add(flow_event("198.18.1.1", "198.18.2.2", None, None, proto=1,
                                 icmp=(8, 0), at=T0 + ident))
    entry = only(inventory)
    assert (entry.icmp_type, entry.icmp_code, entry.dport, entry.sport, entry.flows) == \
        (8, 0, None, None, 3)


def test_namespaces_and_protocols_are_separate_entries(inventory: Inventory) -> None:
    inventory.add(flow_event("198.18.1.1", "198.18.2.2", 40000, 53, proto=17))
    inventory.add(flow_event("198.18.1.1", "198.18.2.2", 40000, 53, proto=6))
    inventory.add(flow_event("198.18.1.1", "198.18.2.2", 40000, 53, proto=6, netns="gw"))
    assert len(inventory) == 3
    assert {entry.netns for entry in inventory.entries()} == {"", "gw"}


def test_a_snapshot_does_not_see_later_events(inventory: Inventory) -> None:
    inventory.add(flow_event("198.18.1.1", "198.18.2.2", 40000, 80))
    snapshot = inventory.snapshot()
    inventory.add(flow_event("198.18.1.1", "198.18.2.2", 40001, 80))
    inventory.add(flow_event("198.18.1.1", "198.18.2.3", 40001, 80))
    assert [entry.flows for entry in snapshot.entries()] == [1]
    assert len(snapshot) == 1 and len(inventory) == 2


def test_a_resync_dump_does_not_count_flows_again(inventory: Inventory) -> None:
    def dumped(sport: int) -> FlowEvent:
        return flow_event("198.18.1.1", "198.18.2.2", sport, 80, kind=EventKind.DUMP)

    inventory.add(dumped(40000))
    inventory.add(dumped(40001))  # the start-up dump: both flows count
    inventory.dump_complete("")
    inventory.add(flow_event("198.18.1.1", "198.18.2.2", 40002, 80))
    inventory.add(dumped(40000))  # a resync after losses lists them again
    inventory.add(dumped(40002))
    assert only(inventory).flows == 3
    inventory.add(flow_event("198.18.1.1", "198.18.2.3", 40003, 80, kind=EventKind.DUMP))
    assert len(inventory) == 2  # a flow only the resync shows (its NEW was lost) is kept


def test_a_flow_born_during_the_start_up_dump_counts_once(inventory: Inventory) -> None:
    """We subscribe before dumping: such a flow arrives as NEW and in the dump."""
    new = flow_event("198.18.1.1", "198.18.2.2", 40000, 80)
    new = new._replace(flow=new.flow._replace(ct_id=7))
    dumped = new._replace(kind=EventKind.DUMP)
    other = dumped._replace(flow=dumped.flow._replace(ct_id=8))
    for event in (new, dumped, other, dumped):
        inventory.add(event)
    assert only(inventory).flows == 2
    inventory.dump_complete("")
    inventory.add(new)  # after the dump, a NEW is a new flow (ids are reused)
    assert only(inventory).flows == 3

"""The inventory: every distinct flow shape seen, kept in about 200 bytes an entry.

Ingest is per event on the pipeline thread, so it is written for speed and memory: an entry's
identity is one packed `bytes` key (header struct + "src dst" text) mapping to a row number
in parallel `array`s of counters. Measured on this VM, a tuple-of-fields key with a list of
counters costs ~350 bytes an entry once its address strings are not shared; this layout ~190
(see bench/inventory.py). Entries are kept at their finest grain (host addresses, source
ports collapsed only when ephemeral); grouping by subnet or port happens when a dump is made
(`view.py`), so one inventory serves every view and survives a change of options.

Addresses and ports are those the filter hooks see: the source before SNAT (the original
tuple) and the destination after DNAT (the reply tuple's source), which is what a firewall
rule must match.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from conntrail.inventory.model import Direction, InventoryEntry
from conntrail.model import PORTED_PROTOCOLS, CtStatus, EventKind, Flow, FlowEvent

# netns number, direction, family, protocol, flags, source port, port (or ICMP type<<8|code)
KEY = struct.Struct("<HBBBBHH")
FLAG_SPORT = 1  # the source port is kept (not ephemeral)
FLAG_PORTED = 2  # `port` is the destination port
FLAG_ICMP = 4  # `port` is ICMP type << 8 | code
DEFAULT_PORT_RANGE = (32768, 60999)  # Linux's default ip_local_port_range
MAX_NAMESPACES = 0xFFFF
# Conntrack ids remembered per namespace until its start-up dump ends (~70 bytes each); a
# table larger than this, or a dump that never ends, stops the remembering (a flow born
# during the dump may then count twice, a dumped flow of a known entry not at all).
COUNTED_MAX = 1 << 20
_CONFIRMED = int(CtStatus.SEEN_REPLY | CtStatus.ASSURED)
_LOCAL, _OUTBOUND, _INBOUND, _FORWARDED = (int(Direction.LOCAL), int(Direction.OUTBOUND),
                                           int(Direction.INBOUND), int(Direction.FORWARDED))


class Locality(Protocol):
    """What a namespace calls its own (kernel/localview.py reads it from the kernel)."""

    @property
    def addresses(self) -> frozenset[str]:
        """Addresses of the namespace's interfaces."""

    @property
    def port_range(self) -> tuple[int, int]:
        """Its ip_local_port_range: where its ephemeral ports come from."""

    @property
    def tcp_listening(self) -> frozenset[int]:
        """Ports of its listening TCP sockets."""

    @property
    def udp_bound(self) -> frozenset[int]:
        """Ports of its unconnected UDP sockets."""

    def is_local_destination(self, address: str) -> bool:
        """True when a packet to `address` is delivered here (own, broadcast, multicast)."""


LocalityOf = Callable[[str], "Locality | None"]
"""The locality of a namespace by name, or None when it cannot be known (namespace gone)."""


@dataclass(frozen=True, slots=True)
class SourcePorts:
    """Which source ports are collapsed as ephemeral.

    By default: those in the namespace's ip_local_port_range, and any above 1023 when the
    destination port is a well-known one (< 1024) or a local listener's. `ephemeral` replaces
    the namespace's range (e.g. (1024, 65535) collapses like conntracker); `keep_all` keeps
    every source port.
    """

    ephemeral: tuple[int, int] | None = None
    keep_all: bool = False


def classify(locality: Locality | None, src: str, dst: str) -> Direction:
    """A flow's direction from the namespace's point of view."""
    return Direction(_classify(locality, src, dst))


def _classify(locality: Locality | None, src: str, dst: str) -> int:
    if locality is None:  # unknown namespace: only loopback can be told apart
        return _LOCAL if _is_loopback(src) else _FORWARDED
    if src in locality.addresses or _is_loopback(src):
        # Our own broadcasts and multicasts go out: only unicast to ourselves is local.
        return _LOCAL if dst in locality.addresses or _is_loopback(dst) else _OUTBOUND
    return _INBOUND if locality.is_local_destination(dst) else _FORWARDED


def _is_loopback(address: str) -> bool:
    """127.0.0.0/8 (all of it is delivered locally, not only interface addresses) or ::1."""
    return address.startswith("127.") or address == "::1"


class Inventory:
    """Distinct flows by (netns, direction, protocol, source, destination, port)."""

    def __init__(self, locality_of: LocalityOf, ports: SourcePorts | None = None) -> None:
        self._locality_of = locality_of
        self._ports = ports or SourcePorts()
        self._index: dict[bytes, int] = {}
        self._netns: list[str] = []
        self._netns_ids: dict[str, int] = {}
        self.first = array("q")
        self.last = array("q")
        self.flows = array("I")
        self.confirmed = array("B")
        self.packets = array("Q")
        self.bytes = array("Q")
        self.events = 0
        # Namespaces whose start-up dump is complete: a later dump is a resync after lost
        # events, and lists flows whose NEW we counted already. They count only when they
        # make a new entry (their NEW was among the lost).
        self._synced: set[str] = set()
        # Until then, the conntrack ids counted in that namespace: we subscribe before the
        # start-up dump, so a flow born during the dump comes both as NEW and in the dump.
        self._counted: dict[str, set[int]] = {}

    def dump_complete(self, netns: str) -> None:
        """A table dump of `netns` ended (TableSnapshot), or its flows were counted by an
        earlier run (a loaded state): later dumps only list flows already counted."""
        self._synced.add(netns)
        self._counted.pop(netns, None)

    def _first_sighting(self, event: FlowEvent) -> bool:
        """Whether a NEW or DUMP event is a flow not counted yet."""
        netns = event.netns
        if netns in self._synced:
            return event.kind is EventKind.NEW
        ct_id = event.flow.ct_id
        if ct_id is None:
            return True
        counted = self._counted.setdefault(netns, set())
        if ct_id in counted:
            return False
        if len(counted) >= COUNTED_MAX:  # no end-of-dump mark came: stop remembering
            self.dump_complete(netns)
        counted.add(ct_id)
        return True

    def __len__(self) -> int:
        return len(self._index)

    @property
    def namespaces(self) -> list[str]:
        """Namespace names, in the order their numbers were given."""
        return list(self._netns)

    def add(self, event: FlowEvent, whole: bool = False) -> None:
        """Count one event in its entry (creating the entry on first sight).

        `whole`: the event stands for a whole flow, start to end (a stored history row):
        it counts as a flow, spans its start and stop times, and brings its counters.
        """
        self.events += 1
        key = self._key(event)
        row = self._index.get(key)
        flow = event.flow
        if whole:
            first = flow.start_ns or event.time_ns
            last = flow.stop_ns or first
        else:
            first = last = event.time_ns
        confirmed = 1 if int(flow.status) & _CONFIRMED else 0
        kind = event.kind
        counts = whole or ((kind is EventKind.NEW or kind is EventKind.DUMP)
                           and self._first_sighting(event))
        if row is None:
            row = self._index[key] = self._append(first, last, confirmed)
            if whole or kind is EventKind.DESTROY:
                self._add_counters(row, flow)
            return
        # Compare-then-store: most events change neither bound, and min()/max() would write
        # the array on every event (measured 17 ns against 93 ns per bound).
        if first < self.first[row]:  # noqa: PLR1730
            self.first[row] = first
        if last > self.last[row]:  # noqa: PLR1730
            self.last[row] = last
        if confirmed:
            self.confirmed[row] = 1
        if counts:
            self.flows[row] += 1
        if whole or kind is EventKind.DESTROY:
            self._add_counters(row, flow)

    def _append(self, first: int, last: int, confirmed: int) -> int:
        row = len(self.first)
        self.first.append(first)
        self.last.append(last)
        self.flows.append(1)
        self.confirmed.append(confirmed)
        self.packets.append(0)
        self.bytes.append(0)
        return row

    def _add_counters(self, row: int, flow: Flow) -> None:
        for counters in (flow.counters_orig, flow.counters_reply):
            if counters is not None:
                self.packets[row] += counters.packets
                self.bytes[row] += counters.bytes

    def _key(self, event: FlowEvent) -> bytes:
        flow = event.flow
        orig = flow.orig
        reply = flow.reply
        dst, dport = (orig.dst, orig.dport) if reply is None else (reply.src, reply.sport)
        netns = event.netns
        ns = self._netns_ids.get(netns)
        if ns is None:
            ns = self._add_namespace(netns)
        locality = self._locality_of(netns)
        direction = _classify(locality, orig.src, dst)
        proto = orig.proto
        flags = sport = port = 0
        if proto in PORTED_PROTOCOLS and orig.sport is not None:
            flags = FLAG_PORTED
            port = dport or 0
            if self._source_port_kept(locality, proto, direction, orig.sport, port):
                flags |= FLAG_SPORT
                sport = orig.sport
        elif orig.icmp_type is not None:
            flags = FLAG_ICMP
            port = (orig.icmp_type << 8) | (orig.icmp_code or 0)
        return KEY.pack(ns, direction, orig.family, proto, flags, sport, port) + \
            f"{orig.src} {dst}".encode()

    def _source_port_kept(self, locality: Locality | None, proto: int, direction: int,
                          sport: int, dport: int) -> bool:
        ports = self._ports
        if ports.keep_all:
            return True
        low, high = ports.ephemeral or (locality.port_range if locality is not None
                                        else DEFAULT_PORT_RANGE)
        if low <= sport <= high:
            return False
        if sport < 1024:
            return True
        if dport < 1024:
            return False
        if locality is None or direction not in (_INBOUND, _LOCAL):
            return True
        listening = locality.tcp_listening if proto == 6 else \
            locality.udp_bound if proto == 17 else frozenset()
        return dport not in listening

    def _add_namespace(self, netns: str) -> int:
        if len(self._netns) > MAX_NAMESPACES:
            raise OverflowError("more than 65536 namespaces in one inventory")
        self._netns_ids[netns] = len(self._netns)
        self._netns.append(netns)
        return self._netns_ids[netns]

    def entries(self) -> Iterator[InventoryEntry]:
        """Every entry, in no particular order (see view.py for sorting and grouping)."""
        return Snapshot.of(self).entries()

    def snapshot(self) -> Snapshot:
        """A copy to dump or save on another thread while ingest goes on (~50 ms per 1M)."""
        return Snapshot.of(self)

    def merge_entry(self, key: bytes, netns: str, values: tuple[int, int, int, int, int, int]
                    ) -> None:
        """Fold in an entry from a saved inventory; `key` carries its own namespace number,
        rewritten to ours."""
        ns = self._netns_ids.get(netns)
        if ns is None:
            ns = self._add_namespace(netns)
        key = struct.pack("<H", ns) + key[2:]
        first, last, flows, confirmed, packets, nbytes = values
        row = self._index.get(key)
        if row is None:
            self._index[key] = len(self.first)
            for column, value in zip(self._columns(), values, strict=True):
                column.append(value)
            return
        self.first[row] = min(self.first[row], first)
        self.last[row] = max(self.last[row], last)
        self.flows[row] += flows
        self.confirmed[row] |= confirmed
        self.packets[row] += packets
        self.bytes[row] += nbytes

    def _columns(self) -> tuple[array[int], ...]:
        return (self.first, self.last, self.flows, self.confirmed, self.packets, self.bytes)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An inventory's content at one moment, safe to read on any thread."""

    keys: list[tuple[bytes, int]]
    netns: list[str]
    columns: tuple[array[int], ...]
    events: int

    @classmethod
    def of(cls, inventory: Inventory) -> Snapshot:
        """Copy the index and the counters."""
        columns = tuple(array(column.typecode, column) for column in inventory._columns())
        return cls(list(inventory._index.items()), inventory.namespaces, columns,
                   inventory.events)

    def __len__(self) -> int:
        return len(self.keys)

    def values(self, row: int) -> tuple[int, int, int, int, int, int]:
        """(first, last, flows, confirmed, packets, bytes) of a row."""
        first, last, flows, confirmed, packets, nbytes = self.columns
        return (first[row], last[row], flows[row], confirmed[row], packets[row], nbytes[row])

    def entries(self) -> Iterator[InventoryEntry]:
        """Every entry, decoded."""
        for key, row in self.keys:
            yield decode_entry(key, self.netns, self.values(row))


_DIRECTIONS = {member.value: member for member in Direction}  # Direction(n) costs ~0.3 µs


def decode_entry(key: bytes, netns: list[str],
                 values: tuple[int, int, int, int, int, int]) -> InventoryEntry:
    """An entry from its packed key and its counters."""
    ns, direction, family, proto, flags, sport, port = KEY.unpack_from(key)
    src, dst = key[KEY.size:].decode().split(" ")
    first, last, flows, confirmed, packets, nbytes = values
    icmp = flags & FLAG_ICMP
    return InventoryEntry(
        netns[ns], _DIRECTIONS[direction], family, proto, src, dst,
        sport if flags & FLAG_SPORT else None,
        port if flags & FLAG_PORTED else None,
        port >> 8 if icmp else None, port & 0xFF if icmp else None,
        first, last, flows, bool(confirmed), packets, nbytes)

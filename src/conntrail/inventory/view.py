"""Views of an inventory for a dump: grouped by subnet or by port, and sorted.

The inventory keeps host-grain entries; a view folds them into coarser ones (entries that
become equal are summed) and sorts the result the way conntracker does: by protocol (TCP, UDP,
ICMP… IPv4 before IPv6), then addresses and ports.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from conntrail.errors import ConfigError
from conntrail.inventory.model import ANY_FAMILY, InventoryEntry
from conntrail.model import AF_INET, AF_INET6

_PROTO_RANK = {6: 0, 17: 1, 1: 2, 58: 2, 132: 3, 136: 4, 33: 5}
_FAMILY_RANK = {AF_INET: 0, AF_INET6: 1, ANY_FAMILY: 2}


@dataclass(frozen=True, slots=True)
class ViewOptions:
    """How entries are folded for a dump."""

    prefix_v4: int = 32  # --group-by /24: sources and destinations by /24 network
    prefix_v6: int = 128
    ports_only: bool = False  # addresses dropped: one entry per direction, protocol and port
    merge_families: bool = False  # with ports_only: a port seen over IPv4 and IPv6 is one

    def __post_init__(self) -> None:
        if not 0 <= self.prefix_v4 <= 32:
            raise ConfigError("--group-by", f"IPv4 prefix /{self.prefix_v4} is not in 0-32")
        if not 0 <= self.prefix_v6 <= 128:
            raise ConfigError("--group-by", f"IPv6 prefix /{self.prefix_v6} is not in 0-128")
        if self.merge_families and not self.ports_only:
            raise ConfigError("--merge-families", "needs --ports-only: an entry with "
                                                  "addresses belongs to one family")

    @property
    def is_identity(self) -> bool:
        """True when the view changes nothing but the order."""
        return self.prefix_v4 == 32 and self.prefix_v6 == 128 and not self.ports_only


def parse_group_by(text: str) -> tuple[int, int]:
    """'/24' (IPv6 then /64), '/24,/48', or 'host' → (IPv4 prefix, IPv6 prefix)."""
    if text.strip() == "host":
        return 32, 128
    parts = [part.strip().lstrip("/") for part in text.split(",")]
    if len(parts) > 2 or not all(part.isascii() and part.isdigit() for part in parts):
        raise ConfigError("--group-by", f"{text!r}: expected host, /N or /N,/M "
                                        "(IPv4 and IPv6 prefix lengths)")
    v4 = int(parts[0])
    v6 = int(parts[1]) if len(parts) == 2 else 64
    ViewOptions(v4, v6)  # range checks
    return v4, v6


def build_view(entries: Iterable[InventoryEntry], options: ViewOptions) -> list[InventoryEntry]:
    """The entries folded per the options, sorted."""
    if options.is_identity:
        return sorted(entries, key=sort_key)
    folded = _group((_fold(entry, options) for entry in entries), _identity)
    if options.merge_families:
        folded = _merge_families(folded)
    return sorted(folded, key=sort_key)


def _identity(entry: InventoryEntry) -> tuple[object, ...]:
    return entry[:10]  # netns … icmp_code


def _group(entries: Iterable[InventoryEntry],
           identity: Callable[[InventoryEntry], tuple[object, ...]]) -> list[InventoryEntry]:
    groups: dict[tuple[object, ...], InventoryEntry] = {}
    for entry in entries:
        key = identity(entry)
        seen = groups.get(key)
        groups[key] = entry if seen is None else _combine(seen, entry)
    return list(groups.values())


def _merge_families(entries: list[InventoryEntry]) -> list[InventoryEntry]:
    """A port seen over both IPv4 and IPv6 becomes one entry of either family; a port seen
    over one family only stays that family's (merging it would claim the other was seen)."""
    def without_family(entry: InventoryEntry) -> tuple[object, ...]:
        return (entry.netns, entry.direction, entry.proto, entry.sport, entry.dport,
                entry.icmp_type, entry.icmp_code)

    families: dict[tuple[object, ...], set[int]] = {}
    for entry in entries:
        families.setdefault(without_family(entry), set()).add(entry.family)
    both = {key for key, seen in families.items() if len(seen) > 1}
    return _group((entry._replace(family=ANY_FAMILY) if without_family(entry) in both
                   else entry for entry in entries), _identity)


def _fold(entry: InventoryEntry, options: ViewOptions) -> InventoryEntry:
    if options.ports_only:
        return entry._replace(src="", dst="")
    prefix = options.prefix_v4 if entry.family == AF_INET else options.prefix_v6
    return entry._replace(src=_network(entry.src, prefix), dst=_network(entry.dst, prefix))


def _combine(a: InventoryEntry, b: InventoryEntry) -> InventoryEntry:
    """Two entries of one group: counts summed, the window widened, confirmed if either."""
    return a._replace(first_ns=min(a.first_ns, b.first_ns), last_ns=max(a.last_ns, b.last_ns),
                      flows=a.flows + b.flows, confirmed=a.confirmed or b.confirmed,
                      packets=a.packets + b.packets, bytes=a.bytes + b.bytes)


@functools.lru_cache(maxsize=65536)
def _network(address: str, prefix: int) -> str:
    """The address's network in CIDR form, or the address itself at full length."""
    if not address:
        return address
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    return address if network.prefixlen == network.max_prefixlen else str(network)


def _address_order(text: str) -> tuple[int, int, int]:
    """Sort an address, a network or '' (any, first) numerically. IPv4 is parsed by hand:
    ipaddress costs ~4 µs an address, and a dump sorts two per entry."""
    if not text:
        return (0, 0, 0)
    address, _, prefix = text.partition("/")
    if ":" not in address:
        a, b, c, d = address.split(".")
        value = (int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d)
        return (4, value, int(prefix) if prefix else 32)
    return (6, _ipv6_value(address), int(prefix) if prefix else 128)


@functools.lru_cache(maxsize=65536)
def _ipv6_value(address: str) -> int:
    return int(ipaddress.IPv6Address(address))


def sort_key(entry: InventoryEntry) -> tuple[object, ...]:
    """conntracker's order: protocol and family, then addresses, then ports."""
    return (entry.netns, _FAMILY_RANK.get(entry.family, 3), _PROTO_RANK.get(entry.proto, 10),
            entry.proto, _address_order(entry.src), _address_order(entry.dst),
            entry.dport or 0, entry.icmp_type or 0, entry.icmp_code or 0, entry.sport or 0,
            entry.direction)

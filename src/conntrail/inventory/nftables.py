"""Inventory → nftables ruleset text: a policy that admits exactly the confirmed observed flows.

Pure: entries in, text out (no I/O). The ruleset is one `table inet`, preceded by the
`table …` / `delete table …` pair that makes `nft -f` replace it atomically whether or not it
exists (nft 1.0.6 has no `destroy`). Each base chain (input, output, forward) starts with:

1. `ct state established,related accept`: replies and ICMP errors of admitted flows;
2. IPv6 neighbour/router discovery (hop limit 255) and multicast listener discovery (hop
   limit 1, link-local or unspecified source). The kernel never tracks these
   (nf_conntrack_icmpv6_error marks them `ct state untracked`; older kernels left some
   `invalid`), so a drop policy would break IPv6 without them; they come before
   `ct state invalid drop` so that they hold on either behaviour;
3. `ct state invalid drop`;

then one `accept` rule per merged group of confirmed entries, the `reject` rule of the
"reject" policy, and `# not admitted …` comment lines for the entries never answered.

Merging is exact (the rules admit the union of the entries, nothing more): entries equal in
everything but the source become one source set; groups equal in everything but the
destination (source sets included) one destination set; groups equal in everything but the
port (or ICMP type) one port set. "Any" (an empty address, a missing port) absorbs the rest of
its set, and an address inside a listed network is dropped (nft refuses overlapping intervals
in a named set). Sets of two elements or more become named sets when they have more than
`named_set_min` elements or appear in more than one rule. Everything is sorted: the same
entries in any order give the same text.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from conntrail.errors import ConfigError
from conntrail.inventory.model import ANY_FAMILY, Direction, InventoryEntry
from conntrail.model import AF_INET, AF_INET6

__all__ = ["DEFAULT_TABLE", "POLICIES", "RulesetOptions", "render_ruleset"]

DEFAULT_TABLE = "conntrail_policy"
POLICIES = ("accept", "drop", "reject")
_TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")

CHAINS = ("input", "output", "forward")
_CHAINS_OF: dict[Direction, tuple[str, ...]] = {
    Direction.INBOUND: ("input",),
    Direction.OUTBOUND: ("output",),
    Direction.FORWARDED: ("forward",),
    Direction.LOCAL: ("output", "input"),
}

# Protocols whose entries carry a destination port (and maybe a fixed source port).
_PORTED = {6: "tcp", 17: "udp", 33: "dccp", 132: "sctp", 136: "udplite"}
# ICMP protocols: (nft payload keyword, meta l4proto name, set type).
_ICMP = {1: ("icmp", "icmp", "icmp_type"), 58: ("icmpv6", "ipv6-icmp", "icmpv6_type")}

_PRELUDE = (
    "ct state established,related accept",
    "ip6 hoplimit 255 icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, "
    'nd-neighbor-advert } accept comment "IPv6 neighbour and router discovery"',
    "ip6 hoplimit 1 ip6 saddr { ::, fe80::/10 } icmpv6 type { mld-listener-query, "
    "mld-listener-report, mld-listener-done, mld2-listener-report } accept "
    'comment "IPv6 multicast listener discovery"',
    "ct state invalid drop",
)
_REJECT = 'reject with icmpx admin-prohibited comment "policy reject"'
_WRAP = 96  # a named set's elements go one per line beyond this width

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Addresses = tuple[Network, ...]  # sorted, none inside another; () = any address
Values = tuple[int, ...]  # sorted ports or ICMP types; () = any


@dataclass(frozen=True, slots=True, kw_only=True)
class RulesetOptions:
    """How to render: validated on construction (ConfigError names the option at fault).

    `generated_ns` (UTC epoch nanoseconds) is printed in the header; the caller passes it so
    that the output depends on the inputs only.
    """

    generated_ns: int
    table: str = DEFAULT_TABLE
    policy: str = "drop"  # one of POLICIES; "reject" = policy drop + a final reject rule
    named_set_min: int = 8  # a set with more elements than this becomes a named set

    def __post_init__(self) -> None:
        if not isinstance(self.table, str) or not _TABLE_NAME.fullmatch(self.table):
            raise ConfigError("table", f"{self.table!r} is not a table name: a letter, then "
                                       "letters, digits or '_' (64 at most)")
        if self.policy not in POLICIES:
            raise ConfigError("policy", f"{self.policy!r} is not one of {', '.join(POLICIES)}")
        if not _is_int(self.generated_ns) or self.generated_ns < 0:
            raise ConfigError("generated_ns",
                              f"{self.generated_ns!r} is not epoch nanoseconds (an int >= 0)")
        if not _is_int(self.named_set_min) or self.named_set_min < 1:
            raise ConfigError("named_set_min", f"{self.named_set_min!r} is not an int >= 1")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class _Shape:
    """What a rule matches; `family` is 4, 6 or 0 (any: no address-family match)."""

    family: int
    proto: int
    src: Addresses
    dst: Addresses
    sport: int | None
    ports: Values  # destination ports, or ICMP types
    code: int | None  # ICMP code

    def sort_key(self) -> tuple[object, ...]:
        return (self.proto, _values_key(self.ports), self.code is not None, self.code or 0,
                self.sport is not None, self.sport or 0, self.family,
                _addresses_key(self.src), _addresses_key(self.dst))


@dataclass(frozen=True, slots=True)
class _Group:
    shape: _Shape
    flows: int
    last_ns: int


def render_ruleset(entries: Sequence[InventoryEntry], options: RulesetOptions) -> str:
    """The nftables ruleset (text for `nft -f`) admitting the confirmed entries.

    Entries from more than one namespace raise ConfigError("netns"); a malformed entry (an
    address that does not parse or fit its family, a port out of range) raises ValueError.
    """
    namespaces = sorted({entry.netns for entry in entries})
    if len(namespaces) > 1:
        raise ConfigError("netns", f"entries from {len(namespaces)} namespaces "
                                   f"({', '.join(namespaces)}): a ruleset is for one namespace, "
                                   "render each on its own")
    admitted: dict[str, list[_Group]] = {}
    refused: dict[str, list[_Group]] = {}
    listed: set[int] = set()  # unconfirmed entries not admitted in some chain, by index
    shapes = [_shape(entry) for entry in entries]
    for chain in CHAINS:
        atoms = [(index, shapes[index], entry) for index, entry in enumerate(entries)
                 if chain in _CHAINS_OF[Direction(entry.direction)]]
        confirmed = [(shape, entry) for _, shape, entry in atoms if entry.confirmed]
        admitted_shapes = {shape for shape, _ in confirmed}
        # an unconfirmed entry shaped like a confirmed one is admitted with it: not listed
        unanswered = [(index, shape, entry) for index, shape, entry in atoms
                      if not entry.confirmed and shape not in admitted_shapes]
        listed.update(index for index, _, _ in unanswered)
        admitted[chain] = _merge(confirmed)
        refused[chain] = _merge([(shape, entry) for _, shape, entry in unanswered])
    sets = _NamedSets(options.named_set_min, admitted)
    lines = _header(entries, [entries[index] for index in sorted(listed)], admitted,
                    namespaces, options)
    lines += [f"table inet {options.table}", f"delete table inet {options.table}", "",
              f"table inet {options.table} {{"]
    for definition in sets.definitions():
        lines += [f"\t{line}" for line in definition]
        lines.append("")
    base_policy = "accept" if options.policy == "accept" else "drop"
    for index, chain in enumerate(CHAINS):
        if index:
            lines.append("")
        lines.append(f"\tchain {chain} {{")
        lines.append(f"\t\ttype filter hook {chain} priority filter; policy {base_policy};")
        lines += [f"\t\t{line}" for line in _PRELUDE]
        for group in admitted[chain]:
            match = _match(group.shape, sets)
            lines.append(f'\t\t{match} accept comment "{_stats(group)}"')
        if options.policy == "reject":
            lines.append(f"\t\t{_REJECT}")
        for group in refused[chain]:
            match = _match(group.shape, None)
            lines.append(f"\t\t# not admitted (no reply seen): {match} ({_stats(group)})")
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- header ---------------------------------------------------------------------------------

def _header(entries: Sequence[InventoryEntry], unconfirmed: Sequence[InventoryEntry],
            admitted: dict[str, list[_Group]], namespaces: list[str],
            options: RulesetOptions) -> list[str]:
    confirmed = [entry for entry in entries if entry.confirmed]
    rules = sum(len(groups) for groups in admitted.values())
    lines = ["# conntrail inventory: nftables ruleset admitting the confirmed observed flows",
             f"# admitted: {_count(len(confirmed), 'entry', 'entries')}, "
             f"{_count(_sum_flows(confirmed), 'flow')}, {_count(rules, 'rule')}"]
    if unconfirmed:
        lines.append("# not admitted (no reply seen): "
                     f"{_count(len(unconfirmed), 'entry', 'entries')}, "
                     f"{_count(_sum_flows(unconfirmed), 'flow')}")
    if entries:
        first = min(entry.first_ns for entry in entries)
        last = max(entry.last_ns for entry in entries)
        lines.append(f"# observed: {_iso(first)} .. {_iso(last)}")
    else:
        lines.append("# observed: nothing")
    if namespaces and namespaces[0]:
        lines.append(f"# namespace: {namespaces[0]}")
    lines += [f"# generated: {_iso(options.generated_ns)}",
              f"# policy: {options.policy}; `nft -f FILE` loads it, and loading it again "
              f"replaces table inet {options.table}"]
    return lines


def _count(number: int, singular: str, plural: str = "") -> str:
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


def _sum_flows(entries: Iterable[InventoryEntry]) -> int:
    return sum(entry.flows for entry in entries)


def _iso(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns // 1_000_000_000))


def _stats(group: _Group) -> str:
    return f"flows {group.flows}, last {_iso(group.last_ns)}"


# --- entries → shapes → merged groups -------------------------------------------------------

def _shape(entry: InventoryEntry) -> _Shape:
    """One entry as a match on its own; malformed entries raise ValueError."""
    if entry.family not in (AF_INET, AF_INET6, ANY_FAMILY):
        raise ValueError(f"entry has unknown address family {entry.family}: {entry}")
    if not 0 <= entry.proto <= 255:
        raise ValueError(f"entry has protocol {entry.proto} outside 0..255: {entry}")
    src, dst = _address(entry.src, entry), _address(entry.dst, entry)
    versions = {net.version for net in (*src, *dst)}
    if len(versions) > 1:
        raise ValueError(f"entry mixes IPv4 and IPv6 addresses: {entry}")
    family = {AF_INET: 4, AF_INET6: 6}.get(entry.family, 0)
    if family and versions and versions != {family}:
        raise ValueError(f"entry addresses do not match its family {entry.family}: {entry}")
    if versions:
        family = versions.pop()  # an address narrows an any-family entry to its own family
    sport: int | None = None
    port: int | None = None
    code: int | None = None
    if entry.proto in _PORTED:
        sport = _checked(entry.sport, 65535, "source port", entry)
        port = _checked(entry.dport, 65535, "destination port", entry)
    elif entry.proto in _ICMP:
        port = _checked(entry.icmp_type, 255, "ICMP type", entry)
        code = _checked(entry.icmp_code, 255, "ICMP code", entry)
    return _Shape(family, entry.proto, src, dst, sport, () if port is None else (port,), code)


def _checked(value: int | None, top: int, what: str, entry: InventoryEntry) -> int | None:
    if value is not None and not 0 <= value <= top:
        raise ValueError(f"entry has {what} {value} outside 0..{top}: {entry}")
    return value


def _address(text: str, entry: InventoryEntry) -> Addresses:
    if not text:
        return ()
    try:
        return (ipaddress.ip_network(text, strict=False),)
    except ValueError:
        raise ValueError(f"entry has {text!r}, neither an address nor a network: {entry}") \
            from None


def _merge(atoms: Sequence[tuple[_Shape, InventoryEntry]]) -> list[_Group]:
    """Merge along source, then destination, then port; sorted."""
    groups = [_Group(shape, entry.flows, entry.last_ns) for shape, entry in atoms]
    groups = _merge_along(groups, "src")
    groups = _merge_along(groups, "dst")
    groups = _merge_along(groups, "ports")
    return sorted(groups, key=lambda group: group.shape.sort_key())


def _merge_along(groups: Sequence[_Group], axis: str) -> list[_Group]:
    """Groups equal in everything but `axis` become one group holding the union along it."""
    merged: dict[_Shape, list[_Group]] = {}
    for group in groups:
        merged.setdefault(_along(group.shape, axis, None), []).append(group)
    return [_Group(_along(rest, axis, members), sum(m.flows for m in members),
                   max(m.last_ns for m in members)) for rest, members in merged.items()]


def _along(shape: _Shape, axis: str, members: Sequence[_Group] | None) -> _Shape:
    """`shape` with `axis` emptied (members None) or set to the union of the members'."""
    shapes = [member.shape for member in members or ()]
    if axis == "src":
        return replace(shape, src=_union_addresses(s.src for s in shapes) if members else ())
    if axis == "dst":
        return replace(shape, dst=_union_addresses(s.dst for s in shapes) if members else ())
    return replace(shape, ports=_union_values(s.ports for s in shapes) if members else ())


def _union_addresses(sets: Iterable[Addresses]) -> Addresses:
    """Union; any absorbs all, a network inside another listed one is dropped."""
    every: set[Network] = set()
    for addresses in sets:
        if not addresses:
            return ()
        every.update(addresses)
    kept: list[Network] = []
    for net in sorted(every, key=_network_key):
        # sorted by start, wider first: a network inside a kept one is inside the last kept
        if kept and _inside(net, kept[-1]):
            continue
        kept.append(net)
    return tuple(kept)


def _inside(net: Network, other: Network) -> bool:
    return (net.version == other.version
            and int(other.network_address) <= int(net.network_address)
            and int(net.broadcast_address) <= int(other.broadcast_address))


def _union_values(sets: Iterable[Values]) -> Values:
    every: set[int] = set()
    for values in sets:
        if not values:
            return ()
        every.update(values)
    return tuple(sorted(every))


def _network_key(net: Network) -> tuple[int, int, int]:
    return (net.version, int(net.network_address), net.prefixlen)


def _addresses_key(addresses: Addresses) -> tuple[tuple[int, int, int], ...]:
    return tuple(_network_key(net) for net in addresses)


def _values_key(values: Values) -> tuple[int, ...]:
    return values or (-1,)


# --- named sets -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _SetValue:
    """A set of two or more elements as a rule uses it."""

    type: str
    elements: tuple[str, ...]


class _NamedSets:
    """Decides which sets are named and names them: `<chain>_<role>_<n>`, by first use."""

    def __init__(self, named_set_min: int, admitted: dict[str, list[_Group]]) -> None:
        uses: dict[_SetValue, int] = {}
        order: list[tuple[_SetValue, str, str]] = []
        for chain in CHAINS:
            for group in admitted[chain]:
                for role, value in _set_values(group.shape):
                    if value not in uses:
                        order.append((value, chain, role))
                    uses[value] = uses.get(value, 0) + 1
        self.names: dict[_SetValue, str] = {}
        counters: dict[str, int] = {}
        for value, chain, role in order:
            if uses[value] > 1 or len(value.elements) > named_set_min:
                prefix = f"{chain}_{role}"
                self.names[value] = f"{prefix}_{counters.get(prefix, 0)}"
                counters[prefix] = counters.get(prefix, 0) + 1

    def definitions(self) -> list[list[str]]:
        result = []
        for value, name in self.names.items():
            lines = [f"set {name} {{", f"\ttype {value.type}"]
            if value.type.endswith("_addr"):
                lines.append("\tflags interval")
            one_line = f"\telements = {{ {', '.join(value.elements)} }}"
            if len(one_line) <= _WRAP:
                lines.append(one_line)
            else:
                lines.append("\telements = {")
                lines += [f"\t\t{element}," for element in value.elements[:-1]]
                lines += [f"\t\t{value.elements[-1]}", "\t}"]
            lines.append("}")
            result.append(lines)
        return result


def _set_values(shape: _Shape) -> list[tuple[str, _SetValue]]:
    """The multi-element sets a rule for `shape` uses, with their roles."""
    found = []
    address_type = "ipv4_addr" if shape.family == 4 else "ipv6_addr"
    for role, addresses in (("saddr", shape.src), ("daddr", shape.dst)):
        if len(addresses) > 1:
            found.append((role, _SetValue(address_type, _address_texts(addresses))))
    if len(shape.ports) > 1:
        if shape.proto in _ICMP:
            role, value_type = "icmptype", _ICMP[shape.proto][2]
        else:
            role, value_type = "dport", "inet_service"
        found.append((role, _SetValue(value_type, tuple(str(p) for p in shape.ports))))
    return found


def _address_texts(addresses: Addresses) -> tuple[str, ...]:
    return tuple(str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
                 for net in addresses)


# --- rule text ------------------------------------------------------------------------------

def _match(shape: _Shape, sets: _NamedSets | None) -> str:
    """The match expression of a rule (`sets` None: inline every set, for comments)."""
    parts: list[str] = []
    keyword = "ip" if shape.family == 4 else "ip6"
    address_type = "ipv4_addr" if shape.family == 4 else "ipv6_addr"
    for role, addresses in (("saddr", shape.src), ("daddr", shape.dst)):
        if addresses:
            value = _SetValue(address_type, _address_texts(addresses))
            parts.append(f"{keyword} {role} {_value(value, sets)}")
    if shape.family and not shape.src and not shape.dst:
        parts.append(f"meta nfproto ipv{shape.family}")
    ports = tuple(str(port) for port in shape.ports)
    if shape.proto in _PORTED:
        name = _PORTED[shape.proto]
        if shape.sport is not None:
            parts.append(f"{name} sport {shape.sport}")
        if ports:
            parts.append(f"{name} dport {_value(_SetValue('inet_service', ports), sets)}")
        if shape.sport is None and not ports:
            parts.append(f"meta l4proto {name}")
    elif shape.proto in _ICMP:
        name, l4name, set_type = _ICMP[shape.proto]
        if ports:
            parts.append(f"{name} type {_value(_SetValue(set_type, ports), sets)}")
        if shape.code is not None:
            parts.append(f"{name} code {shape.code}")
        if not ports and shape.code is None:
            parts.append(f"meta l4proto {l4name}")
    else:
        parts.append(f"meta l4proto {shape.proto}")
    return " ".join(parts)


def _value(value: _SetValue, sets: _NamedSets | None) -> str:
    if len(value.elements) == 1:
        return value.elements[0]
    if sets is not None and value in sets.names:
        return f"@{sets.names[value]}"
    return f"{{ {', '.join(value.elements)} }}"

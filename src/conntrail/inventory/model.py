"""What an inventory holds: one entry per distinct flow shape, as renderers and rules see it.

An entry describes the flows a firewall rule would have to admit, so its addresses and ports
are those the filter hooks see: the source before SNAT (orig tuple) and the destination after
DNAT (the reply tuple's source). Direction is from the namespace's own point of view.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

ANY_FAMILY = 0  # an entry merged across IPv4 and IPv6 (ports only, --merge-families)


class Direction(enum.IntEnum):
    """Where a flow runs relative to the namespace that tracked it."""

    INBOUND = 1  # to a local address (or broadcast/multicast) from elsewhere: input hook
    OUTBOUND = 2  # from a local address to elsewhere: output hook
    FORWARDED = 3  # neither end local: forward hook
    LOCAL = 4  # both ends local (loopback): output, then input

    @property
    def label(self) -> str:
        """Lowercase name for output."""
        return self.name.lower()


class InventoryEntry(NamedTuple):
    """One distinct flow shape and what was seen of it.

    `src`/`dst` are an address, a network in CIDR form (with --group-by), or "" for any
    (ports only). `sport` is None when the source port was collapsed as ephemeral. Ported
    protocols use `dport`; ICMP and ICMPv6 use `icmp_type`/`icmp_code`. Times are UTC epoch
    nanoseconds; `packets`/`bytes` sum both directions of the flows whose end was seen.
    """

    netns: str
    direction: Direction
    family: int  # AF_INET, AF_INET6, or ANY_FAMILY
    proto: int
    src: str
    dst: str
    sport: int | None
    dport: int | None
    icmp_type: int | None
    icmp_code: int | None
    first_ns: int
    last_ns: int
    flows: int
    confirmed: bool
    packets: int
    bytes: int

"""Address text ⇄ packed bytes for stores that index addresses as BLOBs (CIDR = byte range).

`ipaddress` parses in pure Python (~1 µs an address); a gateway's flows reuse few addresses,
so a bounded dict in front makes packing ~0.05 µs on the write path.
"""

from __future__ import annotations

import ipaddress

_PACKED: dict[str, bytes] = {}
_TEXT: dict[bytes, str] = {}
_CACHE_MAX = 1 << 16


def pack(text: str) -> bytes:
    """'198.18.0.1' → 4 bytes, '2001:db8::1' → 16 bytes."""
    packed = _PACKED.get(text)
    if packed is None:
        packed = ipaddress.ip_address(text).packed
        if len(_PACKED) >= _CACHE_MAX:
            _PACKED.clear()
        _PACKED[text] = packed
    return packed


def unpack(packed: bytes) -> str:
    """The inverse of `pack` (compressed IPv6 form)."""
    text = _TEXT.get(packed)
    if text is None:
        text = str(ipaddress.ip_address(packed))
        if len(_TEXT) >= _CACHE_MAX:
            _TEXT.clear()
        _TEXT[packed] = text
    return text


def pack_optional(text: str | None) -> bytes | None:
    """`pack`, passing None through."""
    return None if text is None else pack(text)


def unpack_optional(packed: bytes | None) -> str | None:
    """`unpack`, passing None through."""
    return None if packed is None else unpack(packed)


def network_range(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[bytes, bytes]:
    """The first and last packed address of a network: `col BETWEEN lo AND hi` is the CIDR
    test (BLOBs compare bytewise; a 4-byte and a 16-byte value never fall in one range of
    equal-length bounds, but compare the family too)."""
    return network.network_address.packed, network.broadcast_address.packed

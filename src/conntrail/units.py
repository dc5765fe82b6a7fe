"""Sizes and durations as people write them (8M, 20G; 30s, 7d), for options and config keys."""

from __future__ import annotations

import re

from conntrail.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, None: 1}
MAX_NS = 1 << 62  # year 2116: beyond it, nanoseconds leave the stores' 64-bit integers
MAX_BUFFER = 1 << 30  # the kernel caps socket buffers at INT_MAX / 2
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, option: str, maximum: int = MAX_BUFFER) -> int:
    """'8M', '512k', '20G', '1048576' → bytes (at most `maximum`)."""
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = raw[-1:] if raw[-1:] in _SIZE_UNITS else ""
    try:
        value = int(raw[: len(raw) - len(unit)]) * _SIZE_UNITS[unit]
    except ValueError:
        raise ConfigError(option, f"not a size: {text!r} (e.g. 8M, 512k)") from None
    if value <= 0:
        raise ConfigError(option, f"size must be positive: {text!r}")
    if value > maximum:
        ceiling = "1G (the kernel's ceiling)" if maximum == MAX_BUFFER else f"{maximum} bytes"
        raise ConfigError(option, f"at most {ceiling}: {text!r}")
    return value


def parse_duration(text: str, option: str) -> int:
    """'30s', '5m', '2h', '7d', '1w', '250ms' or plain seconds, to nanoseconds."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(option, f"not a duration: {text!r} (e.g. 30s, 5m, 2h, 7d)")
    ns = int(float(match.group(1)) * _UNITS_S[match.group(2)] * 1e9)
    if ns >= MAX_NS:
        raise ConfigError(option, f"duration {text!r} is too long")
    return ns

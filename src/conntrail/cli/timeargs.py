"""Command-line times, durations and endpoints: RFC 3339, epoch, `now`; 30s/5m/2h/7d; A:P."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import time

from conntrail.errors import ConfigError
from conntrail.units import MAX_NS, parse_duration

__all__ = ["MAX_NS", "parse_duration", "parse_endpoint", "parse_time"]

_EPOCH = re.compile(r"^\d{9,11}(\.\d{1,9})?$")


def parse_time(text: str, option: str) -> int:
    """RFC 3339 with a zone (Z or ±hh:mm), epoch seconds (fractions allowed), or `now`,
    to epoch nanoseconds. A time without a zone is refused: it would be a guess."""
    ns = _parse_time(text.strip(), text, option)
    if not 0 <= ns < MAX_NS:
        raise ConfigError(option, f"time {text!r} is out of range (1970 to 2116)")
    return ns


def _parse_time(value: str, text: str, option: str) -> int:
    if value == "now":
        return time.time_ns()
    if _EPOCH.match(value):
        whole, _, frac = value.partition(".")
        return int(whole) * 1_000_000_000 + int((frac + "000000000")[:9])
    try:
        parsed = dt.datetime.fromisoformat(value.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(option, f"not a time: {text!r} (use RFC 3339 such as "
                          "2026-11-22T14:02:00Z, epoch seconds, or now)") from None
    if parsed.tzinfo is None:
        raise ConfigError(option, f"time {text!r} has no zone: add Z (UTC) or an offset "
                          "such as +01:00")
    delta = parsed - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def parse_endpoint(text: str, option: str = "ADDRESS") -> tuple[str, int | None]:
    """'198.51.100.7:53500', '[2001:db8::1]:443', or a bare address (port None)."""
    value = text.strip()
    port_text: str | None = None
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(option, f"not an endpoint: {text!r}")
            port_text = rest[1:]
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    else:
        host = value
    host = host.split("%", 1)[0]  # a link-local scope (fe80::1%eth0) is not stored
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise ConfigError(option, f"not an IP address: {host!r} (use 198.51.100.7:53500 or "
                          "[2001:db8::1]:443)") from None
    if port_text is None:
        return address, None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(option, f"not a port: {port_text!r}")
    return address, int(port_text)

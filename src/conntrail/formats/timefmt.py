"""Time rendering shared by formats: epoch nanoseconds to ISO 8601 UTC or a strftime."""

from __future__ import annotations

import time

_last_second = -1
_last_prefix = ""


def iso_utc(ns: int) -> str:
    """RFC 3339 UTC with microseconds, e.g. 2026-11-22T01:55:21.123456Z.

    The date part is cached per second: events arrive in bursts within the same second, and
    strftime+gmtime cost more than the rest of a JSON line.
    """
    global _last_second, _last_prefix  # noqa: PLW0603 - a one-entry cache
    seconds, rest = divmod(ns, 1_000_000_000)
    if seconds != _last_second:
        _last_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _last_second = seconds
    return f"{_last_prefix}.{rest // 1000:06d}Z"


def render(ns: int, spec: str) -> str:
    """Render per a --format-ts spec: 'iso', 'epoch', 'epoch-ms', 'epoch-ns' or a strftime."""
    if spec == "iso":
        return iso_utc(ns)
    if spec == "epoch":
        return str(ns // 1_000_000_000)
    if spec == "epoch-ms":
        return str(ns // 1_000_000)
    if spec == "epoch-ns":
        return str(ns)
    return time.strftime(spec, time.gmtime(ns / 1e9))

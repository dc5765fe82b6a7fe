"""Time rendering shared by formats: epoch nanoseconds to ISO 8601 UTC or a strftime."""

from __future__ import annotations

import time

_PREFIXES: dict[int, str] = {}


def iso_utc(ns: int) -> str:
    """RFC 3339 UTC with microseconds, e.g. 2026-11-22T01:55:21.123456Z.

    The date part is cached per second: a DESTROY carries its start, stop and receipt times,
    a few distinct seconds that recur for many events, and strftime+gmtime cost more than
    the rest of a JSON line.
    """
    seconds, rest = divmod(ns, 1_000_000_000)
    prefix = _PREFIXES.get(seconds)
    if prefix is None:
        if len(_PREFIXES) >= 4096:
            _PREFIXES.clear()
        prefix = _PREFIXES[seconds] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{prefix}.{rest // 1000:06d}Z"


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

"""The conntrack sysctls that decide what events carry; read and set per namespace."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from conntrail.errors import KernelError
from conntrail.kernel.netns import NetnsRef, entered

log = logging.getLogger(__name__)

ACCT = "net/netfilter/nf_conntrack_acct"  # byte/packet counters
TIMESTAMP = "net/netfilter/nf_conntrack_timestamp"  # kernel start/stop times
EVENTS = "net/netfilter/nf_conntrack_events"  # 0 off, 1 on, 2 only while a listener exists


@dataclass(frozen=True, slots=True)
class SysctlChange:
    """One sysctl we changed, so it can be logged and put back."""

    key: str
    old: str
    new: str


def _path(key: str) -> str:
    return "/proc/sys/" + key


def read(key: str, netns: NetnsRef) -> str:
    """Read a sysctl as seen from inside `netns` (/proc/sys/net follows the thread's netns)."""
    with entered(netns):
        try:
            with open(_path(key), encoding="ascii") as handle:
                return handle.read().strip()
        except OSError as exc:
            raise KernelError(f"sysctl {key}: {exc.strerror}") from exc


def ensure(key: str, value: str, netns: NetnsRef) -> SysctlChange | None:
    """Set `key` to `value` in `netns` if it differs; log and return what changed."""
    old = read(key, netns)
    if old == value:
        return None
    with entered(netns):
        try:
            with open(_path(key), "w", encoding="ascii") as handle:
                handle.write(value)
        except OSError as exc:
            raise KernelError(f"sysctl {key}={value}: {exc.strerror}") from exc
    where = f" in netns {netns.name}" if netns.name else ""
    log.info("set %s from %s to %s%s", key.replace("/", "."), old, value, where)
    return SysctlChange(key, old, value)


def restore(change: SysctlChange, netns: NetnsRef) -> None:
    """Put back a value changed by `ensure`."""
    ensure(change.key, change.old, netns)

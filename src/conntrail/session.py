"""Prepare namespaces for listening (sysctls, conntrack activation) and undo it on exit.

This is wiring, not kernel access: it decides *what* to change; `kernel/` does the syscalls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from conntrail.kernel import nft, sysctl
from conntrail.kernel.netns import NetnsRef

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """How much the session may change: accounting sysctls, the conntrack rule, clean-up."""

    accounting: bool = True  # enable nf_conntrack_acct and nf_conntrack_timestamp
    install_rule: bool = True  # add `inet conntrail` when nothing else uses conntrack
    keep_rule: bool = False  # leave our table in place on exit


@dataclass
class KernelSession:
    """What we changed in which namespace, so `close` can put it back."""

    options: SessionOptions = field(default_factory=SessionOptions)
    installed: list[NetnsRef] = field(default_factory=list)

    def prepare(self, netns: NetnsRef) -> None:
        """Make `netns` produce the events we need."""
        if sysctl.read(sysctl.EVENTS, netns) == "0":
            sysctl.ensure(sysctl.EVENTS, "1", netns)
        if self.options.accounting:
            sysctl.ensure(sysctl.ACCT, "1", netns)
            sysctl.ensure(sysctl.TIMESTAMP, "1", netns)
        if self.options.install_rule and not nft.conntrack_in_use(netns):
            nft.install_table(netns)
            self.installed.append(netns)

    def close(self) -> None:
        """Remove the tables we installed, unless asked to keep them."""
        if self.options.keep_rule:
            return
        for netns in self.installed:
            try:
                nft.remove_table(netns)
            except Exception as exc:  # noqa: BLE001 - clean-up goes on for the others
                log.error("could not remove our nft table in %s: %s", netns.name or "current",
                          exc)
        self.installed.clear()

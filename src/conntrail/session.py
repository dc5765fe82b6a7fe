"""Prepare namespaces for listening (sysctls, conntrack activation) and undo it on exit.

This is wiring, not kernel access: it decides *what* to change; `kernel/` does the syscalls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from conntrail.kernel import attrlabels, nft, sysctl
from conntrail.kernel.netns import NetnsRef
from conntrail.netlink import nftables

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """How much the session may change: accounting sysctls, the conntrack rule, clean-up."""

    accounting: bool = True  # enable nf_conntrack_acct and nf_conntrack_timestamp
    install_rule: bool = True  # add `inet conntrail` when nothing else uses conntrack
    keep_rule: bool = False  # leave our table in place on exit
    attribution: bool = False  # add `inet conntrail_attr`: socket identity into ct labels
    cgroup_levels: int = 8  # cgroup v2 levels labelled (deepest wins)


@dataclass
class KernelSession:
    """What we changed in which namespace, so `close` can put it back."""

    options: SessionOptions = field(default_factory=SessionOptions)
    installed: list[NetnsRef] = field(default_factory=list)
    labelled: list[NetnsRef] = field(default_factory=list)
    kept: list[NetnsRef] = field(default_factory=list)  # prepared with keep_rule: left as is

    def prepare(self, netns: NetnsRef, options: SessionOptions | None = None) -> None:
        """Make `netns` produce the events we need (`options`: this namespace's own, e.g.
        its pipeline's in the daemon; default: the session's)."""
        options = options or self.options
        if options.keep_rule:
            self.kept.append(netns)
        if sysctl.read(sysctl.EVENTS, netns) == "0":
            sysctl.ensure(sysctl.EVENTS, "1", netns)
        if options.accounting:
            sysctl.ensure(sysctl.ACCT, "1", netns)
            sysctl.ensure(sysctl.TIMESTAMP, "1", netns)
        if options.install_rule and not nft.conntrack_in_use(netns):
            nft.install_table(netns)
            self.installed.append(netns)
        # After the activation check: our label rules use conntrack too, and would make a
        # namespace look tracked that is only tracked while we run.
        if options.install_rule and options.attribution:
            self._label(netns, options.cgroup_levels)

    def _label(self, netns: NetnsRef, cgroup_levels: int) -> None:
        where = netns.name or "current"
        if nft.uses_ct_labels(netns, nftables.TABLE):
            # Labels are only ever OR-ed in: ours would corrupt theirs and theirs ours (and
            # their `ct label` matches would start matching our bits).
            log.warning("attribution in netns %s: other rules use conntrack labels; uid and "
                        "gid come from NFLOG instead", where)
            return
        support = attrlabels.install(netns, cgroup_levels)
        if support.labels:
            self.labelled.append(netns)
        if support.reason:
            log.warning("attribution in netns %s: %s", where, support.reason)
        else:
            log.info("attribution: uid, gid and cgroup (levels %d..0) labelled in netns %s",
                     support.cgroup_levels, where)

    def close(self) -> None:
        """Remove the tables we installed, unless asked to keep them."""
        for netns in self.labelled:
            if netns in self.kept:
                continue
            try:
                attrlabels.remove(netns)
            except Exception as exc:  # noqa: BLE001 - clean-up goes on for the others
                log.error("could not remove our attribution table in %s: %s",
                          netns.name or "current", exc)
        self.labelled.clear()
        for netns in self.installed:
            if netns in self.kept:
                continue
            try:
                nft.remove_table(netns)
            except Exception as exc:  # noqa: BLE001 - clean-up goes on for the others
                log.error("could not remove our nft table in %s: %s", netns.name or "current",
                          exc)
        self.installed.clear()

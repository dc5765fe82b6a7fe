"""nftables through the `nft` command: is conntrack in use, and conntrail's own small table.

conntrail only ever creates, inspects and deletes its own table (`inet conntrail`); other
tables are read, never changed.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

from conntrail.errors import KernelError
from conntrail.kernel.netns import NetnsRef, preexec_for

log = logging.getLogger(__name__)

TABLE_FAMILY = "inet"
TABLE_NAME = "conntrail"

# One rule that needs conntrack is enough: it makes the kernel register its conntrack hooks
# for this namespace (both IPv4 and IPv6 for the inet family, every hook point).
CONNTRACK_TABLE = f"""
table {TABLE_FAMILY} {TABLE_NAME} {{
    comment "conntrail: keeps connection tracking active for auditing"
    chain track {{
        type filter hook prerouting priority raw + 1; policy accept;
        ct state new
    }}
}}
"""

# Expressions that only work with conntrack: finding one means the namespace already tracks.
_CONNTRACK_USERS = frozenset({"ct", "snat", "dnat", "masquerade", "redirect", "flow",
                              "ct helper", "ct timeout", "ct expectation", "synproxy"})
_XT_CONNTRACK_MATCHES = frozenset({"conntrack", "state", "connmark", "CONNMARK", "helper",
                                   "connlimit", "connbytes", "CT"})
# Conntrack hooks are registered per family: an `ip` rule tracks IPv4 only.
_FAMILIES_COVERED = {"ip": {"ip"}, "ip6": {"ip6"}, "inet": {"ip", "ip6"}}


def run_nft(args: list[str], netns: NetnsRef, stdin: str | None = None) -> str:
    """Run `nft` inside `netns` and return its stdout; failures become KernelError."""
    binary = shutil.which("nft")
    if binary is None:
        raise KernelError("the nft command is missing: install the nftables package")
    proc = subprocess.run(
        [binary, *args], input=stdin, capture_output=True, text=True, check=False,
        preexec_fn=preexec_for(netns),
    )
    if proc.returncode != 0:
        where = f" in netns {netns.name}" if netns.name else ""
        raise KernelError(f"nft {' '.join(args)}{where}: {proc.stderr.strip()}")
    return str(proc.stdout)


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair in a JSON tree, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _rule_uses_conntrack(rule: dict[str, Any]) -> bool:
    for key, value in _walk(rule.get("expr", [])):
        if key in _CONNTRACK_USERS:
            return True
        if key == "xt" and isinstance(value, dict) and value.get("name") in \
                _XT_CONNTRACK_MATCHES:
            return True
    return False


def tracked_families(ruleset: dict[str, Any]) -> set[str]:
    """Which of 'ip'/'ip6' some rule of an `nft -j list ruleset` document keeps tracked.

    Bridge, netdev and arp rules do not count: they do not register the IP hooks.
    """
    covered: set[str] = set()
    for entry in ruleset.get("nftables", []):
        rule = entry.get("rule") if isinstance(entry, dict) else None
        if rule is not None and _rule_uses_conntrack(rule):
            covered |= _FAMILIES_COVERED.get(rule.get("family", ""), set())
    return covered


def ruleset_uses_conntrack(ruleset: dict[str, Any]) -> bool:
    """True when rules keep conntrack active for both IPv4 and IPv6."""
    return tracked_families(ruleset) == {"ip", "ip6"}


def list_ruleset(netns: NetnsRef) -> dict[str, Any]:
    """The namespace's whole ruleset as nft's JSON document."""
    output = run_nft(["-j", "list", "ruleset"], netns)
    try:
        parsed: dict[str, Any] = json.loads(output) if output.strip() else {}
    except json.JSONDecodeError as exc:
        raise KernelError(f"nft -j list ruleset: unreadable output ({exc})") from exc
    return parsed


def conntrack_in_use(netns: NetnsRef) -> bool:
    """Does some rule in this namespace already keep conntrack active?"""
    return ruleset_uses_conntrack(list_ruleset(netns))


def ruleset_uses_ct_labels(ruleset: dict[str, Any], own_table: str) -> bool:
    """True when a rule outside `own_table` reads or writes conntrack labels (`ct label`,
    iptables' connlabel): conntrail's labels would then mix with them."""
    for item in ruleset.get("nftables", []):
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict) or rule.get("table") == own_table:
            continue
        for key, value in _walk(rule.get("expr", [])):
            if key == "ct" and isinstance(value, dict) and value.get("key") == "label":
                return True
            if key == "xt" and isinstance(value, dict) and value.get("name") == "connlabel":
                return True
    return False


def uses_ct_labels(netns: NetnsRef, own_table: str) -> bool:
    """Does a rule of someone else's in this namespace use conntrack labels?"""
    return ruleset_uses_ct_labels(list_ruleset(netns), own_table)


def table_exists(netns: NetnsRef) -> bool:
    """Is conntrail's own table present?"""
    output = run_nft(["list", "tables", TABLE_FAMILY], netns)
    return any(line.split()[-1:] == [TABLE_NAME] for line in output.splitlines())


def install_table(netns: NetnsRef) -> None:
    """Create conntrail's table (replacing an older copy of it) so conntrack runs here."""
    if table_exists(netns):
        run_nft(["delete", "table", TABLE_FAMILY, TABLE_NAME], netns)
    run_nft(["-f", "-"], netns, stdin=CONNTRACK_TABLE)
    where = f" in netns {netns.name}" if netns.name else ""
    log.info("installed nft table %s %s to activate conntrack%s", TABLE_FAMILY, TABLE_NAME,
             where)


def remove_table(netns: NetnsRef) -> None:
    """Delete conntrail's table if present; never touches any other table."""
    if table_exists(netns):
        run_nft(["delete", "table", TABLE_FAMILY, TABLE_NAME], netns)
        log.info("removed nft table %s %s", TABLE_FAMILY, TABLE_NAME)

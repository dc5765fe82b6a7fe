"""Which rulesets already keep conntrack active (nft JSON, no kernel needed)."""

from __future__ import annotations

from typing import Any

from conntrail.kernel.nft import ruleset_uses_conntrack, tracked_families


def _rule(family: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"rule": {"family": family, "table": "t", "chain": "c", "expr": list(expr)}}


CT_STATE = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["new"]}}
MASQ = {"masquerade": None}
XT_STATE = {"xt": {"type": "match", "name": "state"}}
COUNTER = {"counter": {"packets": 0, "bytes": 0}}


def test_inet_ct_rule_covers_both() -> None:
    assert ruleset_uses_conntrack({"nftables": [_rule("inet", CT_STATE)]})


def test_ip_only_masquerade_leaves_ipv6_untracked() -> None:
    ruleset = {"nftables": [_rule("ip", MASQ)]}
    assert tracked_families(ruleset) == {"ip"}
    assert not ruleset_uses_conntrack(ruleset)


def test_ip_and_ip6_rules_together_cover_both() -> None:
    assert ruleset_uses_conntrack({"nftables": [_rule("ip", XT_STATE), _rule("ip6", CT_STATE)]})


def test_bridge_and_plain_rules_do_not_count() -> None:
    ruleset = {"nftables": [_rule("bridge", CT_STATE), _rule("inet", COUNTER),
                            {"metainfo": {"version": "1.0.6"}}]}
    assert tracked_families(ruleset) == set()


def test_empty_ruleset() -> None:
    assert not ruleset_uses_conntrack({})

"""Inventory → nftables ruleset: golden files are the spec, plus merge exactness and options.

The goldens live in tests/data/inventory/*.nft (each is also loaded by `nft -c -f` in
tests/integration/test_nft_ruleset.py). After a deliberate change to the renderer, rewrite
them with `python3 -m pytest tests/unit/inventory --regen-golden` and read the diff.
"""

from __future__ import annotations

import calendar
import difflib
import random
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conntrail.errors import ConfigError
from conntrail.inventory.model import ANY_FAMILY, Direction, InventoryEntry
from conntrail.inventory.nftables import RulesetOptions, render_ruleset
from conntrail.model import AF_INET, AF_INET6

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "data" / "inventory"
T0 = calendar.timegm((2026, 11, 20, 13, 0, 0)) * 1_000_000_000
MINUTE = 60 * 1_000_000_000
GENERATED = calendar.timegm((2026, 11, 21, 8, 0, 0)) * 1_000_000_000

IN, OUT, FWD, LOCAL = Direction.INBOUND, Direction.OUTBOUND, Direction.FORWARDED, Direction.LOCAL
TCP, UDP, ICMP, ICMPV6, SCTP, UDPLITE, DCCP, GRE, ESP = 6, 17, 1, 58, 132, 136, 33, 47, 50


def entry(direction: Direction, family: int, proto: int, src: str, dst: str, *,
          dport: int | None = None, sport: int | None = None,
          icmp: tuple[int, int | None] | None = None, flows: int = 1, minute: int = 0,
          confirmed: bool = True, netns: str = "") -> InventoryEntry:
    """An entry first seen at T0 and last seen `minute` minutes later."""
    icmp_type, icmp_code = icmp if icmp is not None else (None, None)
    return InventoryEntry(netns=netns, direction=direction, family=family, proto=proto,
                          src=src, dst=dst, sport=sport, dport=dport, icmp_type=icmp_type,
                          icmp_code=icmp_code, first_ns=T0, last_ns=T0 + minute * MINUTE,
                          flows=flows, confirmed=confirmed, packets=10 * flows,
                          bytes=1000 * flows)


def options(**overrides: object) -> RulesetOptions:
    return RulesetOptions(**{"generated_ns": GENERATED, **overrides})  # type: ignore[arg-type]


@dataclass(frozen=True)
class Case:
    entries: list[InventoryEntry]
    options: RulesetOptions


CASES: dict[str, Case] = {
    # v4 and v6 side by side; sources merged, then destinations, then ports.
    "mixed_v4_v6": Case([
        entry(IN, AF_INET, TCP, "198.18.1.2", "198.18.2.2", dport=80, flows=5, minute=62),
        entry(IN, AF_INET, TCP, "198.18.1.3", "198.18.2.2", dport=80, flows=2, minute=10),
        entry(IN, AF_INET, TCP, "198.18.1.2", "198.18.2.2", dport=443, flows=4, minute=30),
        entry(IN, AF_INET, TCP, "198.18.1.3", "198.18.2.2", dport=443, flows=1, minute=20),
        entry(IN, AF_INET6, TCP, "2001:db8:1::2", "2001:db8:2::2", dport=443, flows=3,
              minute=40),
        entry(IN, AF_INET6, TCP, "2001:db8:1::3", "2001:db8:2::2", dport=443, minute=41),
        entry(OUT, AF_INET, UDP, "198.18.2.2", "198.18.3.53", dport=53, flows=20, minute=50),
        entry(OUT, AF_INET, UDP, "198.18.2.2", "198.18.3.54", dport=53, flows=7, minute=51),
        entry(OUT, AF_INET6, UDP, "2001:db8:2::2", "2001:db8:3::53", dport=53, flows=9,
              minute=52),
        entry(FWD, AF_INET, TCP, "198.18.1.2", "198.18.5.25", dport=25, minute=5),
        entry(FWD, AF_INET6, TCP, "2001:db8:1::2", "2001:db8:5::25", dport=25, minute=6),
    ], options()),
    # --group-by networks: overlaps absorbed, a set over named_set_min and a shared set named.
    "grouped_cidrs": Case([
        entry(IN, AF_INET, TCP, "198.18.0.0/24", "198.18.2.2", dport=22, flows=3, minute=1),
        entry(IN, AF_INET, TCP, "198.18.1.0/24", "198.18.2.2", dport=22, flows=2, minute=2),
        entry(IN, AF_INET, TCP, "198.18.1.7", "198.18.2.2", dport=22, minute=3),
        entry(IN, AF_INET, UDP, "198.18.0.0/24", "198.18.2.3", dport=161, flows=6, minute=4),
        entry(IN, AF_INET, UDP, "198.18.1.0/24", "198.18.2.3", dport=161, flows=1, minute=5),
        entry(IN, AF_INET6, TCP, "2001:db8:100::/48", "2001:db8:2::/64", dport=22, minute=6),
        entry(IN, AF_INET6, TCP, "2001:db8:100:5::/64", "2001:db8:2::/64", dport=22,
              minute=7),
        *[entry(OUT, AF_INET, TCP, "198.18.2.2", f"198.18.{16 + n}.0/24", dport=443,
                flows=n + 1, minute=10 + n) for n in range(9)],
    ], options()),
    # Ports only (--merge-families): no address or family match; one family with no address.
    "ports_only": Case([
        entry(IN, ANY_FAMILY, TCP, "", "", dport=22, flows=11, minute=1),
        entry(IN, ANY_FAMILY, TCP, "", "", dport=80, flows=12, minute=2),
        entry(IN, ANY_FAMILY, TCP, "", "", dport=443, flows=13, minute=3),
        entry(IN, ANY_FAMILY, SCTP, "", "", dport=3868, minute=4),
        entry(IN, ANY_FAMILY, UDPLITE, "", "", dport=5004, minute=5),
        entry(IN, ANY_FAMILY, DCCP, "", "", dport=5001, minute=6),
        entry(IN, AF_INET, UDP, "", "", dport=67, flows=2, minute=7),
        entry(OUT, ANY_FAMILY, TCP, "", "", dport=443, flows=40, minute=8),
        entry(OUT, ANY_FAMILY, UDP, "", "", dport=53, flows=90, minute=9),
        entry(OUT, ANY_FAMILY, GRE, "", "", flows=1, minute=10),
    ], options()),
    # ICMP and ICMPv6 by type and code (numbers), types merged under one code; other protocols.
    "icmp": Case([
        entry(IN, AF_INET, ICMP, "198.18.1.2", "198.18.2.2", icmp=(8, 0), flows=6, minute=1),
        entry(IN, AF_INET, ICMP, "198.18.1.3", "198.18.2.2", icmp=(8, 0), flows=2, minute=2),
        entry(IN, AF_INET, ICMP, "198.18.1.2", "198.18.2.2", icmp=(13, 0), minute=3),
        entry(IN, AF_INET, ICMP, "198.18.1.3", "198.18.2.2", icmp=(13, 0), minute=3),
        entry(IN, AF_INET, ICMP, "198.18.1.4", "198.18.2.2", icmp=(0, 0), minute=3),
        entry(IN, AF_INET6, ICMPV6, "2001:db8:1::2", "2001:db8:2::2", icmp=(128, 0),
              flows=4, minute=4),
        entry(OUT, AF_INET, ICMP, "198.18.2.2", "", icmp=(8, None), flows=3, minute=5),
        entry(OUT, AF_INET6, ICMPV6, "2001:db8:2::2", "2001:db8:3::1", icmp=(128, 0),
              minute=6),
        entry(FWD, AF_INET, ESP, "198.18.1.2", "198.18.5.5", flows=2, minute=7),
        entry(FWD, AF_INET6, GRE, "2001:db8:1::2", "2001:db8:5::5", minute=8),
    ], options()),
    # A fixed source port is matched (IKE, NTP); an ephemeral one (None) is not.
    "fixed_sport": Case([
        entry(OUT, AF_INET, UDP, "198.18.2.2", "198.18.6.6", sport=500, dport=500, flows=8,
              minute=1),
        entry(OUT, AF_INET, UDP, "198.18.2.2", "198.18.6.6", sport=4500, dport=4500,
              flows=30, minute=2),
        entry(OUT, AF_INET, UDP, "198.18.2.2", "198.18.6.7", sport=123, dport=123, minute=3),
        entry(OUT, AF_INET, UDP, "198.18.2.2", "198.18.6.7", dport=123, flows=2, minute=4),
        entry(IN, AF_INET6, UDP, "2001:db8:6::6", "2001:db8:2::2", sport=500, dport=500,
              minute=5),
    ], options()),
    # Never-answered entries stay out and are listed; one of the same shape as an admitted
    # entry is admitted anyway, so it is not listed.
    "unconfirmed": Case([
        entry(IN, AF_INET, TCP, "198.18.1.2", "198.18.2.2", dport=80, flows=4, minute=1),
        entry(IN, AF_INET, TCP, "198.18.1.2", "198.18.2.2", dport=80, flows=1, minute=2,
              confirmed=False),
        entry(IN, AF_INET, TCP, "198.18.1.2", "198.18.2.2", dport=81, flows=2, minute=3,
              confirmed=False),
        *[entry(IN, AF_INET, TCP, "198.18.9.9", "198.18.2.2", dport=port, minute=4,
                confirmed=False) for port in (21, 22, 23, 25, 110)],
        entry(OUT, AF_INET6, UDP, "2001:db8:2::2", "2001:db8:7::7", dport=9999, minute=5,
              confirmed=False),
    ], options()),
    # LOCAL (loopback or own address) goes to output and input, merging with INBOUND there;
    # the port set both chains use is a named set.
    "local": Case([
        entry(LOCAL, AF_INET, TCP, "127.0.0.1", "127.0.0.1", dport=5432, flows=50,
              minute=1),
        entry(LOCAL, AF_INET, TCP, "127.0.0.1", "127.0.0.1", dport=6379, flows=70,
              minute=2),
        entry(LOCAL, AF_INET6, TCP, "::1", "::1", dport=8080, flows=3, minute=3),
        entry(LOCAL, AF_INET, TCP, "198.18.2.2", "198.18.2.2", dport=8443, flows=2,
              minute=4),
        entry(IN, AF_INET, TCP, "198.18.1.2", "198.18.2.2", dport=8443, minute=5),
        entry(LOCAL, AF_INET, UDP, "127.0.0.1", "127.0.0.53", dport=53, flows=9,
              minute=6, confirmed=False),
    ], options()),
    # reject policy, another table name, named sets from 3 elements on.
    "reject_policy": Case([
        entry(IN, AF_INET, TCP, "198.18.1.2", "198.18.2.2", dport=22, minute=1),
        entry(IN, AF_INET, TCP, "198.18.1.3", "198.18.2.2", dport=22, minute=2),
        entry(IN, AF_INET, TCP, "198.18.1.4", "198.18.2.2", dport=22, minute=3),
        entry(FWD, AF_INET, TCP, "198.18.1.2", "198.18.5.5", dport=443, minute=4),
        entry(FWD, AF_INET, TCP, "198.18.1.3", "198.18.5.5", dport=443, minute=5),
        entry(FWD, AF_INET, TCP, "198.18.1.4", "198.18.5.5", dport=443, minute=6),
        *[entry(OUT, AF_INET, UDP, "198.18.2.2", f"198.18.7.{n}", dport=123, minute=7)
          for n in (1, 2, 3)],
        entry(OUT, AF_INET6, UDP, "2001:db8:2::2", "2001:db8:7::1", dport=123, minute=8),
    ], options(policy="reject", table="edge_fw", named_set_min=2)),
    # Nothing observed, accept policy: the skeleton alone.
    "empty_accept": Case([], options(policy="accept")),
}


@pytest.fixture
def regen_golden(request: pytest.FixtureRequest) -> bool:
    """True when run with --regen-golden (tests/conftest.py)."""
    return bool(request.config.getoption("--regen-golden"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_ruleset_matches_golden(name: str, regen_golden: bool) -> None:
    case = CASES[name]
    actual = render_ruleset(case.entries, case.options)
    golden = GOLDEN_DIR / f"{name}.nft"
    if regen_golden:
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        golden.write_text(actual, encoding="utf-8")
    assert golden.exists(), f"{golden.name} missing: run with --regen-golden to create it"
    expected = golden.read_text(encoding="utf-8")
    if expected != actual:
        diff = difflib.unified_diff(expected.splitlines(), actual.splitlines(),
                                    f"{golden.name} (golden)", "rendered now", lineterm="")
        pytest.fail("\n".join(diff), pytrace=False)


def test_every_golden_has_its_case() -> None:
    goldens = sorted(path.stem for path in GOLDEN_DIR.glob("*.nft"))
    assert goldens == sorted(CASES), "a golden file without its case, or the reverse"


@pytest.mark.parametrize("name", sorted(CASES))
def test_order_of_entries_does_not_matter(name: str) -> None:
    case = CASES[name]
    expected = render_ruleset(case.entries, case.options)
    for seed in range(5):
        shuffled = list(case.entries)
        random.Random(seed).shuffle(shuffled)
        assert render_ruleset(shuffled, case.options) == expected
    assert render_ruleset(list(reversed(case.entries)), case.options) == expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_comments_fit_in_nft_limit(name: str) -> None:
    text = render_ruleset(CASES[name].entries, CASES[name].options)
    comments = re.findall(r'comment "([^"]*)"', text)
    assert comments
    assert all(len(comment.encode()) <= 128 for comment in comments)


def test_chain_prelude_order() -> None:
    """established first, IPv6 ND/MLD before `ct state invalid drop` (the kernel leaves them
    untracked, older kernels invalid), then the admitted flows."""
    text = render_ruleset(CASES["mixed_v4_v6"].entries, options())
    for chain in ("input", "output", "forward"):
        body = text.split(f"chain {chain} {{")[1].split("\n\t}")[0].splitlines()[1:]
        rules = [line.strip() for line in body if line.strip()]
        assert rules[1] == "ct state established,related accept"
        assert "nd-neighbor-solicit" in rules[2] and "ip6 hoplimit 255" in rules[2]
        assert "mld2-listener-report" in rules[3] and "ip6 hoplimit 1" in rules[3]
        assert rules[4] == "ct state invalid drop"
        assert all(rule.endswith('"') and " accept comment " in rule for rule in rules[5:])


# --- options and entries that are refused ---------------------------------------------------

@pytest.mark.parametrize(("option", "value"), [
    ("policy", "deny"), ("policy", "DROP"), ("policy", ""),
    ("table", ""), ("table", "1abc"), ("table", "with-dash"), ("table", "a b"),
    ("table", "x" * 65), ("table", 'x"; flush ruleset'),
    ("named_set_min", 0), ("named_set_min", -1), ("named_set_min", True),
    ("named_set_min", 2.5), ("generated_ns", -1), ("generated_ns", 1.5),
])
def test_invalid_options_name_the_option(option: str, value: object) -> None:
    with pytest.raises(ConfigError) as raised:
        options(**{option: value})
    assert raised.value.path == option
    assert option in str(raised.value)


def test_defaults() -> None:
    default = RulesetOptions(generated_ns=0)
    assert (default.table, default.policy, default.named_set_min) == \
        ("conntrail_policy", "drop", 8)
    assert "policy drop;" in render_ruleset([], default)


def test_options_are_frozen() -> None:
    with pytest.raises(AttributeError):
        options().policy = "accept"  # type: ignore[misc]


def test_entries_from_two_namespaces_are_refused() -> None:
    entries = [entry(IN, AF_INET, TCP, "198.18.1.2", "198.18.2.2", dport=22, netns="a"),
               entry(IN, AF_INET, TCP, "198.18.1.2", "198.18.2.2", dport=22, netns="b")]
    with pytest.raises(ConfigError, match="2 namespaces") as raised:
        render_ruleset(entries, options())
    assert raised.value.path == "netns"


def test_namespace_is_named_in_the_header() -> None:
    text = render_ruleset([entry(IN, AF_INET, TCP, "", "", dport=22, netns="web")],
                          options())
    assert "# namespace: web\n" in text


@pytest.mark.parametrize("bad", [
    entry(IN, AF_INET, TCP, "198.18.1.300", "", dport=22),
    entry(IN, AF_INET, TCP, "2001:db8::1", "", dport=22),
    entry(IN, AF_INET6, TCP, "198.18.1.2", "", dport=22),
    entry(IN, ANY_FAMILY, TCP, "198.18.1.2", "2001:db8::1", dport=22),
    entry(IN, 7, TCP, "", "", dport=22),
    entry(IN, AF_INET, TCP, "", "", dport=65536),
    entry(IN, AF_INET, ICMP, "", "", icmp=(256, 0)),
    entry(IN, AF_INET, 300, "", ""),
])
def test_malformed_entries_are_refused(bad: InventoryEntry) -> None:
    with pytest.raises(ValueError, match="entry"):
        render_ruleset([bad], options())


def test_addresses_are_normalised() -> None:
    text = render_ruleset([entry(IN, AF_INET, TCP, "198.18.1.9/24", "198.18.2.2/32", dport=1),
                           entry(IN, AF_INET6, TCP, "2001:DB8:0::1", "", dport=1)],
                          options())
    assert "ip saddr 198.18.1.0/24 ip daddr 198.18.2.2 tcp dport 1 accept" in text
    assert "ip6 saddr 2001:db8::1 tcp dport 1 accept" in text


def test_any_address_absorbs_the_set() -> None:
    text = render_ruleset([entry(IN, AF_INET, TCP, "198.18.1.2", "", dport=22),
                           entry(IN, AF_INET, TCP, "", "", dport=22)], options())
    assert "\t\tmeta nfproto ipv4 tcp dport 22 accept" in text
    assert "198.18.1.2" not in text


# --- exactness: the rules admit the union of the confirmed entries, nothing more ------------

HOSTS = ["198.18.1.1", "198.18.1.2", "198.18.1.3", "198.18.1.4"]
OTHER = "198.18.9.9"  # an address no entry names: reaches only rules without an address
PORTS = [22, 53, 80, 443]
CHAIN_OF = {IN: ("input",), OUT: ("output",), FWD: ("forward",), LOCAL: ("output", "input")}

Packet = tuple[str, str, str, int, int]  # chain, src, dst, proto, dport


def _admitted_by_entries(entries: list[InventoryEntry]) -> set[Packet]:
    found: set[Packet] = set()
    for item in entries:
        if not item.confirmed:
            continue
        for chain in CHAIN_OF[item.direction]:
            for src in [item.src] if item.src else [*HOSTS, OTHER]:
                for dst in [item.dst] if item.dst else [*HOSTS, OTHER]:
                    assert item.dport is not None
                    found.add((chain, src, dst, item.proto, item.dport))
    return found


def _parse_values(text: str, sets: dict[str, set[str]]) -> set[str] | None:
    if text.startswith("@"):
        return sets[text[1:]]
    if text.startswith("{"):
        return {value.strip() for value in text.strip("{} ").split(",")}
    return {text}


_VALUE = r"(@\w+|\{[^}]*\}|\S+)"
_RULE = re.compile(rf"^(?:ip saddr {_VALUE} )?(?:ip daddr {_VALUE} )?(?:meta nfproto ipv4 )?"
                   rf"(tcp|udp) dport {_VALUE} accept comment")


def _admitted_by_ruleset(text: str) -> set[Packet]:
    sets = {name: {value.strip() for value in elements.split(",")}
            for name, elements in re.findall(
                r"set (\w+) \{[^}]*?elements = \{([^}]*)\}", text)}
    found: set[Packet] = set()
    chain = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("chain "):
            chain = stripped.split()[1]
        match = _RULE.match(stripped)
        if not match:
            continue
        saddr, daddr, proto, ports = match.groups()
        srcs = _parse_values(saddr, sets) if saddr else {*HOSTS, OTHER}
        dsts = _parse_values(daddr, sets) if daddr else {*HOSTS, OTHER}
        for src in srcs or ():
            for dst in dsts or ():
                for port in _parse_values(ports, sets) or ():
                    found.add((chain, src, dst, TCP if proto == "tcp" else UDP, int(port)))
    return found


_entries = st.lists(st.builds(
    lambda direction, src, dst, proto, port, confirmed, flows: entry(
        direction, AF_INET, proto, src, dst, dport=port, confirmed=confirmed, flows=flows),
    st.sampled_from([IN, OUT, FWD, LOCAL]), st.sampled_from(["", *HOSTS]),
    st.sampled_from(["", *HOSTS]), st.sampled_from([TCP, UDP]), st.sampled_from(PORTS),
    st.booleans(), st.integers(1, 5)), max_size=25)


@given(entries=_entries, named_set_min=st.integers(1, 5))
@settings(max_examples=300, deadline=None)
def test_merged_rules_admit_exactly_the_confirmed_entries(
        entries: list[InventoryEntry], named_set_min: int) -> None:
    text = render_ruleset(entries, options(named_set_min=named_set_min))
    assert _admitted_by_ruleset(text) == _admitted_by_entries(entries)
    rule_flows = sum(int(n) for n in re.findall(r'accept comment "flows (\d+),', text))
    assert rule_flows == sum(item.flows * len(CHAIN_OF[item.direction])
                             for item in entries if item.confirmed)


def test_the_parser_of_this_test_sees_every_admit_rule() -> None:
    """Guards the property test: every admit rule it renders is one _RULE understands."""
    entries = [entry(d, AF_INET, p, s, t, dport=port) for d in (IN, LOCAL)
               for p in (TCP, UDP) for s in ("", HOSTS[0], HOSTS[1]) for t in ("", HOSTS[2])
               for port in PORTS[:3]]
    text = render_ruleset(entries, options(named_set_min=2))
    admit = [line.strip() for line in text.splitlines() if " accept comment \"flows" in line]
    assert admit and all(_RULE.match(line) for line in admit)

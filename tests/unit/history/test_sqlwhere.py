"""SQL WHERE clauses from filter expressions: golden SQL for both dialects, and the SQLite
clause agreeing with the live predicate on random flows and filters."""

from __future__ import annotations

import contextlib
import functools
import itertools
import random
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.unit.filters.test_match import BARE, ICMP4, TCP4, UDP6, V4_MAPPED

from conntrail.errors import ConfigError, FilterError
from conntrail.filters.fields import SPECS
from conntrail.filters.match import (
    And,
    Compare,
    Expr,
    Flags,
    Glob,
    IntRange,
    Literal,
    Not,
    Or,
    compile_predicate,
    parse,
)
from conntrail.history import sqlwhere
from conntrail.history.addr import pack, pack_optional
from conntrail.history.rows import COLUMNS, ClosedBy, build_row
from conntrail.history.sqlwhere import Dialect, compile_where
from conntrail.model import (
    AF_INET,
    AF_INET6,
    Attribution,
    Confidence,
    Counters,
    CtStatus,
    DccpState,
    EventKind,
    Flow,
    FlowEvent,
    FlowTuple,
    SctpState,
    TcpState,
)

SQLITE, POSTGRES = Dialect.SQLITE, Dialect.POSTGRES
SAMPLES = (TCP4, UDP6, ICMP4, BARE, V4_MAPPED)  # the filter tests' events, absent parts too

# ---------------------------------------------------------------------------------------------
# Running a clause over rows in SQLite
# ---------------------------------------------------------------------------------------------

_ADDRESS_COLUMNS = ("orig_src", "orig_dst", "reply_src", "reply_dst")
_BLOB, _TEXT = frozenset(_ADDRESS_COLUMNS), frozenset({"netns", "labels", "exe", "cmdline",
                                                       "unit"})


def _column_type(name: str) -> str:
    return "BLOB" if name in _BLOB else "TEXT" if name in _TEXT else "INTEGER"


SCHEMA = "CREATE TABLE flows (" + ", ".join(f"{c} {_column_type(c)}" for c in COLUMNS) + ")"
INSERT = f"INSERT INTO flows VALUES ({', '.join('?' * len(COLUMNS))})"


@contextlib.contextmanager
def flows_table(events: Sequence[FlowEvent]) -> Iterator[sqlite3.Connection]:
    """An in-memory table holding each event's flow as the history stores it (rowid 1..n)."""
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.execute(SCHEMA)
        for start_ns, event in enumerate(events, 1):
            row = build_row(event.flow, event.netns, start_ns, None, ClosedBy.OPEN, event.who)
            values = row._asdict()
            values.update({name: pack_optional(values[name]) for name in _ADDRESS_COLUMNS})
            db.execute(INSERT, tuple(values.values()))
        yield db


def sql_matches(expr: Expr, events: Sequence[FlowEvent]) -> set[int]:
    """Positions (from 1) of the events whose stored rows the SQLite clause selects."""
    where, params = compile_where(expr, SQLITE)
    with flows_table(events) as db:
        return {rowid for (rowid,) in db.execute(f"SELECT rowid FROM flows WHERE {where}",
                                                 params)}


def live_matches(expr: Expr, events: Sequence[FlowEvent]) -> set[int]:
    """Positions (from 1) of the events the live predicate passes."""
    predicate = compile_predicate(expr)
    return {index for index, event in enumerate(events, 1) if predicate(event)}


# ---------------------------------------------------------------------------------------------
# Golden SQL
# ---------------------------------------------------------------------------------------------

V4_NET = (b"\xc6\x12\x00\x00", b"\xc6\x13\xff\xff")  # 198.18.0.0/15
DB8 = pack("2001:db8::")
DB8_NET = (DB8, DB8[:4] + b"\xff" * 12)  # 2001:db8::/32
NAMED = ("(proto = 6 AND state BETWEEN 0 AND 9) OR (proto = 132 AND state BETWEEN 0 AND 9) "
         "OR (proto = 33 AND state BETWEEN 0 AND 9)")

GOLDEN: list[tuple[str, str, list[Any], str, list[Any]]] = [
    ("dport == 443", "orig_dport = ?", [443], "orig_dport = %s", [443]),
    (
        "tcp and dport == 443 and not src in 198.18.0.0/15",
        "(proto = ? AND orig_dport = ? AND NOT (length(orig_src) = 4 AND orig_src BETWEEN ? "
        "AND ?))",
        [6, 443, *V4_NET],
        "(proto = %s AND orig_dport = %s AND NOT (orig_src <<= %s::inet))",
        [6, 443, "198.18.0.0/15"],
    ),
    (
        "udp && (dport in {53, 5353} || sport in 1000-2000)",
        "(proto = ? AND (orig_dport IN (?, ?) OR orig_sport BETWEEN ? AND ?))",
        [17, 53, 5353, 1000, 2000],
        "(proto = %s AND (orig_dport IN (%s, %s) OR orig_sport BETWEEN %s AND %s))",
        [17, 53, 5353, 1000, 2000],
    ),
    (
        "ipv6 and host == 2001:db8::1 and dst in 2001:db8::/32",
        "(family = ? AND (orig_src = ? OR orig_dst = ?) AND (length(orig_dst) = 16 AND "
        "orig_dst BETWEEN ? AND ?))",
        [10, pack("2001:db8::1"), pack("2001:db8::1"), *DB8_NET],
        "(family = %s AND (orig_src = %s::inet OR orig_dst = %s::inet) AND "
        "orig_dst <<= %s::inet)",
        [10, "2001:db8::1", "2001:db8::1", "2001:db8::/32"],
    ),
    (
        "status has {SEEN_REPLY, ASSURED} and state == established",
        "((status & ?) = ? AND ((proto = 6 AND state = ?) OR (proto = 132 AND state = ?)))",
        [6, 6, 3, 4],
        "((status & %s) = %s AND ((proto = 6 AND state = %s) OR (proto = 132 AND state = %s)))",
        [6, 6, 3, 4],
    ),
    (
        "netns == qrouter-* and dnat and bytes > 1000000",
        "(netns GLOB ? AND nat IN (?, ?) AND "
        "COALESCE(orig_bytes + reply_bytes, orig_bytes, reply_bytes) > ?)",
        ["qrouter-*", 2, 3, 1000000],
        "(netns LIKE %s AND nat IN (%s, %s) AND "
        "COALESCE(orig_bytes + reply_bytes, orig_bytes, reply_bytes) > %s)",
        ["qrouter-%", 2, 3, 1000000],
    ),
    # NOT over a column that may be NULL: an absent mark/port passes, as in the live filter.
    ("mark/0xff != 1", "((mark & ?) = ?) IS NOT TRUE", [255, 1],
     "((mark & %s) = %s) IS NOT TRUE", [255, 1]),
    ("not port == 22", "(orig_sport = ? OR orig_dport = ?) IS NOT TRUE", [22, 22],
     "(orig_sport = %s OR orig_dport = %s) IS NOT TRUE", [22, 22]),
    ("nat", "NOT (nat = ?)", [0], "NOT (nat = %s)", [0]),
    ("unreplied", "NOT ((status & ?) = ?)", [2, 2], "NOT ((status & %s) = %s)", [2, 2]),
    # A state number matches only where the protocol has no name for it (state_name's text).
    (
        "state in {3, 12}",
        f"(NOT ({NAMED}) AND state IN (?, ?))",
        [3, 12],
        f"(NOT ({NAMED}) AND state IN (%s, %s))",
        [3, 12],
    ),
    (
        "state == SYN*",
        f"((proto = 6 AND state IN (?, ?, ?)) OR (NOT ({NAMED}) AND CAST(state AS TEXT) "
        "GLOB ?))",
        [1, 2, 9, "SYN*"],
        f"((proto = 6 AND state IN (%s, %s, %s)) OR (NOT ({NAMED}) AND CAST(state AS TEXT) "
        "LIKE %s))",
        [1, 2, 9, "SYN%"],
    ),
    # Glob escapes: a literal [ (no closing ]) and LIKE's own % and _.
    ('netns == "a[_%*"', "netns GLOB ?", ["a[[]_%*"], "netns LIKE %s", ["a[\\_\\%%"]),
    # fnmatch classes: `[^x]` is no negation in fnmatch (only `!` is), GLOB needs ^ moved.
    ('netns == "n[^x]?"', "netns GLOB ?", ["n[x^]?"], "netns ~ %s",
     ["^n[\\U0000005E-\\U0000005E\\U00000078-\\U00000078].$"]),
    ('netns == "[!a-c]*"', "netns GLOB ?", ["[^a-c]*"], "netns ~ %s",
     ["^[^\\U00000061-\\U00000063].*$"]),
    ('netns == "[]-]*"', "netns GLOB ?", ["[]-]*"], "netns ~ %s",
     ["^[\\U0000002D-\\U0000002D\\U0000005D-\\U0000005D].*$"]),
    ('netns == "[z-a]*"', "FALSE", [], "FALSE", []),
    (
        "bytes in 5-18446744073709551615",
        "COALESCE(orig_bytes + reply_bytes, orig_bytes, reply_bytes) BETWEEN ? AND ?",
        [5, 1.8446744073709552e19],
        "COALESCE(orig_bytes + reply_bytes, orig_bytes, reply_bytes) BETWEEN %s AND %s",
        [5, 18446744073709551615],
    ),
]


@pytest.mark.parametrize(("text", "sql", "params"), [g[:3] for g in GOLDEN])
def test_sqlite_golden(text: str, sql: str, params: list[Any]) -> None:
    assert compile_where(parse(text), SQLITE) == (sql, params)


@pytest.mark.parametrize(("text", "sql", "params"), [(g[0], *g[3:]) for g in GOLDEN])
def test_postgres_golden(text: str, sql: str, params: list[Any]) -> None:
    assert compile_where(parse(text), POSTGRES) == (sql, params)


@pytest.mark.parametrize(
    ("tree", "sql", "params"),
    [
        (And(()), "TRUE", []),
        (Or(()), "FALSE", []),
        (Not(Or(())), "NOT (FALSE)", []),
        # The live filter compares NAT names exactly: an upper-case one never matches.
        (Compare("nat", "==", (Literal("SNAT"),)), "FALSE", []),
        (Compare("dport", "==", (IntRange(1, 2),)), "orig_dport BETWEEN ? AND ?", [1, 2]),
    ],
)
def test_hand_built_trees(tree: Expr, sql: str, params: list[Any]) -> None:
    assert compile_where(tree, SQLITE) == (sql, params)
    assert sql_matches(tree, SAMPLES) == live_matches(tree, SAMPLES)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

EVENT_REASON = ("field 'event' does not apply to stored flows (each row is a whole flow); "
                "use --open or --closed")


@pytest.mark.parametrize("text", ["event == new", "tcp and not destroy", "dump"])
def test_event_does_not_apply_to_stored_flows(text: str) -> None:
    for dialect in Dialect:
        with pytest.raises(FilterError) as info:
            compile_where(parse(text), dialect)
        assert (info.value.path, info.value.reason) == ("--filter", EVENT_REASON)
        assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize(
    ("tree", "reason"),
    [
        (Compare("nope", "==", (Literal(1),)), "unknown field 'nope'"),
        (Compare("dport", "==", (Glob("1*"),)), "malformed comparison"),
        (Compare("status", "==", (Flags(CtStatus.ASSURED),)), "malformed comparison"),
        (Compare("proto", "<", (Literal(6),)), "malformed comparison"),
        (Compare("netns", "==", (Literal("a"),), mask=0xFF), "malformed comparison"),
        ("tcp", "not a filter expression"),
    ],
)
def test_malformed_trees(tree: Any, reason: str) -> None:
    for dialect in Dialect:
        with pytest.raises(FilterError) as info:
            compile_where(tree, dialect)
        assert info.value.path == "--filter" and info.value.reason.startswith(reason)


def test_every_field_but_event_maps_to_columns() -> None:
    assert set(SPECS) == {*sqlwhere._COLUMNS, "state", *sqlwhere._NOT_STORED}
    assert {c for cols in sqlwhere._COLUMNS.values() for c in cols if c.isidentifier()} \
        <= set(COLUMNS)


@pytest.mark.parametrize("states", [TcpState, SctpState, DccpState])
def test_state_enums_are_dense_as_the_between_assumes(states: Any) -> None:
    numbers = sorted(int(state) for state in states)
    assert numbers == list(range(numbers[0], numbers[-1] + 1))


# ---------------------------------------------------------------------------------------------
# NULL handling, explicitly (SQL three-valued logic against Python booleans)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text",
    [
        "not dport == 443",
        "not (dport == 443 or sport == 1)",
        "not not dport == 443",
        "port != 443",
        "not port < 1024",
        "reply.src != 198.19.0.2",
        "not reply.src in 198.19.0.0/16",
        "reply.dport not in 0-65535",
        "not (mark/0xff == 0x34 and bytes > 5)",
        "not (mark == 0x1234 or zone == 7)",
        "bytes != 1500",
        "not packets >= 5",
        "not state == ESTABLISHED",
        "state != *",
        "not (state == NONE or icmp.type == 8)",
        "not unreplied and not reply.dport == 61000",
        "src in 198.18.0.0/15",
        "src in ::ffff:0:0/96",
        "addr == 0.0.0.1",
        "not addr in {::/0, 192.0.2.0/24}",
        "not nat in {snat, both}",
    ],
)
def test_absent_values_agree(text: str) -> None:
    expr = parse(text)
    assert sql_matches(expr, SAMPLES) == live_matches(expr, SAMPLES)


# ---------------------------------------------------------------------------------------------
# Equivalence: flows x filters. One generator of flows serves both Hypothesis (random flows) and
# a fixed, seeded corpus; every single clause is checked on the corpus, and random boolean
# combinations of them on random flows.
# ---------------------------------------------------------------------------------------------

V4 = ("198.18.0.1", "198.18.0.2", "198.19.255.255", "198.20.0.1", "10.0.0.1", "0.0.0.1")
V6 = ("2001:db8::1", "2001:db8::2", "2001:db8:1::53", "2001:db9::1", "::ffff:198.18.0.1",
      "::1", "fe80::1")
NETS = ("198.18.0.0/15", "198.18.0.0/16", "198.19.0.0/24", "10.0.0.0/8", "0.0.0.0/0",
        "2001:db8::/32", "2001:db8::/48", "2001:db8:1::/64", "::/0", "::ffff:0:0/96",
        "198.18.0.1/32", "2001:db8::1/128", "198.18.0.2/31")
PORTS = (0, 22, 53, 443, 1000, 1500, 2000, 40000, 65535)
MARKS = (0, 1, 0x34, 0x1234, 0xFF34, 0xFFFFFFFF)
COUNTS = (0, 1, 5, 1000, 1 << 40, 1 << 61)  # sums stay within SQLite's int64
NETNS = ("", "ns1", "ns2", "qrouter-1234", "qrouter-", "a*b", "x?y", "n[1]", "[", "]", "-",
         "^x", "!a", "a%b_c", "back\\slash", "back\\*", "é", "ab", "n1", "nx", "1")
ADDRESSES = {AF_INET: V4, AF_INET6: V6}
PROTOS = (6, 17, 132, 33, 1, 58, 47)
STATES = (None, *range(13))  # 10..12 have no name for any protocol
STATUSES = (0, 1, 2, 4, 8, 14, 16, 32, 48, 14 | 16, 14 | 32, 14 | 48, 0xFFFF)
PORT_CHOICES = (PORTS, PORTS, PORTS, (None,))  # GRE without keys, or a port-less oddity
COUNTERS = (None, *(Counters(packets, size) for packets in COUNTS[:4] for size in COUNTS))


def _maybe(values: Sequence[Any]) -> tuple[Any, ...]:
    """values or None, None a third of the time."""
    return (None,) * (len(values) // 2 or 1) + tuple(values)


Choose = Callable[[Sequence[Any]], Any]


def _flow_tuple(choose: Choose, family: int, proto: int) -> FlowTuple:
    """A tuple with ports, or ICMP identity without ports for ICMP/ICMPv6."""
    src, dst = choose(ADDRESSES[family]), choose(ADDRESSES[family])
    zone = choose(_maybe((0, 7)))
    if proto in (1, 58):
        return FlowTuple(family, proto, src, dst, icmp_type=choose((0, 3, 8, 128)),
                         icmp_code=choose((0, 1)), icmp_id=choose((0, 77, 65535)), zone=zone)
    ports = choose(PORT_CHOICES)
    return FlowTuple(family, proto, src, dst, choose(ports), choose(ports), zone=zone)


def _flow_event(choose: Choose) -> FlowEvent:
    """A flow event with every optional part sometimes absent (the kernel always sends the
    conntrack id, and the row stores a missing one as 0, so it is always set here)."""
    family, proto = choose((AF_INET, AF_INET6)), choose(PROTOS)
    orig = _flow_tuple(choose, family, proto)
    reply = _flow_tuple(choose, family, proto) if choose((True, True, False)) else None
    flow = Flow(orig=orig, reply=reply, status=CtStatus(choose(STATUSES)),
                proto_state=choose(STATES), mark=choose(_maybe(MARKS)),
                zone=choose(_maybe((0, 7, 65535))), ct_id=choose((1, 99, 0xFFFFFFFF)),
                counters_orig=choose(COUNTERS[:1] * 8 + COUNTERS),
                counters_reply=choose(COUNTERS[:1] * 8 + COUNTERS))
    return FlowEvent(choose(tuple(EventKind)), flow, choose(NETNS), 0, _attribution(choose))


def _attribution(choose: Choose) -> Attribution | None:
    """None a third of the time, else an attribution with parts sometimes missing."""
    if choose((True, False, False)):
        return None
    return Attribution("labels", Confidence.EXACT, uid=choose((None, 0, 1000, 4242)),
                       gid=choose((None, 0, 1000)), pid=choose((None, 1, 77, 4194304)),
                       exe=choose((None, "/usr/bin/curl", "/bin/é", "")),
                       cmdline=choose((None, "curl -s http://x", "a%b_c")),
                       unit=choose((None, "nginx.service", "session-3.scope")))


@functools.cache
def _sampler(pool: tuple[Any, ...]) -> st.SearchStrategy[Any]:
    """One strategy per pool: building strategies per draw costs more than the test."""
    return st.sampled_from(pool)


@st.composite
def flow_events(draw: st.DrawFn) -> FlowEvent:
    """Random flow events from the pools."""
    return _flow_event(lambda pool: draw(_sampler(tuple(pool))))


_rng = random.Random(20261122)
CORPUS = [_flow_event(_rng.choice) for _ in range(500)]

INT_FIELDS: dict[str, Sequence[int]] = {
    "sport": PORTS, "dport": PORTS, "reply.sport": PORTS, "reply.dport": PORTS, "port": PORTS,
    "icmp.type": (0, 3, 8, 128), "icmp.code": (0, 1), "icmp.id": (0, 77, 65535),
    "mark": MARKS, "mark/0xff": (0, 1, 0x34, 0xFF), "port/0xff": (0, 0x16, 0xBB, 0xFF),
    "zone": (0, 7, 65535), "id": (1, 99, 0xFFFFFFFF), "ct_id": (0, 1, 99),
    "bytes": (*COUNTS, 1 << 62, 1 << 63, (1 << 64) - 1), "packets": COUNTS,
    "process.pid": (0, 1, 77, 4194304), "user.id": (0, 1000, 4242), "gid": (0, 1000),
}
STATE_VALUES = ("ESTABLISHED", "established", "syn_sent", "CLOSED", "OPEN", "NONE", "3", "10",
                "12", "03", "*", "S*", "?", "1?", "*E*", '"[A-F]*"', '"[!S]*"', '"1[0-2]*"',
                '"[AEIOU]*"', '"[^C]*"')
NETNS_VALUES = ("ns1", "ns*", "qrouter-*", "q*-", '"n[1]"', '"n[1]*"', '"n[[]*"', '"[*"',
                '"*]"', '"[!a-z]*"', '"[]a]*"', '"[^x]*"', '"[]-]?"', '"[a-]*"', '"[--/]*"',
                '"[z-a]*"', '"[!]*"', '"a%b_?"', '"a_*"', '"back\\*"', '"?"', '"*"', '""',
                '"??"', '"[!!]*"', '"[\\]]*"', "é", '"[é]"', '"n[!0-9]"', '"[!^]*"',
                '"[0-9-]"', '"[]^-]*"', '"*[!]]"', '"[^]*"', '"[!z-a]*"')
OTHER_FIELDS: dict[str, Sequence[str]] = {
    "proto": ("tcp", "udp", "icmp", "58", "47", "sctp", "dccp"),
    "family": ("ipv4", "ipv6"),
    "nat": ("snat", "dnat", "both", "none"),
    "state": STATE_VALUES,
    "netns": NETNS_VALUES,
    "process.executable": ("/usr/bin/curl", "*/curl", "*", '""', '"/bin/[é]"'),
    "cmdline": ('"curl *"', '"a%b_c"', "*"),
    "service": ("nginx.service", "*.scope", "*"),
    **{field: V4 + V6 + NETS for field in ("src", "dst", "reply.src", "reply.dst", "addr",
                                          "host")},
}
SHORTHANDS = ("tcp", "udp", "icmp", "icmpv6", "ipv4", "ipv6", "nat", "snat", "dnat", "assured",
              "seen_reply", "confirmed", "src_nat", "dst_nat", "unreplied",
              "status has {SEEN_REPLY, ASSURED}", "status has SRC_NAT")


def _int_clauses(field: str, pool: Sequence[int]) -> list[str]:
    """Every operator with every number, ranges between neighbours, and a mixed set."""
    texts = [f"{field} {op} {value}" for op in ("==", "!=", "<", "<=", ">", ">=")
             for value in pool]
    texts += [f"{field} in {low}-{high}" for low, high in itertools.pairwise(pool)]
    return [*texts, f"{field} not in {{{pool[0]}, {pool[-2]}-{pool[-1]}}}"]


def _value_clauses(field: str, values: Sequence[str]) -> list[str]:
    """== and != with every value, and sets of neighbours."""
    texts = [f"{field} {op} {value}" for op in ("==", "!=") for value in values]
    return texts + [f"{field} in {{{a}, {b}}}" for a, b in itertools.pairwise(values)]


CLAUSES: dict[str, list[str]] = {
    **{field: _int_clauses(field, pool) for field, pool in INT_FIELDS.items()},
    **{field: _value_clauses(field, values) for field, values in OTHER_FIELDS.items()},
    "shorthands": list(SHORTHANDS),
}


ANY_CLAUSE: st.SearchStrategy[str] = st.sampled_from([t for ts in CLAUSES.values() for t in ts])


@pytest.fixture(scope="module")
def corpus_db() -> Iterator[sqlite3.Connection]:
    """The corpus stored once for the module."""
    with flows_table(CORPUS) as db:
        yield db


@pytest.mark.parametrize("field", sorted(CLAUSES))
def test_every_clause_and_its_negation_agree_on_the_corpus(corpus_db: sqlite3.Connection,
                                                          field: str) -> None:
    for text in CLAUSES[field]:
        for expr in (parse(text), Not(parse(text))):
            where, params = compile_where(expr, SQLITE)
            rows = corpus_db.execute(f"SELECT rowid FROM flows WHERE {where}", params)
            assert {rowid for (rowid,) in rows} == live_matches(expr, CORPUS), str(expr)


@pytest.mark.parametrize("dialect", list(Dialect))
def test_values_are_only_ever_parameters(dialect: Dialect) -> None:
    placeholder = "?" if dialect is SQLITE else "%s"
    for text in (t for texts in CLAUSES.values() for t in texts):
        sql, params = compile_where(parse(text), dialect)
        assert sql.count(placeholder) == len(params), text
        # The only literals: the protocols with state names, their state bounds, and lengths.
        constants = sql.replace(sqlwhere._NAMED_STATE, "")
        constants = re.sub(r"proto = (6|132|33) AND|length\(\w+\) = (4|16) AND", "", constants)
        assert not re.search("[0-9'\"]", constants), text


def test_the_corpus_has_what_the_clauses_need() -> None:
    flows = [event.flow for event in CORPUS]
    assert any(f.reply is None for f in flows) and any(f.mark is None for f in flows)
    assert any((f.counters_orig is None) != (f.counters_reply is None) for f in flows)
    assert any(f.orig.proto == 17 and f.proto_state == 3 for f in flows)
    assert {event.netns for event in CORPUS} == set(NETNS)


@st.composite
def filter_texts(draw: st.DrawFn, depth: int = 0) -> str:
    """A random boolean combination of the clauses."""
    if depth >= 3 or draw(st.integers(0, 2)) == 0:
        return draw(ANY_CLAUSE)
    kind = draw(st.sampled_from(["and", "or", "not"]))
    if kind == "not":
        return f"not ({draw(filter_texts(depth + 1))})"
    parts = draw(st.lists(filter_texts(depth + 1), min_size=2, max_size=4))
    return "(" + f" {kind} ".join(parts) + ")"


@settings(max_examples=300, deadline=None)
@given(filter_texts(), st.lists(flow_events(), min_size=1, max_size=8))
def test_sqlite_agrees_with_the_live_filter(text: str, events: list[FlowEvent]) -> None:
    expr = parse(text)
    assert sql_matches(expr, events) == live_matches(expr, events), text

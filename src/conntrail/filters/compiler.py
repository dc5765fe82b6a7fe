"""Compilation of the AST into nested closures over FlowEvent (`compile_predicate`)."""

from __future__ import annotations

import bisect
import fnmatch
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from conntrail.filters.ast import (
    ORDERED,
    And,
    Compare,
    Expr,
    Flags,
    Glob,
    IntRange,
    Literal,
    Network,
    Not,
    Or,
    Value,
)
from conntrail.filters.diagnostics import error, shown
from conntrail.filters.fields import SPECS, FieldSpec, Getter, Kind
from conntrail.filters.parser import parse
from conntrail.model import FlowEvent

Predicate = Callable[[FlowEvent], bool]
_Test = Callable[[Any], bool]

# ---------------------------------------------------------------------------------------------
# Value tests: does one field value pass?
# ---------------------------------------------------------------------------------------------

# Parsed address strings, keyed by the text in the event: (IP version, integer value). Address
# sets repeat heavily, and a hit (~30 ns) is ~50x cheaper than ipaddress.ip_address(). When the
# cache fills it is simply cleared: no per-hit LRU bookkeeping, and the hot set refills at once.
_ADDR_CACHE: dict[object, tuple[int, int]] = {}
_ADDR_CACHE_MAX = 16384
_NOT_AN_ADDRESS = (0, 0)  # version 0 matches no network


def _addr_key_miss(text: object) -> tuple[int, int]:
    """Parse an address (cache miss) and remember it."""
    try:
        addr = ipaddress.ip_address(text)  # type: ignore[arg-type]  # None/junk -> ValueError
    except ValueError:
        key = _NOT_AN_ADDRESS
    else:
        key = (addr.version, int(addr))
    if len(_ADDR_CACHE) >= _ADDR_CACHE_MAX:
        _ADDR_CACHE.clear()
    _ADDR_CACHE[text] = key
    return key


def _address_test(values: Sequence[Value]) -> _Test:
    """Test of an address string against networks; never matches across IP versions."""
    nets = [value.network for value in values if isinstance(value, Network)]
    exact = frozenset(
        (n.version, int(n.network_address)) for n in nets if n.prefixlen == n.max_prefixlen
    )
    ranges = tuple(
        (n.version, int(n.network_address), int(n.broadcast_address))
        for n in nets
        if n.prefixlen < n.max_prefixlen
    )
    cached = _ADDR_CACHE.get  # bound once: clear() keeps the same dict
    if not ranges:
        return lambda text: (cached(text) or _addr_key_miss(text)) in exact
    if not exact and len(ranges) == 1:
        return _one_network_test(ranges[0])

    def test(text: Any) -> bool:
        key = cached(text) or _addr_key_miss(text)
        if key in exact:
            return True
        version, number = key
        for net_version, low, high in ranges:
            if version == net_version and low <= number <= high:
                return True
        return False

    return test


def _one_network_test(net: tuple[int, int, int]) -> _Test:
    """The common single-CIDR test, unrolled."""
    net_version, low, high = net
    cached = _ADDR_CACHE.get

    def test(text: Any) -> bool:
        version, number = cached(text) or _addr_key_miss(text)
        return version == net_version and low <= number <= high

    return test


def _merged(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping, non-adjacent intervals covering the same numbers."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(intervals):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(high, merged[-1][1]))
        else:
            merged.append((low, high))
    return merged


def _interval_test(intervals: Iterable[tuple[int, int]]) -> _Test:
    """Membership in a union of integer intervals: one compare, or a C bisect for many."""
    merged = _merged(intervals)
    if len(merged) == 1:
        ((low, high),) = merged
        return lambda value: value is not None and low <= value <= high
    starts = [low for low, _ in merged]
    ends = [high for _, high in merged]

    def test(value: Any) -> bool:
        if value is None:
            return False
        index = bisect.bisect_right(starts, value)
        return index > 0 and value <= ends[index - 1]

    return test


def _glob_test(patterns: Iterable[str], exact: frozenset[int | str]) -> _Test:
    """Exact strings, then all globs folded into one compiled regex (one C call)."""
    regex = "|".join(f"(?:{fnmatch.translate(pattern)})" for pattern in patterns)
    match = re.compile(regex).match
    return lambda text: text in exact or (isinstance(text, str) and match(text) is not None)


def _scalar_test(values: Sequence[Value]) -> _Test:
    """Test of a number or string against literals, ranges and globs."""
    exact = frozenset(value.value for value in values if isinstance(value, Literal))
    ranges = [(value.low, value.high) for value in values if isinstance(value, IntRange)]
    patterns = [value.pattern for value in values if isinstance(value, Glob)]
    if ranges:  # numeric kinds only, so the literals are ints: fold them in as intervals
        singles = [(number, number) for number in exact if isinstance(number, int)]
        return _interval_test(ranges + singles)
    if patterns:
        return _glob_test(patterns, exact)
    return exact.__contains__


def _ordered_test(op: str, bound: int) -> _Test:
    """`value OP bound`, False for an absent value."""
    compare = ORDERED[op]
    return lambda value: value is not None and compare(value, bound)


def _flags_test(mask: int) -> _Test:
    """All of mask's bits set; int() first because IntFlag's own & costs ~0.5 µs."""
    return lambda status: int(status) & mask == mask


# ---------------------------------------------------------------------------------------------
# Combinators: not, and, or without a per-event loop
# ---------------------------------------------------------------------------------------------


def _negate(predicate: Predicate) -> Predicate:
    """not predicate."""
    return lambda event: not predicate(event)


def _all_of(predicates: Sequence[Predicate]) -> Predicate:
    """Conjunction: unrolled up to three, then a balanced tree (no per-event loop/generator)."""
    if not predicates:
        return lambda event: True
    if len(predicates) == 1:
        return predicates[0]
    if len(predicates) == 2:
        first, second = predicates
        return lambda event: first(event) and second(event)
    if len(predicates) == 3:
        first, second, third = predicates
        return lambda event: first(event) and second(event) and third(event)
    half = len(predicates) // 2
    return _all_of([_all_of(predicates[:half]), _all_of(predicates[half:])])


def _any_of(predicates: Sequence[Predicate]) -> Predicate:
    """Disjunction: unrolled up to three, then a balanced tree (no per-event loop/generator)."""
    if not predicates:
        return lambda event: False
    if len(predicates) == 1:
        return predicates[0]
    if len(predicates) == 2:
        first, second = predicates
        return lambda event: first(event) or second(event)
    if len(predicates) == 3:
        first, second, third = predicates
        return lambda event: first(event) or second(event) or third(event)
    half = len(predicates) // 2
    return _any_of([_any_of(predicates[:half]), _any_of(predicates[half:])])


# ---------------------------------------------------------------------------------------------
# Comparisons and the whole tree
# ---------------------------------------------------------------------------------------------

# What a hand-built tree may hold per kind (parse() only builds trees that fit).
_LITERAL_TYPES: dict[Kind, type] = {
    Kind.INT: int,
    Kind.PROTO: int,
    Kind.FAMILY: int,
    Kind.EVENT: int,
    Kind.STATE: str,
    Kind.TEXT: str,
    Kind.NAT: str,
}
_OTHER_VALUES: dict[Kind, tuple[type, ...]] = {
    Kind.INT: (IntRange,),
    Kind.ADDR: (Network,),
    Kind.STATE: (Glob,),
    Kind.TEXT: (Glob,),
    Kind.STATUS: (Flags,),
}


def _value_fits(kind: Kind, value: Value) -> bool:
    """Whether a value can be compared with a field of this kind."""
    if isinstance(value, Literal):
        return isinstance(value.value, _LITERAL_TYPES.get(kind, ()))
    return isinstance(value, _OTHER_VALUES.get(kind, ()))


def _operator_fits(kind: Kind, cmp: Compare) -> bool:
    """Whether the operator and value count suit a field of this kind."""
    if kind is Kind.STATUS:
        return cmp.op == "has" and len(cmp.values) == 1
    if cmp.op in ("==", "!="):
        return True
    single = len(cmp.values) == 1 and isinstance(cmp.values[0], Literal)
    return cmp.op in ORDERED and kind is Kind.INT and single


def _check_node(cmp: Compare, spec: FieldSpec) -> None:
    """Reject a malformed Compare (possible only in a tree built by hand)."""
    fits = (
        bool(cmp.values)
        and all(_value_fits(spec.kind, value) for value in cmp.values)
        and _operator_fits(spec.kind, cmp)
        and (cmp.mask is None or spec.kind is Kind.INT)
    )
    if not fits:
        raise error(f"malformed comparison {cmp!r}", cmp.position)


def _value_test(spec: FieldSpec, cmp: Compare) -> _Test:
    """The test one field value must pass for the (positive form of the) comparison."""
    first = cmp.values[0]
    if cmp.op in ORDERED and isinstance(first, Literal) and isinstance(first.value, int):
        return _ordered_test(cmp.op, first.value)
    if isinstance(first, Flags):
        return _flags_test(int(first.mask))
    if spec.kind is Kind.ADDR:
        return _address_test(cmp.values)
    return _scalar_test(cmp.values)


def _literal_leaf(get: Getter, cmp: Compare) -> Predicate | None:
    """Fast path: one getter compared with literals by == / !=, no helper call per event."""
    if not all(isinstance(v, Literal) for v in cmp.values) or cmp.op not in ("==", "!="):
        return None
    members = frozenset(v.value for v in cmp.values if isinstance(v, Literal))
    if len(members) == 1:
        (value,) = members
        if cmp.op == "==":
            return lambda event: get(event) == value  # ints, strings, enums: always a bool
        return lambda event: get(event) != value
    if cmp.op == "==":
        return lambda event: get(event) in members
    return lambda event: get(event) not in members


def _masked(get: Getter, mask: int) -> Getter:
    """Getter of value & mask (None stays None)."""

    def getter(event: FlowEvent) -> Any:
        value = get(event)
        return None if value is None else value & mask

    return getter


def _apply(getters: tuple[Getter, ...], test: _Test) -> Predicate:
    """Predicate: test passes for the field's value (for any of its getters)."""
    if len(getters) == 1:
        (get,) = getters
        return lambda event: test(get(event))
    first, second = getters
    return lambda event: test(first(event)) or test(second(event))


def _compile_compare(cmp: Compare) -> Predicate:
    """The predicate for one comparison."""
    spec = SPECS.get(cmp.field)
    if spec is None:
        raise error(f"unknown field {shown(cmp.field)}", cmp.position)
    _check_node(cmp, spec)
    getters = spec.getters
    if cmp.mask is not None:
        getters = tuple(_masked(get, cmp.mask) for get in getters)
    if len(getters) == 1 and spec.kind is not Kind.ADDR:
        fast = _literal_leaf(getters[0], cmp)
        if fast is not None:
            return fast
    positive = _apply(getters, _value_test(spec, cmp))
    return _negate(positive) if cmp.op == "!=" else positive


def compile_predicate(expr: Expr) -> Predicate:
    """Compile a parsed expression into a fast predicate over FlowEvent."""
    if isinstance(expr, Compare):
        return _compile_compare(expr)
    if isinstance(expr, Not):
        return _negate(compile_predicate(expr.operand))
    if isinstance(expr, And):
        return _all_of([compile_predicate(operand) for operand in expr.operands])
    if isinstance(expr, Or):
        return _any_of([compile_predicate(operand) for operand in expr.operands])
    raise error(f"not a filter expression: {expr!r}")


def compile_filter(text: str) -> Predicate:
    """Parse and compile a filter expression in one step."""
    return compile_predicate(parse(text))

"""Formatting of the AST back into filter syntax (`format_expr`), for help text and logs."""

from __future__ import annotations

import re

from conntrail.filters.ast import (
    And,
    Compare,
    Expr,
    Glob,
    IntRange,
    Literal,
    Network,
    Not,
    Or,
    Value,
)
from conntrail.filters.lexer import RESERVED
from conntrail.model import FAMILY_NAMES, CtStatus, EventKind

_BARE_VALUE_RE = re.compile(r"[\w.:/*?%-]+")


def _quote(text: str) -> str:
    """text as a value token: bare when it tokenizes as one word, else quoted."""
    if _BARE_VALUE_RE.fullmatch(text) and text.lower() not in RESERVED:
        return text
    return f"'{text}'" if '"' in text else f'"{text}"'


def _format_literal(field: str, raw: int | str) -> str:
    """A literal in filter syntax: event and family by name, other numbers as numbers."""
    if isinstance(raw, EventKind):
        return raw.label
    if field == "family" and isinstance(raw, int):
        return FAMILY_NAMES.get(raw, str(raw))
    return _quote(raw) if isinstance(raw, str) else str(int(raw))


def _format_value(field: str, value: Value) -> str:
    """One value in filter syntax."""
    if isinstance(value, Literal):
        return _format_literal(field, value.value)
    if isinstance(value, IntRange):
        return f"{value.low}-{value.high}"
    if isinstance(value, Network):
        net = value.network
        return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
    if isinstance(value, Glob):
        return _quote(value.pattern)
    names = [flag.name or "" for flag in CtStatus if flag & value.mask]
    return names[0] if len(names) == 1 else "{" + ", ".join(names) + "}"


def _format_operand(expr: Expr) -> str:
    """An operand of and/or/not, parenthesised when it is itself an and/or."""
    text = format_expr(expr)
    return f"({text})" if isinstance(expr, And | Or) else text


def _is_collection(values: tuple[Value, ...]) -> bool:
    """Whether values read better after 'in' than after '==' (a set, range or CIDR)."""
    if len(values) != 1:
        return True
    value = values[0]
    if isinstance(value, Network):
        return value.network.prefixlen < value.network.max_prefixlen
    return isinstance(value, IntRange)


def _format_compare(cmp: Compare) -> str:
    """One comparison in filter syntax, using 'in'/'not in' for sets, ranges and CIDRs."""
    name = cmp.field if cmp.mask is None else f"{cmp.field}/{cmp.mask:#x}"
    shown = [_format_value(cmp.field, value) for value in cmp.values]
    values = shown[0] if len(shown) == 1 else "{" + ", ".join(shown) + "}"
    op = cmp.op
    if op in ("==", "!=") and _is_collection(cmp.values):
        op = "in" if op == "==" else "not in"
    return f"{name} {op} {values}"


def format_expr(expr: Expr) -> str:
    """Render an expression in filter syntax; parse(format_expr(e)) == e."""
    if isinstance(expr, Compare):
        return _format_compare(expr)
    if isinstance(expr, Not):
        return f"not {_format_operand(expr.operand)}"
    joiner = " and " if isinstance(expr, And) else " or "
    return joiner.join(_format_operand(operand) for operand in expr.operands)

"""Filter expressions as SQL WHERE clauses over stored flows, for SQLite and PostgreSQL.

`compile_where` walks the AST that `compile_predicate` compiles and must agree with it on
every stored flow. Values are always bound parameters. Three-valued logic: a test of a NULL
column is NULL, which WHERE and AND/OR treat like Python's False; only NOT differs (NOT NULL
is NULL, `not False` is True), so negating a fragment that can be NULL writes
`(x) IS NOT TRUE`. `!=` and `not in` are the negation of `==` and `in`, as in the compiler.
"""

from __future__ import annotations

import enum
import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from conntrail.errors import ConfigError, FilterError
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
from conntrail.filters.compiler import compile_predicate
from conntrail.filters.fields import SPECS, Kind
from conntrail.history.addr import network_range
from conntrail.history.rows import NatType
from conntrail.history.store import ATTRIBUTE_COLUMNS
from conntrail.model import DccpState, SctpState, TcpState

PATH = "--filter"
EVENT_REASON = ("field 'event' does not apply to stored flows (each row is a whole flow); "
                "use --open or --closed")


class Dialect(enum.Enum):
    """The SQL flavour to write: placeholders, address types and pattern matching differ."""

    SQLITE = "sqlite"
    POSTGRES = "postgres"


class _Sql(NamedTuple):
    """A fragment of SQL, its parameters in order, whether it can evaluate to NULL, and whether
    it is an AND/OR chain (parenthesised when embedded)."""

    text: str
    params: tuple[object, ...] = ()
    nullable: bool = False
    chain: bool = False

    def embedded(self) -> str:
        """The text, safe inside a larger expression."""
        return f"({self.text})" if self.chain else self.text


_TRUE, _FALSE = _Sql("TRUE"), _Sql("FALSE")
_PLACEHOLDER = {Dialect.SQLITE: "?", Dialect.POSTGRES: "%s"}


def _counter(name: str) -> str:
    """Both directions summed, NULL only when neither has counters (like fields._counter)."""
    return f"COALESCE(orig_{name} + reply_{name}, orig_{name}, reply_{name})"


# The column(s) of each field; a two-column field matches when either column does.
_COLUMNS: dict[str, tuple[str, ...]] = {
    "proto": ("proto",), "family": ("family",), "src": ("orig_src",), "dst": ("orig_dst",),
    "sport": ("orig_sport",), "dport": ("orig_dport",),
    "reply.src": ("reply_src",), "reply.dst": ("reply_dst",),
    "reply.sport": ("reply_sport",), "reply.dport": ("reply_dport",),
    "addr": ("orig_src", "orig_dst"), "port": ("orig_sport", "orig_dport"),
    "icmp.type": ("icmp_type",), "icmp.code": ("icmp_code",), "icmp.id": ("icmp_id",),
    "status": ("status",), "mark": ("mark",), "zone": ("zone",), "netns": ("netns",),
    "nat": ("nat",), "ct_id": ("ct_id",),
    "bytes": (_counter("bytes"),), "packets": (_counter("packets"),),
    "process.pid": ("pid",), "user.id": ("uid",), "group.id": ("gid",),
    "process.executable": ("exe",), "process.command_line": ("cmdline",),
    "service": ("unit",),
}
# Live fields a stored row does not keep, and what to use instead.
_NOT_STORED = {
    "event": EVENT_REASON,
    "process.name": "field 'process.name' is not stored (rows keep the executable): use "
                    "process.executable == '*/NAME'",
    "cgroup": "field 'cgroup' is not stored (rows keep the unit): use service",
}
# Columns every row fills (FlowRow types them without None); the others may be NULL.
_NOT_NULL = frozenset({"proto", "family", "orig_src", "orig_dst", "status", "netns", "nat",
                       "ct_id"})
_NAT_CODES = {nat.label: int(nat) for nat in NatType}
_STATE_ENUMS: dict[int, type[enum.IntEnum]] = {6: TcpState, 132: SctpState, 33: DccpState}
# Rows whose state number has a name for their protocol (the kernel's enums are dense from 0);
# Flow.state_name shows every other number as its decimal text.
_NAMED_STATE = " OR ".join(
    f"(proto = {proto} AND state BETWEEN {min(map(int, states))} AND {max(map(int, states))})"
    for proto, states in _STATE_ENUMS.items()
)
_SQLITE_INT_MAX = (1 << 63) - 1


def _join(parts: Sequence[_Sql], op: str, empty: _Sql) -> _Sql:
    """Parts joined by AND or OR, `empty` when there are none."""
    if not parts:
        return empty
    if len(parts) == 1:
        return parts[0]
    text = f" {op} ".join(part.embedded() for part in parts)
    params = tuple(param for part in parts for param in part.params)
    return _Sql(text, params, any(part.nullable for part in parts), chain=True)


def _negate(part: _Sql) -> _Sql:
    """A NOT that is never NULL: a NULL (absent) operand negates to TRUE, as in Python."""
    if part.nullable:
        return _Sql(f"({part.text}) IS NOT TRUE", part.params)
    return _Sql(f"NOT ({part.text})", part.params)


def _param(value: object, dialect: Dialect) -> object:
    """A value as a parameter. SQLite cannot bind an int past int64 (byte counts are u64); a
    float >= 2**63 compares the same as the int against everything SQLite can store."""
    if dialect is Dialect.SQLITE and isinstance(value, int) and value > _SQLITE_INT_MAX:
        return float(value)
    return value


def _in(col: _Sql, values: Sequence[object], mark: str) -> _Sql:
    """`col = v` or `col IN (v, ...)`, `mark` being the placeholder."""
    unique = tuple(dict.fromkeys(values))
    test = f"= {mark}" if len(unique) == 1 else f"IN ({', '.join([mark] * len(unique))})"
    return _Sql(f"{col.text} {test}", (*col.params, *unique), col.nullable)


def _scalar_test(col: _Sql, values: Sequence[Value], dialect: Dialect) -> _Sql:
    """Any of: literals (one IN), inclusive ranges (BETWEEN), globs."""
    mark = _PLACEHOLDER[dialect]
    literals = [_param(value.value, dialect) for value in values if isinstance(value, Literal)]
    parts = [_in(col, literals, mark)] if literals else []
    for value in values:
        if isinstance(value, IntRange):
            bounds = (_param(value.low, dialect), _param(value.high, dialect))
            parts.append(_Sql(f"{col.text} BETWEEN {mark} AND {mark}", (*col.params, *bounds),
                              col.nullable))
        elif isinstance(value, Glob):
            parts.append(_glob_test(col, value.pattern, dialect))
    return _join(parts, "OR", _FALSE)


def _addr_test(col: _Sql, values: Sequence[Value], dialect: Dialect) -> _Sql:
    """Any of the addresses and networks; an IPv4 network never matches an IPv6 address."""
    nets = [value.network for value in values if isinstance(value, Network)]
    hosts = [net.network_address for net in nets if net.prefixlen == net.max_prefixlen]
    ranges = [net for net in nets if net.prefixlen < net.max_prefixlen]
    parts: list[_Sql] = []
    if dialect is Dialect.POSTGRES:
        parts += [_in(col, [str(host) for host in hosts], "%s::inet")] if hosts else []
        parts += [_Sql(f"{col.text} <<= %s::inet", (str(net),), col.nullable) for net in ranges]
        return _join(parts, "OR", _FALSE)
    # SQLite BLOBs: equal bytes imply equal length; a BETWEEN needs the length checked too.
    parts += [_in(col, [host.packed for host in hosts], "?")] if hosts else []
    for net in ranges:
        text = f"length({col.text}) = {len(net.network_address.packed)} AND {col.text} " \
               "BETWEEN ? AND ?"
        parts.append(_Sql(text, network_range(net), col.nullable, chain=True))
    return _join(parts, "OR", _FALSE)


def _column_test(kind: Kind, col: _Sql, cmp: Compare, dialect: Dialect) -> _Sql:
    """The positive test of one column, by the field's kind."""
    first, mark = cmp.values[0], _PLACEHOLDER[dialect]
    if cmp.op in ORDERED and isinstance(first, Literal):
        bound = _param(first.value, dialect)
        return _Sql(f"{col.text} {cmp.op} {mark}", (*col.params, bound), col.nullable)
    if isinstance(first, Flags):
        mask = int(first.mask)
        return _Sql(f"({col.text} & {mark}) = {mark}", (*col.params, mask, mask), col.nullable)
    if kind is Kind.ADDR:
        return _addr_test(col, cmp.values, dialect)
    if kind is Kind.NAT:  # names to stored codes; a name fields.py never yields matches none
        codes = [_NAT_CODES[str(v.value)] for v in cmp.values
                 if isinstance(v, Literal) and str(v.value) in _NAT_CODES]
        return _in(col, codes, mark) if codes else _FALSE
    return _scalar_test(col, cmp.values, dialect)


def _decimal(text: str) -> int | None:
    """The number whose str() is exactly text (how state_name shows an unnamed state)."""
    try:
        number = int(text)
    except ValueError:
        return None
    return number if str(number) == text else None


def _state_test(values: Sequence[Value], dialect: Dialect) -> _Sql:
    """State names and globs resolved per protocol to numbers; unnamed numbers by their text."""
    names = list(dict.fromkeys(str(v.value) for v in values if isinstance(v, Literal)))
    globs = [value.pattern for value in values if isinstance(value, Glob)]
    col, mark = _Sql("state", nullable=True), _PLACEHOLDER[dialect]
    parts: list[_Sql] = []
    for proto, states in _STATE_ENUMS.items():
        numbers = [int(state) for state in states if state.name in names
                   or any(fnmatch.fnmatchcase(state.name, glob) for glob in globs)]
        if numbers:
            parts.append(_join([_Sql(f"proto = {proto}"), _in(col, numbers, mark)], "AND", _TRUE))
    decimals = [number for number in map(_decimal, names) if number is not None]
    unnamed = [_in(col, decimals, mark)] if decimals else []
    as_text = _Sql("CAST(state AS TEXT)", nullable=True)
    unnamed += [_glob_test(as_text, glob, dialect) for glob in globs]
    if unnamed:
        scope = _Sql(f"NOT ({_NAMED_STATE})", nullable=True)
        parts.append(_join([scope, _join(unnamed, "OR", _FALSE)], "AND", _TRUE))
    return _join(parts, "OR", _FALSE)


# ---------------------------------------------------------------------------------------------
# Globs: fnmatch semantics (*, ?, [classes], a lone [ is literal) in GLOB, LIKE or a regex
# ---------------------------------------------------------------------------------------------


class _Wild(enum.Enum):
    """fnmatch's wildcards."""

    RUN = "*"
    ONE = "?"


_Ranges = tuple[tuple[int, int], ...]  # code point ranges of a class, within 1.._MAX
_Atom = str | _Wild | _Ranges
_MAX = 0x10FFFF


def _class_end(pattern: str, start: int) -> int:
    """Index of the `]` closing the `[` at start, as fnmatch finds it (a `]` right after `[`
    or `[!` is a member), or start itself when there is none and the `[` is literal."""
    end = start + 1
    end += pattern.startswith("!", end)
    end += pattern.startswith("]", end)
    end = pattern.find("]", end)
    return start if end < 0 else end


def _class_atom(text: str) -> _Atom:
    """The characters a class matches. fnmatch itself is asked at each code point where
    membership can change (every character of the class and the one after it)."""
    member = re.compile(fnmatch.translate(text)).match
    edges = sorted({1, *(ord(c) for c in text), *(ord(c) + 1 for c in text)} - {0, _MAX + 1})
    ranges: list[tuple[int, int]] = []
    for low, stop in zip(edges, [*edges[1:], _MAX + 1], strict=True):
        if not member(chr(low)):
            continue
        if ranges and ranges[-1][1] == low - 1:
            ranges[-1] = (ranges[-1][0], stop - 1)
        else:
            ranges.append((low, stop - 1))
    if ranges == [(1, _MAX)]:
        return _Wild.ONE  # no NUL in names: SQLite ends text there, PostgreSQL refuses it
    if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
        return chr(ranges[0][0])
    return tuple(ranges)


def _atoms(pattern: str) -> list[_Atom]:
    """The pattern as fnmatch reads it: literal characters, wildcards and classes."""
    atoms: list[_Atom] = []
    start = 0
    while start < len(pattern):
        char = pattern[start]
        end = _class_end(pattern, start) if char == "[" else start
        if char in "*?":
            atoms.append(_Wild(char))
        else:
            atoms.append(_class_atom(pattern[start:end + 1]) if end > start else char)
        start = end + 1
    return atoms


def _class_form(ranges: _Ranges) -> tuple[bool, _Ranges]:
    """(inverted, ranges): a class reaching the last code point is written as its complement."""
    if ranges[-1][1] != _MAX:
        return False, ranges
    gaps, low = [], 1
    for start, end in ranges:
        if start > low:
            gaps.append((low, start - 1))
        low = end + 1
    return True, tuple(gaps)


def _without(ranges: _Ranges, chars: str) -> list[tuple[int, int]]:
    """The ranges with the code points of chars (sorted) cut out."""
    kept: list[tuple[int, int]] = []
    for first, high in ranges:
        low = first
        for point in map(ord, chars):
            if low <= point <= high:
                kept += [(low, point - 1)] if low < point else []
                low = point + 1
        kept += [(low, high)] if low <= high else []
    return kept


def _glob_class(ranges: _Ranges) -> str:
    """A GLOB class: `]` then `-` first are literal there, `^` anywhere but first."""
    inverted, ranges = _class_form(ranges)
    present = {c for c in "-]^" if any(low <= ord(c) <= high for low, high in ranges)}
    spans = [chr(lo) if lo == hi else f"{chr(lo)}-{chr(hi)}"
             for lo, hi in _without(ranges, "-]^")]
    body = "".join(c for c in "]-" if c in present) + "".join(spans) + "^" * ("^" in present)
    return "[" + "^" * inverted + body + "]"


def _sqlite_glob(atoms: Sequence[_Atom]) -> str:
    """GLOB text: its * and ? are fnmatch's; a literal * ? [ becomes a one-member class."""
    special = {"*": "[*]", "?": "[?]", "[": "[[]"}
    return "".join(atom.value if isinstance(atom, _Wild)
                   else special.get(atom, atom) if isinstance(atom, str)
                   else _glob_class(atom) for atom in atoms)


def _pg_like(atoms: Sequence[_Atom]) -> str:
    """LIKE text (backslash is PostgreSQL's default LIKE escape)."""
    return "".join(("%" if atom is _Wild.RUN else "_") if isinstance(atom, _Wild)
                   else re.sub(r"([\\%_])", r"\\\1", str(atom)) for atom in atoms)


def _pg_regex(atoms: Sequence[_Atom]) -> str:
    """An anchored regex (ARE) for patterns with classes; class bounds as \\U escapes."""
    out = []
    for atom in atoms:
        if isinstance(atom, _Wild):
            out.append(".*" if atom is _Wild.RUN else ".")
        elif isinstance(atom, str):
            out.append("\\" + atom if atom.isascii() and not atom.isalnum() else atom)
        else:
            inverted, ranges = _class_form(atom)
            spans = "".join(f"\\U{lo:08X}-\\U{hi:08X}" for lo, hi in ranges)
            out.append("[" + "^" * inverted + spans + "]")
    return "^" + "".join(out) + "$"


def _glob_test(col: _Sql, pattern: str, dialect: Dialect) -> _Sql:
    """col matches the whole fnmatch pattern."""
    atoms = _atoms(pattern)
    if () in atoms:  # a class with no member: nothing matches
        return _FALSE
    if dialect is Dialect.SQLITE:
        return _Sql(f"{col.text} GLOB ?", (*col.params, _sqlite_glob(atoms)), col.nullable)
    if any(isinstance(atom, tuple) for atom in atoms):
        return _Sql(f"{col.text} ~ %s", (*col.params, _pg_regex(atoms)), col.nullable)
    return _Sql(f"{col.text} LIKE %s", (*col.params, _pg_like(atoms)), col.nullable)


def _compare(cmp: Compare, dialect: Dialect) -> _Sql:
    """One comparison; `!=` negates the `==` test, as the live compiler does."""
    if cmp.field in _NOT_STORED:
        raise FilterError(PATH, _NOT_STORED[cmp.field])
    try:  # the live compiler is the validator: accept exactly the trees it accepts
        compile_predicate(cmp)
    except FilterError as exc:
        raise FilterError(PATH, exc.reason) from None
    if cmp.field == "state":
        positive = _state_test(cmp.values, dialect)
    else:
        tests = []
        for column in _COLUMNS[cmp.field]:
            col = _Sql(column, (), column not in _NOT_NULL)
            if cmp.mask is not None:
                col = _Sql(f"({column} & {_PLACEHOLDER[dialect]})", (cmp.mask,), col.nullable)
            tests.append(_column_test(SPECS[cmp.field].kind, col, cmp, dialect))
        positive = _join(tests, "OR", _FALSE)
    return _negate(positive) if cmp.op == "!=" else positive


def _compile(expr: Expr, dialect: Dialect) -> _Sql:
    """The fragment for a (sub)tree."""
    if isinstance(expr, Compare):
        return _compare(expr, dialect)
    if isinstance(expr, Not):
        return _negate(_compile(expr.operand, dialect))
    if isinstance(expr, And):
        return _join([_compile(operand, dialect) for operand in expr.operands], "AND", _TRUE)
    if isinstance(expr, Or):
        return _join([_compile(operand, dialect) for operand in expr.operands], "OR", _FALSE)
    raise FilterError(PATH, f"not a filter expression: {expr!r}")


def compile_where(expr: Expr, dialect: Dialect) -> tuple[str, list[object]]:
    """The WHERE condition for `expr` (parenthesised: safe to AND with others), and its
    parameters in order."""
    sql = _compile(expr, dialect)
    return sql.embedded(), list(sql.params)


def compile_attributes(attributes: Mapping[str, int | str], dialect: Dialect,
                       option: str) -> tuple[list[str], list[object]]:
    """Clauses (to AND) for the attribution columns, and their parameters: numbers exactly,
    text by the same fnmatch globs as the filter language, in either dialect."""
    clauses: list[str] = []
    params: list[object] = []
    for name, value in attributes.items():
        if name not in ATTRIBUTE_COLUMNS:
            raise ConfigError(option, f"unknown attribute {name!r}")
        col = _Sql(name, (), nullable=True)
        sql = _glob_test(col, value, dialect) if isinstance(value, str) else \
            _in(col, [_param(value, dialect)], _PLACEHOLDER[dialect])
        clauses.append(sql.embedded())
        params.extend(sql.params)
    return clauses, params

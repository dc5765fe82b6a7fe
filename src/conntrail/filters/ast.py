"""The filter AST: frozen dataclass nodes and values that every backend walks."""

from __future__ import annotations

import ipaddress
import operator
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dc_field

from conntrail.model import CtStatus

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The ordered operators a Compare may hold, with what they mean (numeric fields only).
ORDERED: dict[str, Callable[[int, int], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


@dataclass(frozen=True, slots=True)
class Literal:
    """An exact value: an int (protocol, family, event kind, ports, ...) or a string."""

    value: int | str


@dataclass(frozen=True, slots=True)
class IntRange:
    """An inclusive integer range, written `low-high`."""

    low: int
    high: int


@dataclass(frozen=True, slots=True)
class Network:
    """An address or CIDR; a single address is a /32 or /128 network."""

    network: IPNetwork


@dataclass(frozen=True, slots=True)
class Glob:
    """An fnmatch pattern (`*`, `?`) that must match the whole string."""

    pattern: str


@dataclass(frozen=True, slots=True)
class Flags:
    """Status flags that must all be set (`status has ...`)."""

    mask: CtStatus


Value = Literal | IntRange | Network | Glob | Flags


@dataclass(frozen=True, slots=True)
class Compare:
    """`field op values`: `==` matches any value, `!=` none; `<`.. take one number; `has` flags."""

    field: str  # canonical name: aliases are resolved (host -> addr, id -> ct_id)
    op: str  # one of ==, !=, <, <=, >, >=, has ("in" is parsed as ==, "not in" as !=)
    values: tuple[Value, ...]
    mask: int | None = None
    position: int = dc_field(default=0, compare=False)  # where it was written, for messages


@dataclass(frozen=True, slots=True)
class Not:
    """Logical negation."""

    operand: Expr


@dataclass(frozen=True, slots=True)
class And:
    """True when every operand is."""

    operands: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Or:
    """True when any operand is."""

    operands: tuple[Expr, ...]


Expr = And | Or | Not | Compare

"""Value parsing: a value token's text to a normalised AST value, per field kind."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence

from conntrail.filters.ast import Flags, Glob, IntRange, Literal, Network, Value
from conntrail.filters.diagnostics import SHOWN_MAX, did_you_mean, error, shown
from conntrail.filters.fields import FieldSpec, Kind
from conntrail.filters.lexer import Token
from conntrail.model import (
    AF_INET,
    AF_INET6,
    PROTO_NUMBERS,
    CtStatus,
    DccpState,
    EventKind,
    SctpState,
    TcpState,
)

_INT_RE = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")  # ASCII only: int() would take other digits
_TOO_BIG = 1 << 128  # beyond every field's range; avoids int()'s 4300-digit ValueError
_FAMILIES = {
    "ipv4": AF_INET,
    "4": AF_INET,
    "inet": AF_INET,
    "ipv6": AF_INET6,
    "6": AF_INET6,
    "inet6": AF_INET6,
}
_NAT_VALUES = ("snat", "dnat", "both", "none")
_STATE_NAMES = frozenset(
    name for enum_type in (TcpState, SctpState, DccpState) for name in enum_type.__members__
)


def _parse_int(text: str) -> int | None:
    """A decimal or 0x-hex number, or None when text is not one."""
    if not _INT_RE.fullmatch(text):
        return None
    if len(text) > 40:
        return _TOO_BIG
    return int(text, 16) if text[:2] in ("0x", "0X") else int(text)


def _number(spec: FieldSpec, name: str, text: str, tok: Token) -> int:
    """A number within the field's range, or a FilterError naming the problem."""
    value = _parse_int(text)
    if value is None:
        raise error(f"expected a number for {name!r}, found {shown(tok.text)}", tok.pos)
    if value > spec.maximum:
        shortened = text if len(text) <= SHOWN_MAX else text[:SHOWN_MAX] + "..."
        raise error(f"{spec.unit} {shortened} out of range (0-{spec.maximum})", tok.pos)
    return value


def parse_mask(spec: FieldSpec, field: str, text: str, tok: Token) -> int:
    """The MASK of `field/MASK`, for numeric fields only."""
    if spec.kind is not Kind.INT:
        raise error(f"field {field!r} takes no mask", tok.pos)
    value = _parse_int(text)
    if value is None or value > spec.maximum:
        raise error(f"invalid mask {shown(text)} for {field!r}", tok.pos)
    return value


def _value_int(spec: FieldSpec, name: str, tok: Token) -> Value:
    """A number or an inclusive range `low-high`."""
    low_text, dash, high_text = tok.text.partition("-")
    if not dash:
        return Literal(_number(spec, name, tok.text, tok))
    low, high = _number(spec, name, low_text, tok), _number(spec, name, high_text, tok)
    if low > high:
        raise error(f"empty range {shown(tok.text)}", tok.pos)
    return IntRange(low, high)


def _value_proto(spec: FieldSpec, name: str, tok: Token) -> Value:
    """A protocol number or keyword, stored as the number."""
    number = PROTO_NUMBERS.get(tok.text.lower())
    if number is not None:
        return Literal(number)
    if _parse_int(tok.text) is None:
        hint = did_you_mean(tok.text.lower(), PROTO_NUMBERS)
        raise error(f"unknown protocol {shown(tok.text)}", tok.pos, hint)
    return Literal(_number(spec, name, tok.text, tok))


def _value_family(spec: FieldSpec, name: str, tok: Token) -> Value:
    """ipv4/ipv6 (or 4/6), stored as AF_INET/AF_INET6."""
    family = _FAMILIES.get(tok.text.lower())
    if family is None:
        raise error(f"unknown family {shown(tok.text)} (use ipv4 or ipv6)", tok.pos)
    return Literal(family)


def _value_addr(spec: FieldSpec, name: str, tok: Token) -> Value:
    """An address or CIDR (host bits of a CIDR are ignored, as tcpdump does)."""
    text = tok.text
    try:
        if "/" in text:
            return Network(ipaddress.ip_network(text, strict=False))
        return Network(ipaddress.ip_network(ipaddress.ip_address(text)))
    except ValueError:
        what = "CIDR" if "/" in text else "address"
        raise error(f"invalid {what} {shown(text)}", tok.pos) from None


def _value_state(spec: FieldSpec, name: str, tok: Token) -> Value:
    """A protocol state name (validated), a state number, or a glob."""
    text = tok.text.upper()
    if "*" in text or "?" in text:
        return Glob(text)
    if text not in _STATE_NAMES and not (text.isascii() and text.isdigit()):
        hint = did_you_mean(text, _STATE_NAMES)
        raise error(f"unknown state {shown(tok.text)}", tok.pos, hint)
    return Literal(text)


def _value_text(spec: FieldSpec, name: str, tok: Token) -> Value:
    """A name or text, or a glob when it contains * or ?."""
    text = tok.text
    return Glob(text) if "*" in text or "?" in text else Literal(text)


def _value_event(spec: FieldSpec, name: str, tok: Token) -> Value:
    """An event kind label, stored as the EventKind."""
    kind = EventKind.__members__.get(tok.text.upper())
    if kind is None:
        hint = did_you_mean(tok.text.lower(), [k.label for k in EventKind])
        raise error(f"unknown event {shown(tok.text)}", tok.pos, hint)
    return Literal(kind)


def _value_nat(spec: FieldSpec, name: str, tok: Token) -> Value:
    """snat, dnat, both or none."""
    text = tok.text.lower()
    if text not in _NAT_VALUES:
        hint = did_you_mean(text, _NAT_VALUES)
        raise error(f"unknown NAT type {shown(tok.text)}", tok.pos, hint)
    return Literal(text)


def _flag(tok: Token) -> CtStatus:
    """One CtStatus flag by (case-insensitive) name."""
    flag = CtStatus.__members__.get(tok.text.upper())
    if flag is None:
        hint = did_you_mean(tok.text.upper(), CtStatus.__members__)
        raise error(f"unknown status flag {shown(tok.text)}", tok.pos, hint)
    return flag


def value_flags(toks: Sequence[Token]) -> Flags:
    """The flags of `status has ...`, combined: all must be set."""
    mask = CtStatus(0)
    for tok in toks:
        mask |= _flag(tok)
    return Flags(mask)


Coercer = Callable[[FieldSpec, str, Token], Value]
COERCERS: dict[Kind, Coercer] = {
    Kind.INT: _value_int,
    Kind.PROTO: _value_proto,
    Kind.FAMILY: _value_family,
    Kind.ADDR: _value_addr,
    Kind.STATE: _value_state,
    Kind.TEXT: _value_text,
    Kind.EVENT: _value_event,
    Kind.NAT: _value_nat,
}

"""Filter expressions over flow events: parse once into a public AST, compile to a predicate.

Grammar (keywords, field names and shorthands are case-insensitive)::

    expr    := and (("or" | "||") and)*
    and     := unary (("and" | "&&") unary)*
    unary   := ("not" | "!") unary | "(" expr ")" | compare | SHORTHAND
    compare := FIELD ["/" MASK] OP values | FIELD ["not"] "in" values | "status" "has" values
    OP      := "==" | "=" | "!=" | "<" | "<=" | ">" | ">="
    values  := value | "{" value ("," value)* "}"
    value   := NUMBER | NUMBER "-" NUMBER | ADDRESS | CIDR | NAME | "text" | 'text'

Precedence is not > and > or. Numbers are decimal or 0x hex. `==` and `in` match any of the
listed values (a number, a range `lo-hi`, an address, a CIDR, a name or an fnmatch glob for
`netns`/`state`); `!=` and `not in` match none of them. A value the event lacks (no reply
tuple, no counters, no ports on ICMP) fails every test except `!=`. `addr`/`host` and `port`
test both ends of the original tuple and match when either end does. Strings have no escapes.
`mark/0xff == 1` compares the masked value. An IPv4 network never matches an IPv6 address.

Examples::

    tcp and dport == 443 and not src in 198.18.0.0/15
    udp && (dport in {53, 5353} || sport in 1000-2000)
    ipv6 and host == 2001:db8::1 and dst in 2001:db8::/32
    status has {SEEN_REPLY, ASSURED} and state == established
    netns == qrouter-* and dnat and bytes > 1000000

Shorthands: a protocol name (tcp, udp, icmp, icmpv6, sctp, dccp, gre, udplite) means
`proto == X`; ipv4/ipv6 mean `family == X`; new/update/destroy/dump mean `event == X`;
`nat` means `nat != none`, `snat`/`dnat` mean `nat in {snat, both}`/`nat in {dnat, both}`;
assured, seen_reply, confirmed, src_nat, dst_nat mean `status has X`; `unreplied` means
`not status has SEEN_REPLY`. `FIELDS` and `SHORTHANDS` describe every name for `--help`.

`parse()` returns frozen dataclasses (And, Or, Not, Compare with Literal, IntRange, Network,
Glob and Flags values) with aliases resolved and values normalised, so that another backend
(e.g. SQL) can walk the same tree; `compile_predicate()` turns it into nested closures.
"""

from __future__ import annotations

import bisect
import difflib
import enum
import fnmatch
import ipaddress
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any, NamedTuple

from conntrail.errors import FilterError
from conntrail.model import (
    AF_INET,
    AF_INET6,
    FAMILY_NAMES,
    PROTO_NUMBERS,
    CtStatus,
    DccpState,
    EventKind,
    FlowEvent,
    SctpState,
    TcpState,
)

Predicate = Callable[[FlowEvent], bool]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_Getter = Callable[[FlowEvent], Any]
_Test = Callable[[Any], bool]

# ---------------------------------------------------------------------------------------------
# AST
# ---------------------------------------------------------------------------------------------


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

# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

_SHOWN_MAX = 40


def _error(reason: str, pos: int | None = None, hint: str = "") -> FilterError:
    """A FilterError whose reason ends with the character position and an optional hint."""
    where = "" if pos is None else f" at position {pos}"
    return FilterError("filter", f"{reason}{where}{hint}")


def _shown(text: str) -> str:
    """Text quoted for a message, shortened so a huge input cannot flood it."""
    if len(text) > _SHOWN_MAX:
        text = text[:_SHOWN_MAX] + "..."
    return repr(text)


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean ...?)' hint for the closest choice, or ''."""
    close = difflib.get_close_matches(word[:_SHOWN_MAX], list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


class _Tok(NamedTuple):
    """A token: `key` is what the parser matches (lowercase word, canonical operator)."""

    kind: str  # "word", "str", "op" or "end"
    text: str  # as written; strings without their quotes
    key: str  # "" for strings, so a quoted "and" is never a keyword
    pos: int


# ':' and '/' are word characters so that `2001:db8::/32` and `::1` stay one token; '-' so that
# ranges and names like `qrouter-x` do; '*' and '?' for globs; '%' for IPv6 scope ids.
_TOKEN_RE = re.compile(
    r"""(?P<space>\s+)
      | (?P<op>==|!=|<=|>=|&&|\|\||[<>=!(){},])
      | (?P<str>"[^"]*"|'[^']*')
      | (?P<word>[\w.:/*?%-]+)""",
    re.VERBOSE,
)
_OP_KEYS = {"&&": "and", "||": "or", "!": "not", "=": "=="}


def _tokenize(text: str) -> list[_Tok]:
    """Split text into tokens, ending with an "end" token at len(text)."""
    tokens: list[_Tok] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            raise _bad_char(text, pos)
        tokens.extend(_make_token(match.lastgroup or "", match.group(), pos))
        pos = match.end()
    tokens.append(_Tok("end", "", "", len(text)))
    return tokens


def _make_token(kind: str, text: str, pos: int) -> list[_Tok]:
    """The token for one regex match (none for whitespace)."""
    if kind == "op":
        return [_Tok("op", text, _OP_KEYS.get(text, text), pos)]
    if kind == "str":
        return [_Tok("str", text[1:-1], "", pos)]
    if kind == "word":
        return [_Tok("word", text, text.lower(), pos)]
    return []


def _bad_char(text: str, pos: int) -> FilterError:
    """The error for a character no token can start with."""
    char = text[pos]
    if char in "\"'":
        return _error("unterminated string", pos)
    hint = {"&": " (did you mean '&&'?)", "|": " (did you mean '||'?)"}.get(char, "")
    return _error(f"unexpected character {char!r}", pos, hint)


def _describe(tok: _Tok) -> str:
    """A token as named in messages."""
    if tok.kind == "end":
        return "the end of the filter"
    if tok.kind == "str":
        return f"string {_shown(tok.text)}"
    return _shown(tok.text)


# ---------------------------------------------------------------------------------------------
# Fields: how to read them from an event, what their values look like
# ---------------------------------------------------------------------------------------------


class _Kind(enum.Enum):
    """The value type of a field, which decides value parsing and allowed operators."""

    INT = enum.auto()
    PROTO = enum.auto()
    FAMILY = enum.auto()
    ADDR = enum.auto()
    STATE = enum.auto()
    NETNS = enum.auto()
    EVENT = enum.auto()
    NAT = enum.auto()
    STATUS = enum.auto()


@dataclass(frozen=True, slots=True)
class _FieldSpec:
    """One filterable field: its kind, its getter(s) (any may match) and its help line."""

    kind: _Kind
    getters: tuple[_Getter, ...]
    doc: str
    unit: str = ""  # how an out-of-range number is named: "port 70000 out of range"
    maximum: int = 0


_U8, _U16, _U32, _U64 = 0xFF, 0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF


def _orig(attr: str) -> _Getter:
    """Getter of an original-tuple attribute (attrgetter runs in C)."""
    return operator.attrgetter(f"flow.orig.{attr}")


def _reply(attr: str) -> _Getter:
    """Getter of a reply-tuple attribute, None when the flow has no reply tuple."""
    get = operator.attrgetter(attr)

    def getter(event: FlowEvent) -> Any:
        reply = event.flow.reply
        return None if reply is None else get(reply)

    return getter


def _counter(attr: str) -> _Getter:
    """Getter summing a counter over both directions, None when there are no counters."""
    get = operator.attrgetter(attr)

    def getter(event: FlowEvent) -> int | None:
        orig, reply = event.flow.counters_orig, event.flow.counters_reply
        if orig is None and reply is None:
            return None
        return (0 if orig is None else get(orig)) + (0 if reply is None else get(reply))

    return getter


def _zone(event: FlowEvent) -> int | None:
    """The flow's zone, falling back to the original tuple's zone."""
    zone = event.flow.zone
    return event.flow.orig.zone if zone is None else zone


# Same mapping as Flow.nat_type, computed from the two bits because the property builds a dict
# on every call (~1.2 µs), too slow for the hot path.
_NAT_BITS = int(CtStatus.SRC_NAT | CtStatus.DST_NAT)
_NAT_TYPES = {0: "none", int(CtStatus.SRC_NAT): "snat", int(CtStatus.DST_NAT): "dnat"}
_NAT_TYPES[_NAT_BITS] = "both"


def _nat_type(event: FlowEvent) -> str:
    """'snat', 'dnat', 'both' or 'none', like Flow.nat_type."""
    return _NAT_TYPES[int(event.flow.status) & _NAT_BITS]


# Flow.state_name costs ~0.4 µs (enum lookup); (proto, state) pairs are few, so cache them.
_STATE_CACHE: dict[tuple[int, int | None], str | None] = {}
_STATE_CACHE_MAX = 1024


def _state(event: FlowEvent) -> str | None:
    """Flow.state_name, cached by (protocol, state number)."""
    flow = event.flow
    key = (flow.orig.proto, flow.proto_state)
    try:
        return _STATE_CACHE[key]
    except KeyError:
        if len(_STATE_CACHE) >= _STATE_CACHE_MAX:
            _STATE_CACHE.clear()
        name = _STATE_CACHE[key] = flow.state_name
        return name


_SPECS: dict[str, _FieldSpec] = {
    "proto": _FieldSpec(
        _Kind.PROTO,
        (_orig("proto"),),
        "protocol name or number (tcp, udp, 6, ...)",
        "protocol",
        _U8,
    ),
    "family": _FieldSpec(_Kind.FAMILY, (_orig("family"),), "address family: ipv4/ipv6 or 4/6"),
    "src": _FieldSpec(_Kind.ADDR, (_orig("src"),), "original source address (address or CIDR)"),
    "dst": _FieldSpec(_Kind.ADDR, (_orig("dst"),), "original destination address"),
    "sport": _FieldSpec(_Kind.INT, (_orig("sport"),), "original source port", "port", _U16),
    "dport": _FieldSpec(_Kind.INT, (_orig("dport"),), "original destination port", "port", _U16),
    "reply.src": _FieldSpec(_Kind.ADDR, (_reply("src"),), "reply source address"),
    "reply.dst": _FieldSpec(_Kind.ADDR, (_reply("dst"),), "reply destination address"),
    "reply.sport": _FieldSpec(_Kind.INT, (_reply("sport"),), "reply source port", "port", _U16),
    "reply.dport": _FieldSpec(
        _Kind.INT, (_reply("dport"),), "reply destination port", "port", _U16
    ),
    "addr": _FieldSpec(
        _Kind.ADDR, (_orig("src"), _orig("dst")), "either original address (src or dst)"
    ),
    "port": _FieldSpec(
        _Kind.INT,
        (_orig("sport"), _orig("dport")),
        "either original port (sport or dport)",
        "port",
        _U16,
    ),
    "icmp.type": _FieldSpec(_Kind.INT, (_orig("icmp_type"),), "ICMP type", "ICMP type", _U8),
    "icmp.code": _FieldSpec(_Kind.INT, (_orig("icmp_code"),), "ICMP code", "ICMP code", _U8),
    "icmp.id": _FieldSpec(_Kind.INT, (_orig("icmp_id"),), "ICMP identifier", "ICMP id", _U16),
    "state": _FieldSpec(
        _Kind.STATE, (_state,), "protocol state, e.g. ESTABLISHED (TCP, SCTP, DCCP; globs ok)"
    ),
    "status": _FieldSpec(
        _Kind.STATUS,
        (operator.attrgetter("flow.status"),),
        "status flags, all must be set: status has {SEEN_REPLY, ASSURED}",
    ),
    "mark": _FieldSpec(
        _Kind.INT,
        (operator.attrgetter("flow.mark"),),
        "connection mark; mark/MASK compares the masked mark",
        "mark",
        _U32,
    ),
    "zone": _FieldSpec(_Kind.INT, (_zone,), "conntrack zone", "zone", _U16),
    "netns": _FieldSpec(
        _Kind.NETNS, (operator.attrgetter("netns"),), "network namespace name (* and ? glob)"
    ),
    "event": _FieldSpec(
        _Kind.EVENT, (operator.attrgetter("kind"),), "event kind: new, update, destroy, dump"
    ),
    "nat": _FieldSpec(_Kind.NAT, (_nat_type,), "NAT type: snat, dnat, both, none"),
    "ct_id": _FieldSpec(
        _Kind.INT, (operator.attrgetter("flow.ct_id"),), "conntrack id", "id", _U32
    ),
    "bytes": _FieldSpec(
        _Kind.INT,
        (_counter("bytes"),),
        "bytes, both directions (needs accounting)",
        "byte count",
        _U64,
    ),
    "packets": _FieldSpec(
        _Kind.INT,
        (_counter("packets"),),
        "packets, both directions (needs accounting)",
        "packet count",
        _U64,
    ),
}
_ALIASES = {"host": "addr", "id": "ct_id"}

FIELDS: dict[str, str] = {name: spec.doc for name, spec in _SPECS.items()}
FIELDS.update({alias: f"alias of {target}" for alias, target in _ALIASES.items()})

# ---------------------------------------------------------------------------------------------
# Values: text -> normalised AST value, per field kind
# ---------------------------------------------------------------------------------------------

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


def _number(spec: _FieldSpec, name: str, text: str, tok: _Tok) -> int:
    """A number within the field's range, or a FilterError naming the problem."""
    value = _parse_int(text)
    if value is None:
        raise _error(f"expected a number for {name!r}, found {_shown(tok.text)}", tok.pos)
    if value > spec.maximum:
        shown = text if len(text) <= _SHOWN_MAX else text[:_SHOWN_MAX] + "..."
        raise _error(f"{spec.unit} {shown} out of range (0-{spec.maximum})", tok.pos)
    return value


def _value_int(spec: _FieldSpec, name: str, tok: _Tok) -> Value:
    """A number or an inclusive range `low-high`."""
    low_text, dash, high_text = tok.text.partition("-")
    if not dash:
        return Literal(_number(spec, name, tok.text, tok))
    low, high = _number(spec, name, low_text, tok), _number(spec, name, high_text, tok)
    if low > high:
        raise _error(f"empty range {_shown(tok.text)}", tok.pos)
    return IntRange(low, high)


def _value_proto(spec: _FieldSpec, name: str, tok: _Tok) -> Value:
    """A protocol number or keyword, stored as the number."""
    number = PROTO_NUMBERS.get(tok.text.lower())
    if number is not None:
        return Literal(number)
    if _parse_int(tok.text) is None:
        hint = _did_you_mean(tok.text.lower(), PROTO_NUMBERS)
        raise _error(f"unknown protocol {_shown(tok.text)}", tok.pos, hint)
    return Literal(_number(spec, name, tok.text, tok))


def _value_family(spec: _FieldSpec, name: str, tok: _Tok) -> Value:
    """ipv4/ipv6 (or 4/6), stored as AF_INET/AF_INET6."""
    family = _FAMILIES.get(tok.text.lower())
    if family is None:
        raise _error(f"unknown family {_shown(tok.text)} (use ipv4 or ipv6)", tok.pos)
    return Literal(family)


def _value_addr(spec: _FieldSpec, name: str, tok: _Tok) -> Value:
    """An address or CIDR (host bits of a CIDR are ignored, as tcpdump does)."""
    text = tok.text
    try:
        if "/" in text:
            return Network(ipaddress.ip_network(text, strict=False))
        return Network(ipaddress.ip_network(ipaddress.ip_address(text)))
    except ValueError:
        what = "CIDR" if "/" in text else "address"
        raise _error(f"invalid {what} {_shown(text)}", tok.pos) from None


def _value_state(spec: _FieldSpec, name: str, tok: _Tok) -> Value:
    """A protocol state name (validated), a state number, or a glob."""
    text = tok.text.upper()
    if "*" in text or "?" in text:
        return Glob(text)
    if text not in _STATE_NAMES and not (text.isascii() and text.isdigit()):
        hint = _did_you_mean(text, _STATE_NAMES)
        raise _error(f"unknown state {_shown(tok.text)}", tok.pos, hint)
    return Literal(text)


def _value_netns(spec: _FieldSpec, name: str, tok: _Tok) -> Value:
    """A namespace name, or a glob when it contains * or ?."""
    text = tok.text
    return Glob(text) if "*" in text or "?" in text else Literal(text)


def _value_event(spec: _FieldSpec, name: str, tok: _Tok) -> Value:
    """An event kind label, stored as the EventKind."""
    kind = EventKind.__members__.get(tok.text.upper())
    if kind is None:
        hint = _did_you_mean(tok.text.lower(), [k.label for k in EventKind])
        raise _error(f"unknown event {_shown(tok.text)}", tok.pos, hint)
    return Literal(kind)


def _value_nat(spec: _FieldSpec, name: str, tok: _Tok) -> Value:
    """snat, dnat, both or none."""
    text = tok.text.lower()
    if text not in _NAT_VALUES:
        hint = _did_you_mean(text, _NAT_VALUES)
        raise _error(f"unknown NAT type {_shown(tok.text)}", tok.pos, hint)
    return Literal(text)


def _flag(tok: _Tok) -> CtStatus:
    """One CtStatus flag by (case-insensitive) name."""
    flag = CtStatus.__members__.get(tok.text.upper())
    if flag is None:
        hint = _did_you_mean(tok.text.upper(), CtStatus.__members__)
        raise _error(f"unknown status flag {_shown(tok.text)}", tok.pos, hint)
    return flag


def _value_flags(toks: Sequence[_Tok]) -> Flags:
    """The flags of `status has ...`, combined: all must be set."""
    mask = CtStatus(0)
    for tok in toks:
        mask |= _flag(tok)
    return Flags(mask)


_Coercer = Callable[[_FieldSpec, str, _Tok], Value]
_COERCERS: dict[_Kind, _Coercer] = {
    _Kind.INT: _value_int,
    _Kind.PROTO: _value_proto,
    _Kind.FAMILY: _value_family,
    _Kind.ADDR: _value_addr,
    _Kind.STATE: _value_state,
    _Kind.NETNS: _value_netns,
    _Kind.EVENT: _value_event,
    _Kind.NAT: _value_nat,
}

# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------

_MAX_DEPTH = 64  # nesting of ( and not; keeps recursion far from Python's limit
_ORDERED = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_OPERATORS = frozenset({"==", "!=", "in", "has", *_ORDERED})
_CANONICAL_OP = {"in": "==", "not in": "!="}
_RESERVED = frozenset({"and", "or", "not", "in", "has"})


def _eq(field: str, *values: Value) -> Callable[[int], Expr]:
    """A shorthand expanding to `field == values`."""
    return lambda pos: Compare(field, "==", values, position=pos)


def _has(flag: CtStatus) -> Callable[[int], Expr]:
    """A shorthand expanding to `status has flag`."""
    return lambda pos: Compare("status", "has", (Flags(flag),), position=pos)


_SHORTHAND_FACTORIES: dict[str, Callable[[int], Expr]] = {
    **{name: _eq("proto", Literal(number)) for name, number in PROTO_NUMBERS.items()},
    "ipv4": _eq("family", Literal(AF_INET)),
    "ipv6": _eq("family", Literal(AF_INET6)),
    **{kind.label: _eq("event", Literal(kind)) for kind in EventKind},
    "nat": lambda pos: Compare("nat", "!=", (Literal("none"),), position=pos),
    "snat": _eq("nat", Literal("snat"), Literal("both")),
    "dnat": _eq("nat", Literal("dnat"), Literal("both")),
    "assured": _has(CtStatus.ASSURED),
    "seen_reply": _has(CtStatus.SEEN_REPLY),
    "confirmed": _has(CtStatus.CONFIRMED),
    "src_nat": _has(CtStatus.SRC_NAT),
    "dst_nat": _has(CtStatus.DST_NAT),
    "unreplied": lambda pos: Not(_has(CtStatus.SEEN_REPLY)(pos)),
}


def _joined(cls: type[And | Or], operands: list[Expr]) -> Expr:
    """operands joined by cls, flattening nested nodes of the same class."""
    if len(operands) == 1:
        return operands[0]
    flat: list[Expr] = []
    for operand in operands:
        flat.extend(operand.operands if isinstance(operand, cls) else (operand,))
    return cls(tuple(flat))


class _Parser:
    """Recursive-descent parser over the token list; one instance per parse."""

    def __init__(self, text: str) -> None:
        self._tokens = _tokenize(text)
        self._index = 0
        self._depth = 0

    def parse(self) -> Expr:
        """The whole filter; the input must be used up."""
        if self._peek().kind == "end":
            raise _error("empty filter expression", 0)
        expr = self._parse_or()
        tok = self._peek()
        if tok.kind != "end":
            reason = f"expected 'and', 'or' or the end of the filter, found {_describe(tok)}"
            raise _error(reason, tok.pos)
        return expr

    def _peek(self, ahead: int = 0) -> _Tok:
        return self._tokens[min(self._index + ahead, len(self._tokens) - 1)]

    def _advance(self) -> _Tok:
        tok = self._tokens[self._index]
        if tok.kind != "end":
            self._index += 1
        return tok

    def _accept(self, key: str) -> bool:
        if self._peek().key != key:
            return False
        self._advance()
        return True

    def _parse_or(self) -> Expr:
        operands = [self._parse_and()]
        while self._accept("or"):
            operands.append(self._parse_and())
        return _joined(Or, operands)

    def _parse_and(self) -> Expr:
        operands = [self._parse_unary()]
        while self._accept("and"):
            operands.append(self._parse_unary())
        return _joined(And, operands)

    def _parse_unary(self) -> Expr:
        tok = self._peek()
        if tok.key == "not":
            self._advance()
            return Not(self._nested(self._parse_unary, tok))
        if tok.key == "(":
            self._advance()
            expr = self._nested(self._parse_or, tok)
            close = self._advance()
            if close.key != ")":
                reason = f"expected ')' for the '(' at position {tok.pos}, found {_describe(close)}"
                raise _error(reason, close.pos)
            return expr
        return self._parse_atom()

    def _nested(self, parse: Callable[[], Expr], tok: _Tok) -> Expr:
        self._depth += 1
        if self._depth > _MAX_DEPTH:
            raise _error(f"expression nested more than {_MAX_DEPTH} deep", tok.pos)
        try:
            return parse()
        finally:
            self._depth -= 1

    def _at_operator(self) -> bool:
        key = self._peek().key
        return key in _OPERATORS or (key == "not" and self._peek(1).key == "in")

    def _parse_atom(self) -> Expr:
        tok = self._advance()
        if tok.kind != "word" or tok.key in _RESERVED:
            raise _error(f"expected a field or a shorthand, found {_describe(tok)}", tok.pos)
        name, slash, mask_text = tok.key.partition("/")
        field = _ALIASES.get(name, name)
        # 'nat' is both a field and a shorthand: an operator after it decides.
        if field in _SPECS and (tok.key not in _SHORTHAND_FACTORIES or self._at_operator()):
            mask = _parse_mask(_SPECS[field], field, mask_text, tok) if slash else None
            return self._parse_compare(field, tok, mask)
        factory = _SHORTHAND_FACTORIES.get(tok.key)
        if factory is None:
            hint = _did_you_mean(name, [*_SPECS, *_ALIASES, *_SHORTHAND_FACTORIES])
            raise _error(f"unknown field {_shown(tok.text)}", tok.pos, hint)
        return factory(tok.pos)

    def _parse_compare(self, field: str, name_tok: _Tok, mask: int | None) -> Compare:
        op_tok = self._advance()
        op = op_tok.key
        if op == "not" and self._accept("in"):
            op = "not in"
        elif op not in _OPERATORS:
            reason = f"expected an operator after {_shown(name_tok.text)}, found "
            raise _error(reason + _describe(op_tok), op_tok.pos)
        toks = self._parse_values(op_tok)
        return _build_compare(field, op, op_tok, toks, mask=mask, pos=name_tok.pos)

    def _parse_values(self, after: _Tok) -> list[_Tok]:
        brace = self._peek()
        if not self._accept("{"):
            return [self._parse_value(after)]
        toks = [self._parse_value(brace)]
        while self._accept(","):
            if self._peek().key == "}":  # a trailing comma is fine
                break
            toks.append(self._parse_value(self._tokens[self._index - 1]))
        close = self._advance()
        if close.key != "}":
            raise _error(f"expected ',' or '}}' in the set, found {_describe(close)}", close.pos)
        return toks

    def _parse_value(self, after: _Tok) -> _Tok:
        tok = self._advance()
        if tok.kind == "str" or (tok.kind == "word" and tok.key not in _RESERVED):
            return tok
        raise _error(f"expected a value after {after.text!r}", tok.pos)


def _parse_mask(spec: _FieldSpec, field: str, text: str, tok: _Tok) -> int:
    """The MASK of `field/MASK`, for numeric fields only."""
    if spec.kind is not _Kind.INT:
        raise _error(f"field {field!r} takes no mask", tok.pos)
    value = _parse_int(text)
    if value is None or value > spec.maximum:
        raise _error(f"invalid mask {_shown(text)} for {field!r}", tok.pos)
    return value


def _check_operator(field: str, spec: _FieldSpec, op: str, op_tok: _Tok, count: int) -> None:
    """Reject operators the field's kind does not support."""
    if spec.kind is _Kind.STATUS and op != "has":
        raise _error("field 'status' is tested with 'has', e.g. 'status has ASSURED'", op_tok.pos)
    if op == "has" and spec.kind is not _Kind.STATUS:
        raise _error(f"operator 'has' applies only to 'status', not {field!r}", op_tok.pos)
    if op in _ORDERED and spec.kind is not _Kind.INT:
        raise _error(f"operator {op!r} needs a numeric field, not {field!r}", op_tok.pos)
    if op in _ORDERED and count != 1:
        raise _error(f"operator {op!r} takes a single number, not a set", op_tok.pos)


def _build_compare(
    field: str, op: str, op_tok: _Tok, toks: list[_Tok], *, mask: int | None, pos: int
) -> Compare:
    """The Compare node for `field op values`, values normalised for the field's kind."""
    spec = _SPECS[field]
    _check_operator(field, spec, op, op_tok, len(toks))
    if spec.kind is _Kind.STATUS:
        return Compare(field, "has", (_value_flags(toks),), position=pos)
    coerce = _COERCERS[spec.kind]
    values = tuple(coerce(spec, field, tok) for tok in toks)
    if op in _ORDERED and not isinstance(values[0], Literal):
        raise _error(f"operator {op!r} takes a single number, not a range", toks[0].pos)
    return Compare(field, _CANONICAL_OP.get(op, op), values, mask, pos)


def parse(text: str) -> Expr:
    """Parse a filter expression; raises FilterError (path 'filter') on any problem."""
    if not isinstance(text, str):
        raise _error(f"a filter must be text, not {type(text).__name__}")
    return _Parser(text).parse()


# ---------------------------------------------------------------------------------------------
# Formatting (AST -> text), used for SHORTHANDS help and handy for logs
# ---------------------------------------------------------------------------------------------

_BARE_VALUE_RE = re.compile(r"[\w.:/*?%-]+")


def _quote(text: str) -> str:
    """text as a value token: bare when it tokenizes as one word, else quoted."""
    if _BARE_VALUE_RE.fullmatch(text) and text.lower() not in _RESERVED:
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


SHORTHANDS: dict[str, str] = {
    name: format_expr(factory(0)) for name, factory in _SHORTHAND_FACTORIES.items()
}

# ---------------------------------------------------------------------------------------------
# Compiler: AST -> nested closures
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
    compare = _ORDERED[op]
    return lambda value: value is not None and compare(value, bound)


def _flags_test(mask: int) -> _Test:
    """All of mask's bits set; int() first because IntFlag's own & costs ~0.5 µs."""
    return lambda status: int(status) & mask == mask


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


# What a hand-built tree may hold per kind (parse() only builds trees that fit).
_LITERAL_TYPES: dict[_Kind, type] = {
    _Kind.INT: int,
    _Kind.PROTO: int,
    _Kind.FAMILY: int,
    _Kind.EVENT: int,
    _Kind.STATE: str,
    _Kind.NETNS: str,
    _Kind.NAT: str,
}
_OTHER_VALUES: dict[_Kind, tuple[type, ...]] = {
    _Kind.INT: (IntRange,),
    _Kind.ADDR: (Network,),
    _Kind.STATE: (Glob,),
    _Kind.NETNS: (Glob,),
    _Kind.STATUS: (Flags,),
}


def _value_fits(kind: _Kind, value: Value) -> bool:
    """Whether a value can be compared with a field of this kind."""
    if isinstance(value, Literal):
        return isinstance(value.value, _LITERAL_TYPES.get(kind, ()))
    return isinstance(value, _OTHER_VALUES.get(kind, ()))


def _operator_fits(kind: _Kind, cmp: Compare) -> bool:
    """Whether the operator and value count suit a field of this kind."""
    if kind is _Kind.STATUS:
        return cmp.op == "has" and len(cmp.values) == 1
    if cmp.op in ("==", "!="):
        return True
    single = len(cmp.values) == 1 and isinstance(cmp.values[0], Literal)
    return cmp.op in _ORDERED and kind is _Kind.INT and single


def _check_node(cmp: Compare, spec: _FieldSpec) -> None:
    """Reject a malformed Compare (possible only in a tree built by hand)."""
    fits = (
        bool(cmp.values)
        and all(_value_fits(spec.kind, value) for value in cmp.values)
        and _operator_fits(spec.kind, cmp)
        and (cmp.mask is None or spec.kind is _Kind.INT)
    )
    if not fits:
        raise _error(f"malformed comparison {cmp!r}", cmp.position)


def _value_test(spec: _FieldSpec, cmp: Compare) -> _Test:
    """The test one field value must pass for the (positive form of the) comparison."""
    first = cmp.values[0]
    if cmp.op in _ORDERED and isinstance(first, Literal) and isinstance(first.value, int):
        return _ordered_test(cmp.op, first.value)
    if isinstance(first, Flags):
        return _flags_test(int(first.mask))
    if spec.kind is _Kind.ADDR:
        return _address_test(cmp.values)
    return _scalar_test(cmp.values)


def _literal_leaf(get: _Getter, cmp: Compare) -> Predicate | None:
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


def _masked(get: _Getter, mask: int) -> _Getter:
    """Getter of value & mask (None stays None)."""

    def getter(event: FlowEvent) -> Any:
        value = get(event)
        return None if value is None else value & mask

    return getter


def _apply(getters: tuple[_Getter, ...], test: _Test) -> Predicate:
    """Predicate: test passes for the field's value (for any of its getters)."""
    if len(getters) == 1:
        (get,) = getters
        return lambda event: test(get(event))
    first, second = getters
    return lambda event: test(first(event)) or test(second(event))


def _compile_compare(cmp: Compare) -> Predicate:
    """The predicate for one comparison."""
    spec = _SPECS.get(cmp.field)
    if spec is None:
        raise _error(f"unknown field {_shown(cmp.field)}", cmp.position)
    _check_node(cmp, spec)
    getters = spec.getters
    if cmp.mask is not None:
        getters = tuple(_masked(get, cmp.mask) for get in getters)
    if len(getters) == 1 and spec.kind is not _Kind.ADDR:
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
    raise _error(f"not a filter expression: {expr!r}")


def compile_filter(text: str) -> Predicate:
    """Parse and compile a filter expression in one step."""
    return compile_predicate(parse(text))

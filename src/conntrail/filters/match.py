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

from conntrail.filters.ast import (
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
from conntrail.filters.compiler import Predicate, compile_filter, compile_predicate
from conntrail.filters.fields import FIELDS, SHORTHANDS
from conntrail.filters.parser import parse
from conntrail.filters.render import format_expr

# The public facade: the implementation lives in ast (nodes and values), lexer, fields (the
# vocabulary), values (value parsing), parser, render (format_expr), compiler and diagnostics.
__all__ = [
    "FIELDS",
    "SHORTHANDS",
    "And",
    "Compare",
    "Expr",
    "Flags",
    "Glob",
    "IntRange",
    "Literal",
    "Network",
    "Not",
    "Or",
    "Predicate",
    "Value",
    "compile_filter",
    "compile_predicate",
    "format_expr",
    "parse",
]

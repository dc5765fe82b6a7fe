"""Tokenizer of filter text: tokens with their positions, reserved words, token names."""

from __future__ import annotations

import re
from typing import NamedTuple

from conntrail.errors import FilterError
from conntrail.filters.diagnostics import error, shown

RESERVED = frozenset({"and", "or", "not", "in", "has"})


class Token(NamedTuple):
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


def tokenize(text: str) -> list[Token]:
    """Split text into tokens, ending with an "end" token at len(text)."""
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            raise _bad_char(text, pos)
        tokens.extend(_make_token(match.lastgroup or "", match.group(), pos))
        pos = match.end()
    tokens.append(Token("end", "", "", len(text)))
    return tokens


def _make_token(kind: str, text: str, pos: int) -> list[Token]:
    """The token for one regex match (none for whitespace)."""
    if kind == "op":
        return [Token("op", text, _OP_KEYS.get(text, text), pos)]
    if kind == "str":
        return [Token("str", text[1:-1], "", pos)]
    if kind == "word":
        return [Token("word", text, text.lower(), pos)]
    return []


def _bad_char(text: str, pos: int) -> FilterError:
    """The error for a character no token can start with."""
    char = text[pos]
    if char in "\"'":
        return error("unterminated string", pos)
    hint = {"&": " (did you mean '&&'?)", "|": " (did you mean '||'?)"}.get(char, "")
    return error(f"unexpected character {char!r}", pos, hint)


def describe(tok: Token) -> str:
    """A token as named in messages."""
    if tok.kind == "end":
        return "the end of the filter"
    if tok.kind == "str":
        return f"string {shown(tok.text)}"
    return shown(tok.text)

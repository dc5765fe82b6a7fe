"""Recursive-descent parser of filter text into the AST (`parse`)."""

from __future__ import annotations

from collections.abc import Callable

from conntrail.filters.ast import ORDERED, And, Compare, Expr, Literal, Not, Or
from conntrail.filters.diagnostics import did_you_mean, error, shown
from conntrail.filters.fields import ALIASES, SHORTHAND_FACTORIES, SPECS, FieldSpec, Kind
from conntrail.filters.lexer import RESERVED, Token, describe, tokenize
from conntrail.filters.values import COERCERS, parse_mask, value_flags

_MAX_DEPTH = 64  # nesting of ( and not; keeps recursion far from Python's limit
_OPERATORS = frozenset({"==", "!=", "in", "has", *ORDERED})
_CANONICAL_OP = {"in": "==", "not in": "!="}


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
        self._tokens = tokenize(text)
        self._index = 0
        self._depth = 0

    def parse(self) -> Expr:
        """The whole filter; the input must be used up."""
        if self._peek().kind == "end":
            raise error("empty filter expression", 0)
        expr = self._parse_or()
        tok = self._peek()
        if tok.kind != "end":
            reason = f"expected 'and', 'or' or the end of the filter, found {describe(tok)}"
            raise error(reason, tok.pos)
        return expr

    def _peek(self, ahead: int = 0) -> Token:
        return self._tokens[min(self._index + ahead, len(self._tokens) - 1)]

    def _advance(self) -> Token:
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
                reason = f"expected ')' for the '(' at position {tok.pos}, found {describe(close)}"
                raise error(reason, close.pos)
            return expr
        return self._parse_atom()

    def _nested(self, parse: Callable[[], Expr], tok: Token) -> Expr:
        self._depth += 1
        if self._depth > _MAX_DEPTH:
            raise error(f"expression nested more than {_MAX_DEPTH} deep", tok.pos)
        try:
            return parse()
        finally:
            self._depth -= 1

    def _at_operator(self) -> bool:
        key = self._peek().key
        return key in _OPERATORS or (key == "not" and self._peek(1).key == "in")

    def _parse_atom(self) -> Expr:
        tok = self._advance()
        if tok.kind != "word" or tok.key in RESERVED:
            raise error(f"expected a field or a shorthand, found {describe(tok)}", tok.pos)
        name, slash, mask_text = tok.key.partition("/")
        field = ALIASES.get(name, name)
        # 'nat' is both a field and a shorthand: an operator after it decides.
        if field in SPECS and (tok.key not in SHORTHAND_FACTORIES or self._at_operator()):
            mask = parse_mask(SPECS[field], field, mask_text, tok) if slash else None
            return self._parse_compare(field, tok, mask)
        factory = SHORTHAND_FACTORIES.get(tok.key)
        if factory is None:
            hint = did_you_mean(name, [*SPECS, *ALIASES, *SHORTHAND_FACTORIES])
            raise error(f"unknown field {shown(tok.text)}", tok.pos, hint)
        return factory(tok.pos)

    def _parse_compare(self, field: str, name_tok: Token, mask: int | None) -> Compare:
        op_tok = self._advance()
        op = op_tok.key
        if op == "not" and self._accept("in"):
            op = "not in"
        elif op not in _OPERATORS:
            reason = f"expected an operator after {shown(name_tok.text)}, found "
            raise error(reason + describe(op_tok), op_tok.pos)
        toks = self._parse_values(op_tok)
        return _build_compare(field, op, op_tok, toks, mask=mask, pos=name_tok.pos)

    def _parse_values(self, after: Token) -> list[Token]:
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
            raise error(f"expected ',' or '}}' in the set, found {describe(close)}", close.pos)
        return toks

    def _parse_value(self, after: Token) -> Token:
        tok = self._advance()
        if tok.kind == "str" or (tok.kind == "word" and tok.key not in RESERVED):
            return tok
        raise error(f"expected a value after {after.text!r}", tok.pos)


def _check_operator(field: str, spec: FieldSpec, op: str, op_tok: Token, count: int) -> None:
    """Reject operators the field's kind does not support."""
    if spec.kind is Kind.STATUS and op != "has":
        raise error("field 'status' is tested with 'has', e.g. 'status has ASSURED'", op_tok.pos)
    if op == "has" and spec.kind is not Kind.STATUS:
        raise error(f"operator 'has' applies only to 'status', not {field!r}", op_tok.pos)
    if op in ORDERED and spec.kind is not Kind.INT:
        raise error(f"operator {op!r} needs a numeric field, not {field!r}", op_tok.pos)
    if op in ORDERED and count != 1:
        raise error(f"operator {op!r} takes a single number, not a set", op_tok.pos)


def _build_compare(
    field: str, op: str, op_tok: Token, toks: list[Token], *, mask: int | None, pos: int
) -> Compare:
    """The Compare node for `field op values`, values normalised for the field's kind."""
    spec = SPECS[field]
    _check_operator(field, spec, op, op_tok, len(toks))
    if spec.kind is Kind.STATUS:
        return Compare(field, "has", (value_flags(toks),), position=pos)
    coerce = COERCERS[spec.kind]
    values = tuple(coerce(spec, field, tok) for tok in toks)
    if op in ORDERED and not isinstance(values[0], Literal):
        raise error(f"operator {op!r} takes a single number, not a range", toks[0].pos)
    return Compare(field, _CANONICAL_OP.get(op, op), values, mask, pos)


def parse(text: str) -> Expr:
    """Parse a filter expression; raises FilterError (path 'filter') on any problem."""
    if not isinstance(text, str):
        raise error(f"a filter must be text, not {type(text).__name__}")
    return _Parser(text).parse()

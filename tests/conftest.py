"""Options and fixtures shared by the whole test tree; add new ones below."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    """--regen-golden: rewrite the golden files (conntrack JSON, inventory rulesets)."""
    parser.addoption(
        "--regen-golden", action="store_true", default=False,
        help="rewrite the golden files (tests/data/conntrack/*.json from the decoder, "
             "tests/data/inventory/*.nft from the ruleset renderer) instead of comparing "
             "against them (review the diff before committing)")

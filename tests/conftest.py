"""Options and fixtures shared by the whole test tree; add new ones below."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    """--regen-golden: rewrite tests/data/conntrack/*.json from the current decoder."""
    parser.addoption(
        "--regen-golden", action="store_true", default=False,
        help="rewrite the golden .json files of tests/data/conntrack from the current "
             "decoder instead of comparing against them (review the diff before committing)")

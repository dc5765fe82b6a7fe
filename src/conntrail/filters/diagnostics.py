"""FilterError construction shared by the filter modules: positions, quoting and hints."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from conntrail.errors import FilterError

SHOWN_MAX = 40


def error(reason: str, pos: int | None = None, hint: str = "") -> FilterError:
    """A FilterError whose reason ends with the character position and an optional hint."""
    where = "" if pos is None else f" at position {pos}"
    return FilterError("filter", f"{reason}{where}{hint}")


def shown(text: str) -> str:
    """Text quoted for a message, shortened so a huge input cannot flood it."""
    if len(text) > SHOWN_MAX:
        text = text[:SHOWN_MAX] + "..."
    return repr(text)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean ...?)' hint for the closest choice, or ''."""
    close = difflib.get_close_matches(word[:SHOWN_MAX], list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""

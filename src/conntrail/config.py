"""Reading TOML tables key by key: typed values, key paths in every error, no unknown keys.

Every stage that takes configuration reads its own table through a `Table`: it asks for each
key with its type and default, then calls `done()`, which refuses any key nobody asked for
(with the closest known name as a hint). So a misspelt `rotate_szie` is an error naming
`pipelines.main.sinks.log.rotate_szie`, never a silently ignored setting.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, TypeVar

from conntrail.errors import ConfigError
from conntrail.units import parse_duration, parse_size

T = TypeVar("T")
_MISSING: Any = object()


class Table:
    """One TOML table being read; remembers which keys were taken."""

    def __init__(self, data: dict[str, Any], path: str = "") -> None:
        self.data = data
        self.path = path
        self._taken: set[str] = set()

    def key_path(self, key: str) -> str:
        """The dotted path of `key`, as errors name it."""
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, reason: str) -> ConfigError:
        """A ConfigError naming `key`'s full path."""
        return ConfigError(self.key_path(key), reason)

    def skip(self, *keys: str) -> None:
        """Mark keys as read by someone else (e.g. the daemon's own keys in a sink's table)."""
        self._taken.update(keys)

    def has(self, key: str) -> bool:
        """Whether the key is present (without taking it)."""
        return key in self.data

    def _take(self, key: str, kind: type[T] | tuple[type, ...], default: Any,
              what: str) -> Any:
        self._taken.add(key)
        if key not in self.data:
            if default is _MISSING:
                raise self.error(key, "is required")
            return default
        value = self.data[key]
        # bool is an int in Python; `port = true` must not read as 1.
        if isinstance(value, bool) and kind is not bool:
            raise self.error(key, f"must be {what}, not a boolean")
        if not isinstance(value, kind):
            raise self.error(key, f"must be {what}, not {_describe(value)}")
        return value

    def text(self, key: str, default: Any = _MISSING,
            choices: Sequence[str] | None = None) -> Any:
        """A string (or `default`, which may be None); `choices` limits the values."""
        value = self._take(key, str, default, "a string")
        if choices is not None and value is not None and value not in choices:
            raise self.error(key, f"unknown value {value!r}; one of: {', '.join(choices)}")
        return value

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        """true or false."""
        return self._take(key, bool, default, "true or false")

    def integer(self, key: str, default: Any = _MISSING, minimum: int | None = None,
            maximum: int | None = None) -> Any:
        """An integer within [minimum, maximum]."""
        value = self._take(key, int, default, "an integer")
        if value is not None:
            _check_range(self, key, value, minimum, maximum)
        return value

    def number(self, key: str, default: Any = _MISSING, minimum: float | None = None,
              maximum: float | None = None) -> Any:
        """A number (integers accepted) within [minimum, maximum]."""
        value = self._take(key, (int, float), default, "a number")
        if value is not None:
            _check_range(self, key, value, minimum, maximum)
            value = float(value)
        return value

    def size(self, key: str, default: Any = _MISSING, maximum: int = 1 << 50) -> Any:
        """Bytes, written as "100M", "512k" or an integer; None stays None."""
        value = self._take(key, (str, int), default, 'a size such as "100M"')
        if value is None:
            return value
        if isinstance(value, int):
            value = str(value)
        return parse_size(value, self.key_path(key), maximum)

    def duration(self, key: str, default: Any = _MISSING) -> Any:
        """Seconds (float), written as "30s", "5m", "1d" or a number of seconds."""
        value = self._take(key, (str, int, float), default, 'a duration such as "30s"')
        if value is None:
            return value
        if isinstance(value, int | float):
            if value < 0:
                raise self.error(key, "must not be negative")
            return float(value)
        return parse_duration(value, self.key_path(key)) / 1e9

    def texts(self, key: str, default: Any = _MISSING) -> Any:
        """A list of strings; a single string counts as a list of one."""
        value = self._take(key, (str, list), default, "a string or a list of strings")
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            for index, item in enumerate(value):
                if not isinstance(item, str):
                    raise ConfigError(f"{self.key_path(key)}[{index}]",
                                      f"must be a string, not {_describe(item)}")
        return value

    def table(self, key: str) -> Table:
        """A sub-table (an empty one when absent)."""
        value = self._take(key, dict, {}, "a table")
        return Table(value, self.key_path(key))

    def tables(self, key: str) -> dict[str, Table]:
        """A table of named tables, e.g. `[pipelines.main.sinks.NAME]`, in file order."""
        outer = self.table(key)
        named: dict[str, Table] = {}
        for name in list(outer.data):
            named[name] = outer.table(name)
        outer.done()
        return named

    def done(self) -> None:
        """Refuse the first key no reader asked for."""
        for key in self.data:
            if key not in self._taken:
                close = difflib.get_close_matches(key, sorted(self._taken), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                known = ", ".join(sorted(self._taken)) or "none"
                raise self.error(key, f"unknown key{hint} (known here: {known})")


def _check_range(table: Table, key: str, value: float, minimum: float | None,
                 maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise table.error(key, f"must be at least {minimum}, not {value}")
    if maximum is not None and value > maximum:
        raise table.error(key, f"must be at most {maximum}, not {value}")


def _describe(value: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
             list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)

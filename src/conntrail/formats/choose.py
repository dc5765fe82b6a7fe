"""The formatter a configured sink asks for: `format`, `template` and `timestamp` keys."""

from __future__ import annotations

from conntrail.config import Table
from conntrail.pipeline import registry
from conntrail.pipeline.stages import Formatter

FORMAT_NAMES = ("json", "ulogd", "text")


def formatter_from(table: Table, default: str = "json") -> Formatter:
    """Read the format keys of a sink's table: `format = "json"` (ECS, default), `"ulogd"`
    (ulogd2's JSON keys) or `"text"` with `template` and `timestamp`."""
    name = table.text("format", default, choices=FORMAT_NAMES)
    if name != "text":
        for key in ("template", "timestamp"):
            if table.has(key):
                raise table.error(key, f"only applies to format = \"text\", not {name!r}")
        return registry.load("format", name, table.key_path("format"))()  # type: ignore[no-any-return]
    from conntrail.formats.text import DEFAULT_TEMPLATE, DEFAULT_TS

    template = table.text("template", DEFAULT_TEMPLATE)
    timestamp = table.text("timestamp", DEFAULT_TS)
    cls = registry.load("format", "text", table.key_path("format"))
    return cls(template, timestamp)  # type: ignore[no-any-return]

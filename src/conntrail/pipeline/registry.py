"""Stage names → where they live, imported only when used.

An explicit table, not entry-point discovery: a reader sees every stage in one place, and a
stage whose optional dependency is missing becomes a ConfigError naming the extra to install,
raised while the configuration is checked, before anything starts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from conntrail.errors import ConfigError


@dataclass(frozen=True, slots=True)
class StageEntry:
    """Where a stage is defined and which pip extra provides its dependencies."""

    target: str  # "package.module:attribute"
    extra: str | None = None


SOURCES: dict[str, StageEntry] = {
    "conntrack": StageEntry("conntrail.sources.conntrack:ConntrackSource"),
}
FORMATS: dict[str, StageEntry] = {
    "text": StageEntry("conntrail.formats.text:TextFormat"),
    "json": StageEntry("conntrail.formats.jsonl:JsonFormat"),
    "ulogd": StageEntry("conntrail.formats.ulogd:UlogdFormat"),
}
SINKS: dict[str, StageEntry] = {
    # name → from_config(table, SinkContext) -> Sink
    "stdout": StageEntry("conntrail.sinks.stream:stdout_from_config"),
    "file": StageEntry("conntrail.sinks.file:from_config"),
    "syslog": StageEntry("conntrail.sinks.syslog:from_config"),
    "sqlite": StageEntry("conntrail.sinks.history:sqlite_from_config"),
    "postgresql": StageEntry("conntrail.sinks.history:postgresql_from_config", "postgres"),
}
KINDS: dict[str, dict[str, StageEntry]] = {"source": SOURCES, "format": FORMATS, "sink": SINKS}


def load(kind: str, name: str, path: str = "") -> Any:
    """The class or factory registered as `name`; errors name the config path and the fix."""
    table = KINDS[kind]
    where = path or f"{kind}"
    entry = table.get(name)
    if entry is None:
        raise ConfigError(where, f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}")
    module_name, _, attribute = entry.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f"; install it with: pip install 'conntrail[{entry.extra}]'" if entry.extra else ""
        raise ConfigError(where, f"{kind} {name!r} cannot load ({exc}){hint}") from exc
    return getattr(module, attribute)

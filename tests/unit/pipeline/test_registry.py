"""The stage registry: lazy loading, clear errors for unknown or uninstallable stages."""

from __future__ import annotations

import pytest

from conntrail.errors import ConfigError
from conntrail.formats.jsonl import JsonFormat
from conntrail.pipeline import registry


def test_every_registered_stage_loads() -> None:
    for kind, table in registry.KINDS.items():
        for name in table:
            assert callable(registry.load(kind, name))
    assert registry.load("format", "json") is JsonFormat


def test_unknown_stage_names_the_path_and_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"pipelines\.a\.sinks\.x: unknown sink 'kafka'; known: "):
        registry.load("sink", "kafka", "pipelines.a.sinks.x")


def test_missing_dependency_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.SINKS, "pg", registry.StageEntry("no_such_mod:X", "postgres"))
    with pytest.raises(ConfigError, match=r"pip install 'conntrail\[postgres\]'"):
        registry.load("sink", "pg", "sinks.db")

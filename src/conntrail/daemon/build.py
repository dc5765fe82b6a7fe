"""Configured sinks → queued sinks, with their policies, filters and spill queues (no I/O).

Building a sink reads (and so checks) its type's own keys; nothing is opened until the sink
starts. `conntrail check` builds everything this way, then runs each sink's health check.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conntrail.config import Table
from conntrail.daemon.config import Config, PipelineSettings, SinkSettings
from conntrail.errors import ConfigError
from conntrail.model import EventKind, FlowEvent
from conntrail.pipeline import registry
from conntrail.pipeline.queued import FullPolicy, QueuedSink, RetryPolicy
from conntrail.pipeline.stages import Filter, SinkContext

# Keys every sink table may have, read by the daemon (config.py), not by the sink type.
DAEMON_SINK_KEYS = ("type", "queue", "when_full", "spill_max", "retry", "filter", "events")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass
class BuiltSink:
    """A sink ready to start, with what the daemon needs to know about it."""

    settings: SinkSettings
    queued: QueuedSink
    spill_dir: Path | None = None


def build_sinks(config: Config, pipeline: PipelineSettings) -> list[BuiltSink]:
    """Every sink of a pipeline (the type's keys are checked here)."""
    return [build_sink(config, pipeline, sink) for sink in pipeline.sinks]


def build_all(config: Config) -> dict[str, list[BuiltSink]]:
    """Every pipeline's sinks: the whole configuration's check."""
    return {pipeline.name: build_sinks(config, pipeline) for pipeline in config.pipelines}


def build_sink(config: Config, pipeline: PipelineSettings, settings: SinkSettings) -> BuiltSink:
    """One sink behind its queue."""
    table = Table(settings.data, settings.path)
    table.skip(*DAEMON_SINK_KEYS)
    context = SinkContext(settings.name, config.daemon.state_dir, config.daemon.log_dir,
                          pipeline.netns)
    from_config = registry.load("sink", settings.type, table.key_path("type"))
    sink = from_config(table, context)
    spill_dir = None
    spill = None
    if settings.when_full is FullPolicy.SPILL:
        spill_dir = spill_directory(config, pipeline, settings)
        spill = _LazySpill(spill_dir, settings.spill_max)
    queued = QueuedSink(sink, settings.queue, settings.when_full,
                        keep=sink_filter(pipeline, settings), spill=spill,
                        retry=RetryPolicy() if settings.retry else None)
    return BuiltSink(settings, queued, spill_dir)


def spill_directory(config: Config, pipeline: PipelineSettings, settings: SinkSettings) -> Path:
    """STATE_DIR/spill/PIPELINE.SINK: one per sink, kept across restarts and reloads."""
    name = _SAFE.sub("_", f"{pipeline.name}.{settings.name}")
    return config.daemon.state_dir / "spill" / name


def sink_filter(pipeline: PipelineSettings, settings: SinkSettings) -> Filter | None:
    """The sink's event kinds (its own, else the pipeline's) and its own filters. History
    stores take every event: the lifecycle needs NEW, UPDATE, DESTROY and the dump."""
    if settings.is_history:
        return None
    kinds = settings.events if settings.events is not None else pipeline.events
    checks: list[Filter] = []
    if kinds != frozenset(EventKind):
        checks.append(_kinds_filter(kinds))
    if settings.filters:
        from conntrail.filters.match import compile_filter

        checks.extend(compile_filter(text) for text in settings.filters)
    if not checks:
        return None
    if len(checks) == 1:
        return checks[0]
    return lambda event: all(check(event) for check in checks)


def _kinds_filter(kinds: frozenset[EventKind]) -> Callable[[FlowEvent], bool]:
    return lambda event: event.kind in kinds


class _LazySpill:
    """The spill queue, opened (directory, lock, leftovers) at the first use, not at build:
    a configuration check must not create directories or take locks."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._queue: Any = None

    def _open(self) -> Any:
        if self._queue is None:
            from conntrail.pipeline.spill import SpillQueue

            self._queue = SpillQueue(self.directory, self.max_bytes)
        return self._queue

    def put(self, record: bytes) -> bool:
        """Append; False when full."""
        return bool(self._open().put(record))

    def get(self) -> bytes | None:
        """The oldest uncommitted record (opening replays an earlier run's leftovers)."""
        record: bytes | None = self._open().get()
        return record

    def commit(self) -> None:
        """The last record from get() was written."""
        self._open().commit()

    def __len__(self) -> int:
        return len(self._open())

    def close(self) -> None:
        """Flush and release."""
        if self._queue is not None:
            self._queue.close()
            self._queue = None


def check_sinks(built: dict[str, list[BuiltSink]]) -> list[tuple[str, str, bool]]:
    """Each sink's health check: (key path, what was found, ok)."""
    results = []
    for sinks in built.values():
        for item in sinks:
            check = getattr(item.queued.sink, "check", None)
            if check is None:
                results.append((item.settings.path, "no health check for this type", True))
                continue
            try:
                results.append((item.settings.path, str(check()), True))
            except (ConfigError, OSError, Exception) as exc:  # noqa: BLE001 - reported
                results.append((item.settings.path, str(exc) or repr(exc), False))
    return results

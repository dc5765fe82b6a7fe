"""Configured sinks → queued sinks, with their policies, filters and spill queues (no I/O).

Building a sink reads (and so checks) its type's own keys; nothing is opened until the sink
starts. `conntrail check` builds everything this way, then runs each sink's health check.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conntrail.config import Table
from conntrail.daemon.config import Config, PipelineSettings, SinkSettings
from conntrail.errors import ConfigError, ConntrailError
from conntrail.model import EventKind, FlowEvent
from conntrail.pipeline import registry
from conntrail.pipeline.queued import FullPolicy, QueuedSink, RetryPolicy
from conntrail.pipeline.stages import Filter, SinkContext

# Keys every sink table may have, read by the daemon (config.py), not by the sink type.
DAEMON_SINK_KEYS = ("type", "queue", "when_full", "spill_max", "retry", "filter", "events")
log = logging.getLogger(__name__)
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
    built = {pipeline.name: build_sinks(config, pipeline) for pipeline in config.pipelines}
    _check_destinations([item for items in built.values() for item in items])
    return built


def _check_destinations(items: list[BuiltSink]) -> None:
    """Two sinks writing one file or one store would interleave and rotate each other's
    output (the default paths come from the sink's name: two pipelines' `flows`)."""
    owner: dict[str, str] = {}
    for item in items:
        destination = getattr(item.queued.sink, "destination", None)
        if destination is None:
            continue
        if destination in owner:
            raise ConfigError(item.settings.path, f"writes to {destination}, as "
                              f"{owner[destination]} does; give one a `path` of its own")
        owner[destination] = item.settings.path


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
                        retry=RetryPolicy() if settings.retry else None,
                        label=settings.name)
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
    """The spill queue, opened when its sink starts (directory, lock, an earlier run's
    leftovers), not when built: a configuration check must not create or lock anything.

    On a reload, the sink it replaces may still hold the directory while it drains: the new
    one then runs without a spill until it can take it (a full queue meanwhile drops, and
    counts), retrying at most every RETRY_OPEN_S.
    """

    RETRY_OPEN_S = 1.0

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._queue: Any = None
        self._lock = threading.Lock()
        self._closed = False
        self._next_try = 0.0

    def open(self, required: bool = True) -> None:
        """Open now; `required`: a directory held elsewhere is an error."""
        with self._lock:
            self._open_locked(required)

    def _open_locked(self, required: bool) -> Any:
        if self._queue is not None or self._closed or time.monotonic() < self._next_try:
            return self._queue
        from conntrail.pipeline.spill import SpillQueue

        try:
            self._queue = SpillQueue(self.directory, self.max_bytes)
        except ConntrailError as exc:
            if required:
                raise
            self._next_try = time.monotonic() + self.RETRY_OPEN_S
            log.warning("spill %s not available yet (%s); retrying", self.directory, exc)
        return self._queue

    def _get_queue(self) -> Any:
        with self._lock:
            return self._open_locked(required=False)

    def put(self, record: bytes) -> bool:
        """Append; False when full (or not available)."""
        queue = self._get_queue()
        return bool(queue is not None and queue.put(record))

    def get(self) -> bytes | None:
        """The oldest uncommitted record."""
        queue = self._get_queue()
        record: bytes | None = queue.get() if queue is not None else None
        return record

    def commit(self) -> None:
        """The last record from get() was written."""
        queue = self._get_queue()
        if queue is not None:
            queue.commit()

    def __len__(self) -> int:
        queue = self._queue  # no open here: the exporters' threads call this too
        return len(queue) if queue is not None else 0

    def close(self) -> None:
        """Flush and release (for good: a closed spill never reopens)."""
        with self._lock:
            self._closed = True
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
            except Exception as exc:  # noqa: BLE001 - any failure is the check's answer
                results.append((item.settings.path, str(exc) or repr(exc), False))
    return results

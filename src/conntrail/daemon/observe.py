"""What the daemon counts, as metric samples (Prometheus, statsd) and as a status document.

Read from the exporters' threads without locks: every value is an int attribute that only
its owner thread increments, so a scrape sees a recent value, never a torn one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

from conntrail.daemon.service import PipelineRuntime, Service
from conntrail.metrics.model import Sample

_SOURCE_COUNTERS = (
    ("received", "conntrail_events_received_total", "conntrack messages received"),
    ("lost", "conntrail_events_lost_kernel_total",
     "events the kernel dropped (socket buffer overflow, ENOBUFS)"),
    ("enobufs", "conntrail_kernel_overflows_total", "ENOBUFS errors reported by the kernel"),
    ("resyncs", "conntrail_resyncs_total", "table dumps made to recover after losses"),
    ("decode_errors", "conntrail_decode_errors_total", "messages that did not decode"),
)
_SINK_COUNTERS = (
    ("written", "conntrail_sink_events_written_total", "events written by the sink"),
    ("dropped", "conntrail_sink_events_dropped_total",
     "events that will never be written (queue full, sink failing, shutdown deadline)"),
    ("errors", "conntrail_sink_errors_total", "failed encodes and writes (each retry counts)"),
    ("retries", "conntrail_sink_retries_total", "writes retried after a failure"),
    ("spilled", "conntrail_sink_events_spilled_total", "events queued on disk (spill)"),
    ("filtered", "conntrail_sink_events_filtered_total", "events the sink's filter left out"),
)


def samples(service: Service) -> Iterator[Sample]:
    """Every sample, for one scrape."""
    yield Sample("conntrail_up", "gauge", "1 while every pipeline runs",
                 1.0 if service.healthy() else 0.0)
    yield Sample("conntrail_start_time_seconds", "gauge", "daemon start, epoch seconds",
                 service.started_ns / 1e9)
    yield Sample("conntrail_reloads_total", "counter", "configuration reloads applied",
                 service.reloads)
    yield Sample("conntrail_reload_failures_total", "counter", "reloads rejected",
                 service.reload_failures)
    for runtime in service.runtimes:
        yield from _pipeline_samples(runtime)


def _pipeline_samples(runtime: PipelineRuntime) -> Iterator[Sample]:
    pipe = (("pipeline", runtime.name),)
    counters = runtime.pipeline.counters
    yield Sample("conntrail_pipeline_events_total", "counter", "events through the pipeline",
                 counters.events, pipe)
    yield Sample("conntrail_pipeline_events_filtered_total", "counter",
                 "events the pipeline's filters left out", counters.filtered, pipe)
    yield Sample("conntrail_pipeline_stage_errors_total", "counter",
                 "enricher or filter failures", counters.stage_errors, pipe)
    for source in runtime.sources:
        stats = source.stats()
        labels = (*pipe, ("netns", source.netns.name or "-"))
        for key, name, text in _SOURCE_COUNTERS:
            yield Sample(name, "counter", text, stats.get(key, 0), labels)
    for sink in runtime.pipeline.sinks:
        yield from _sink_samples(pipe, sink)
    if runtime.attribution is not None:
        for method, count in sorted(runtime.attribution.by_method.items()):
            yield Sample("conntrail_attribution_total", "counter",
                         "events by attribution method", count, (*pipe, ("method", method)))


def _sink_samples(pipe: tuple[tuple[str, str], ...], sink: Any) -> Iterator[Sample]:
    labels = (*pipe, ("sink", sink.name))
    for key, name, text in _SINK_COUNTERS:
        yield Sample(name, "counter", text, getattr(sink.counters, key), labels)
    yield Sample("conntrail_sink_queue_depth", "gauge", "batches waiting in memory",
                 sink.depth(), labels)
    yield Sample("conntrail_sink_spill_pending", "gauge", "batches waiting on disk",
                 sink.spilled_pending(), labels)
    yield Sample("conntrail_sink_failing", "gauge", "1 while writes fail and are retried",
                 1.0 if sink.failing.is_set() else 0.0, labels)


def status(service: Service) -> dict[str, Any]:
    """The SIGUSR1 snapshot: configuration, uptime, and every counter by pipeline."""
    return {
        "config": service.config.origin,
        "started": service.started_ns // 1_000_000_000,
        "uptime_s": round((time.time_ns() - service.started_ns) / 1e9, 3),
        "healthy": service.healthy(),
        "reloads": service.reloads,
        "pipelines": {runtime.name: _pipeline_status(runtime) for runtime in service.runtimes},
    }


def _pipeline_status(runtime: PipelineRuntime) -> dict[str, Any]:
    counters = runtime.pipeline.counters
    return {
        "events": counters.events, "filtered": counters.filtered,
        "stage_errors": counters.stage_errors,
        "sources": {source.name: source.stats() for source in runtime.sources},
        "sinks": {sink.name: {**dataclasses.asdict(sink.counters),
                              "queue_depth": sink.depth(),
                              "spill_pending": sink.spilled_pending(),
                              "failing": sink.failing.is_set()}
                  for sink in runtime.pipeline.sinks},
        "attribution": dict(runtime.attribution.by_method)
        if runtime.attribution is not None else None,
    }

"""The daemon: configured pipelines started in a safe order, kept running, reloaded, drained.

Start-up order (each step can fail cleanly, undoing the earlier ones):
1. kernel resources, as root, with no thread running: sysctls and activation rules per
   namespace, conntrack sockets (with their start-up dumps), attribution's sockets and eBPF;
2. the drop to `daemon.user` with only the capabilities still needed (privileges.py);
3. threads: attribution's reader, each sink's worker (files are opened now, as the user),
   one runner thread per pipeline, metrics; then READY=1 to systemd.
The main thread then only handles signals and the watchdog.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from conntrail.daemon.build import BuiltSink, build_sinks
from conntrail.daemon.config import Config, PipelineSettings
from conntrail.errors import ConfigError, ConntrailError
from conntrail.kernel.netns import NetnsRef, resolve
from conntrail.model import FlowEvent
from conntrail.pipeline.queued import QueuedSink
from conntrail.pipeline.runner import Pipeline
from conntrail.pipeline.stages import Filter
from conntrail.session import KernelSession, SessionOptions
from conntrail.sources.conntrack import ConntrackOptions, ConntrackSource

log = logging.getLogger(__name__)
STALL_S = 30.0  # a runner loop idle longer than this is stuck: no watchdog ping


@dataclass
class CountingAttributor:
    """The attribution enricher, counting results by method for the metrics."""

    attributor: Any
    by_method: Counter[str] = field(default_factory=Counter)

    def __call__(self, event: FlowEvent) -> FlowEvent:
        event = self.attributor(event)
        who = event.who
        self.by_method[who.method if who is not None else "none"] += 1
        return event


@dataclass
class PipelineRuntime:
    """One configured pipeline while it runs."""

    settings: PipelineSettings
    pipeline: Pipeline
    sinks: list[BuiltSink]
    sources: list[ConntrackSource] = field(default_factory=list)
    attribution: CountingAttributor | None = None
    thread: threading.Thread | None = None
    error: BaseException | None = None

    @property
    def name(self) -> str:
        """The pipeline's name in the configuration."""
        return self.settings.name


def compile_filters(texts: tuple[str, ...]) -> list[Filter]:
    """A pipeline's filter expressions as predicates (already validated by config.py)."""
    if not texts:
        return []
    from conntrail.filters.match import compile_filter

    return [compile_filter(text) for text in texts]


class Service:
    """Owns every runtime object of the daemon; one instance per process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.session: KernelSession | None = None
        self.runtimes: list[PipelineRuntime] = []
        self.stop_event = threading.Event()
        self.started_ns = time.time_ns()
        self.reloads = 0
        self.reload_failures = 0
        self._retiring: list[threading.Thread] = []

    # -- start-up, phase 1: kernel resources (root, one thread) -------------------------

    def open_kernel(self) -> None:
        """Prepare namespaces, open sources and attribution; start no thread."""
        self.session = KernelSession()
        for settings in self.config.pipelines:
            self.runtimes.append(self._open_pipeline(settings))

    def _open_pipeline(self, settings: PipelineSettings) -> PipelineRuntime:
        sinks = build_sinks(self.config, settings)
        pipeline = Pipeline([], [item.queued for item in sinks],
                            filters=compile_filters(settings.filters))
        runtime = PipelineRuntime(settings, pipeline, sinks)
        namespaces = [resolve(name) for name in settings.netns]
        attributor = self._attributor(settings, namespaces)
        if attributor is not None:
            runtime.attribution = CountingAttributor(attributor)
            pipeline.enrichers.append(runtime.attribution)
            attributor.open()
        options = ConntrackOptions(settings.source_events, dump=settings.source_dump,
                                   buffer=_buffer(settings), reliable=settings.reliable)
        for netns in namespaces:
            self._prepare(settings, netns, attributor)
            source = ConntrackSource(netns, options)
            source.start()
            runtime.sources.append(source)
            pipeline.sources.append(source)
        return runtime

    def _prepare(self, settings: PipelineSettings, netns: NetnsRef, attributor: Any) -> None:
        assert self.session is not None
        # Each namespace is in one pipeline: its options are that pipeline's.
        self.session.prepare(netns, SessionOptions(
            accounting=settings.accounting, install_rule=settings.install_rules,
            keep_rule=settings.keep_rules, attribution=settings.attribution.enabled
            and settings.attribution.identity_from == "labels",
            cgroup_levels=settings.attribution.cgroup_levels))
        if attributor is not None:
            attributor.add_namespace(netns, labelled=netns in self.session.labelled,
                                     rules=settings.install_rules)

    @staticmethod
    def _attributor(settings: PipelineSettings, namespaces: list[NetnsRef]) -> Any:
        if not settings.attribution.enabled:
            return None
        from conntrail.enrichers.attribution import AttributionOptions, Attributor
        from conntrail.kernel.localview import LocalityCache, read_named

        options = settings.attribution
        return Attributor(LocalityCache(read_named), {ns.name: ns for ns in namespaces},
                          AttributionOptions(sockdiag=options.socket_lookup, ebpf=options.ebpf,
                                             identity=options.identity_from))

    # -- start-up, phase 3: threads --------------------------------------------------

    def start_threads(self) -> None:
        """Attribution readers, sink workers (opening files), one runner per pipeline."""
        for runtime in self.runtimes:
            if runtime.attribution is not None:
                attributor = runtime.attribution.attributor
                attributor.start_reader()
                if attributor.bpf is None and attributor.sockets is not None:
                    # As in watch: without eBPF a pid is found only while its socket exists,
                    # so events are handled at once rather than batched for 5 ms.
                    runtime.pipeline.idle_sleep = 0.0
            for sink in runtime.pipeline.sinks:
                sink.start()
        for runtime in self.runtimes:
            runtime.thread = threading.Thread(target=self._run_pipeline, args=(runtime,),
                                              name=f"pipeline:{runtime.name}", daemon=True)
            runtime.thread.start()

    def _run_pipeline(self, runtime: PipelineRuntime) -> None:
        try:
            runtime.pipeline.run(self.stop_event, started=True)
            if not self.stop_event.is_set():  # it returns early only when every sink failed
                raise ConntrailError(f"pipeline {runtime.name}: every sink failed")
        except BaseException as exc:  # the main thread sees it, logs it, and stops us
            runtime.error = exc
            log.exception("pipeline %s stopped on an error", runtime.name)
            self.stop_event.set()

    # -- while running --------------------------------------------------------------

    def healthy(self) -> bool:
        """Every runner thread alive and its loop turning (for the systemd watchdog)."""
        now = time.monotonic()
        return all(runtime.thread is not None and runtime.thread.is_alive()
                   and now - runtime.pipeline.loop_at < STALL_S
                   and all(sink.alive() for sink in runtime.pipeline.sinks)
                   for runtime in self.runtimes)

    def failed(self) -> BaseException | None:
        """The error a runner stopped on, if any."""
        return next((r.error for r in self.runtimes if r.error is not None), None)

    def reload(self, new: Config) -> None:
        """Apply a new configuration's filters and sinks; refuse what needs a restart."""
        if new.source_settings() != self.config.source_settings():
            raise ConfigError(new.origin, "namespaces, event kinds, buffers, rules, "
                              "attribution, [daemon] and [metrics] are fixed at start: "
                              "restart the daemon to change them")
        self._wait_routes_taken()
        plans = [(runtime, settings, *self._plan_route(new, runtime, settings))
                 for runtime, settings in zip(self.runtimes, new.pipelines, strict=True)]
        started: list[QueuedSink] = []
        try:
            for _runtime, _settings, _sinks, fresh in plans:
                for item in fresh:  # opened before any swap: a sink that cannot open
                    item.queued.start()  # rejects the reload, the old ones keep running
                    started.append(item.queued)
        except BaseException:
            self._retire(started)
            raise
        for runtime, settings, sinks, _fresh in plans:
            kept = [item.queued for item in sinks]
            runtime.pipeline.replace_route(compile_filters(settings.filters), kept,
                                           self._retire_all_but(kept))
            runtime.settings, runtime.sinks = settings, sinks
        self.config = new
        self.reloads += 1

    def _wait_routes_taken(self, timeout: float = 5.0) -> None:
        """A reload waits until the runners took the previous one's sinks: planning against
        a route not yet in place would orphan its sinks."""
        deadline = time.monotonic() + timeout
        while any(r.pipeline.route_pending() for r in self.runtimes):
            if time.monotonic() >= deadline:
                raise ConfigError("reload", "the previous reload is not applied yet (a "
                                  "pipeline is busy); try again")
            time.sleep(0.05)

    @staticmethod
    def _plan_route(new: Config, runtime: PipelineRuntime, settings: PipelineSettings
                    ) -> tuple[list[BuiltSink], list[BuiltSink]]:
        """Unchanged sinks are kept as they are (no reopen, no lost queue); the others are
        built now, so a bad sink table rejects the whole reload before anything changes."""
        sinks: list[BuiltSink] = []
        fresh: list[BuiltSink] = []
        built = {item.settings.name: item for item in build_sinks(new, settings)}
        for sink in settings.sinks:
            same = next((item for item in runtime.sinks if item.settings == sink
                         and (sink.is_history or runtime.settings.events == settings.events)),
                        None)
            if same is None and (sink.is_history or _history_named(runtime, sink.name)):
                # A second writer on one store while the first drains could reopen flows
                # the new one closed: history stores change at a restart only.
                raise ConfigError(sink.path, "history stores cannot change on reload; "
                                  "restart the daemon")
            if same is None:
                same = built[sink.name]
                fresh.append(same)
            sinks.append(same)
        removed = [item for item in runtime.sinks if item.settings.is_history
                   and item not in sinks]
        if removed:
            raise ConfigError(removed[0].settings.path, "history stores cannot change on "
                              "reload; restart the daemon")
        return sinks, fresh

    def _retire_all_but(self, kept: list[QueuedSink]) -> Callable[[list[QueuedSink]], None]:
        return lambda old: self._retire([sink for sink in old if sink not in kept])

    def _retire(self, old: list[QueuedSink]) -> None:
        """Drain replaced sinks in the background (called on the runner's thread)."""
        if not old:
            return
        deadline = time.monotonic() + self.config.daemon.drain_timeout_s

        def drain() -> None:
            for sink in old:
                sink.stopping.set()
                sink.stop(deadline)

        thread = threading.Thread(target=drain, name="retire-sinks", daemon=True)
        thread.start()
        self._retiring.append(thread)

    def request_reopen(self) -> None:
        """SIGHUP: every file sink reopens its path (after an external logrotate)."""
        for runtime in self.runtimes:
            for sink in runtime.pipeline.sinks:
                sink.request_reopen()

    # -- shutdown -------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop reading, drain every sink until the deadline, release the kernel."""
        self.stop_event.set()
        deadline = time.monotonic() + self.config.daemon.drain_timeout_s
        for runtime in self.runtimes:
            # The runner's last read hands what the kernel queued to the sinks, waiting for
            # room (block policy) until the deadline; past it, blocked hand-offs give up.
            if runtime.thread is not None:
                runtime.thread.join(max(0.0, deadline - time.monotonic()))
            runtime.pipeline.request_stop()
            if runtime.thread is not None:
                runtime.thread.join(1.0)
        for runtime in self.runtimes:
            self._retire(runtime.pipeline.drop_pending_route())  # a reload's, never taken
            try:
                runtime.pipeline.shutdown(max(0.1, deadline - time.monotonic()))
            except Exception:  # the others must still be drained and the kernel released
                log.exception("pipeline %s: shutdown failed", runtime.name)
        for thread in self._retiring:
            thread.join(max(0.0, deadline - time.monotonic()))
        for runtime in self.runtimes:
            if runtime.attribution is not None:
                runtime.attribution.attributor.stop()
        if self.session is not None:
            self.session.close()


def _history_named(runtime: PipelineRuntime, name: str) -> bool:
    return any(item.settings.name == name and item.settings.is_history
               for item in runtime.sinks)


def _buffer(settings: PipelineSettings) -> Any:
    from conntrail.kernel.socket import BufferPolicy

    return BufferPolicy(settings.buffer, settings.buffer_max)

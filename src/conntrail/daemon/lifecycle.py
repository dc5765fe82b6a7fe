"""`conntrail run`: start the service, then serve signals until told to stop.

Signals only queue a word here; the main thread acts on it between watchdog ticks:
- SIGTERM, SIGINT: stop reading, drain queues until `daemon.drain_timeout`, close sinks in
  order, remove our rules;
- SIGHUP: reopen output files (for an external logrotate), then reload the configuration
  file: an invalid one is logged and rejected, the running one goes on;
- SIGUSR1: write STATE_DIR/status.json (and log a summary line).
"""

from __future__ import annotations

import logging
import queue
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from conntrail.daemon import config as config_module
from conntrail.daemon import observe
from conntrail.daemon.config import Config
from conntrail.daemon.notify import Notifier
from conntrail.daemon.service import Service
from conntrail.errors import ConntrailError

log = logging.getLogger(__name__)
_SIGNALS = {signal.SIGTERM: "stop", signal.SIGINT: "stop", signal.SIGHUP: "reload",
            signal.SIGUSR1: "status"}


class Daemon:
    """The process: a Service, its exporters, and the signal loop."""

    def __init__(self, config: Config, path: Path | None,
                 notifier: Notifier | None = None) -> None:
        self.path = path
        self.service = Service(config)
        self.notifier = notifier or Notifier()
        self.exporters: list[Any] = []
        # SimpleQueue: put() is safe in a signal handler (Queue's lock is not reentrant).
        self._signals: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals.put(_SIGNALS[signal.Signals(signum)])
        if _SIGNALS[signal.Signals(signum)] == "stop":
            self.service.stop_event.set()  # the runners stop at once; the drain follows

    def run(self) -> int:
        """Start, serve signals, shut down; the process exit status."""
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in _SIGNALS}
        try:
            self._start()
            return self._serve()
        finally:
            self.notifier.stopping()
            self._shutdown()
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    def _start(self) -> None:
        config = self.service.config
        identity = _identity(config)
        from conntrail.kernel.privileges import apply_priority

        apply_priority(config.daemon.nice, config.daemon.realtime, "daemon.nice/realtime")
        self.notifier.open()
        self.service.open_kernel()
        if identity is not None:
            _drop(config, identity)
        self.service.start_threads()
        self._start_exporters(config)
        names = ", ".join(runtime.name for runtime in self.service.runtimes)
        log.info("conntrail: running pipelines %s (config: %s)", names, config.origin)
        self.notifier.ready(f"running {len(self.service.runtimes)} pipeline(s): {names}")

    def _start_exporters(self, config: Config) -> None:
        from conntrail.metrics.server import MetricsServer, parse_listen
        from conntrail.metrics.statsd import StatsdPusher

        def collect() -> list[Any]:
            return list(observe.samples(self.service))

        metrics = config.metrics
        if metrics.listen is not None:
            server = MetricsServer(parse_listen(metrics.listen, "metrics.listen"), collect)
            server.start()
            self.exporters.append(server)
        if metrics.statsd is not None:
            pusher = StatsdPusher(parse_listen(metrics.statsd, "metrics.statsd"), collect,
                                  metrics.statsd_prefix, metrics.statsd_interval_s,
                                  metrics.statsd_tags)
            pusher.start()
            self.exporters.append(pusher)

    def _serve(self) -> int:
        tick = 1.0
        if self.notifier.watchdog_s:
            tick = min(tick, self.notifier.watchdog_s / 3)
        while True:
            try:
                word = self._signals.get(timeout=tick)
            except queue.Empty:
                word = ""
            if word == "stop" or self.service.stop_event.is_set():
                break
            if word == "reload":
                self._reload()
            elif word == "status":
                self._write_status()
            if self.service.healthy():
                self.notifier.watchdog()
        error = self.service.failed()
        return 1 if error is not None else 0

    def _reload(self) -> None:
        self.notifier.reloading()
        self.service.request_reopen()
        try:
            new = config_module.load(self.path)
            self.service.reload(new)
        except ConntrailError as exc:
            self.service.reload_failures += 1
            log.error("reload rejected, the running configuration goes on: %s", exc)
            self.notifier.send(READY=1, STATUS=f"reload rejected: {exc}")
            return
        except Exception:  # a bug must not take down a daemon that runs fine
            self.service.reload_failures += 1
            log.exception("reload failed; the running configuration goes on")
            self.notifier.send(READY=1, STATUS="reload failed (see log)")
            return
        log.info("configuration reloaded from %s", new.origin)
        self.notifier.send(READY=1, STATUS="configuration reloaded")

    def _write_status(self) -> None:
        document = observe.status(self.service)
        path = self.service.config.daemon.state_dir / "status.json"
        from conntrail.inventory.persist import write_atomically

        try:
            write_atomically(path, orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
        except OSError as exc:
            log.error("status: cannot write %s: %s", path, exc)
        events = sum(p["events"] for p in document["pipelines"].values())
        log.warning("status: %d events since start, healthy=%s, written to %s", events,
                    document["healthy"], path)

    def _shutdown(self) -> None:
        for exporter in self.exporters:
            try:
                exporter.stop()
            except Exception:  # the drain matters more
                log.exception("stopping an exporter failed")
        self.service.shutdown()
        self.notifier.close()


def _identity(config: Config) -> Any:
    if config.daemon.user is None:
        return None
    from conntrail.kernel.privileges import resolve

    return resolve(config.daemon.user, config.daemon.group)


def needed_caps(config: Config) -> Any:
    """The capabilities kept after the drop, each for a reason (see privileges.Cap)."""
    from conntrail.kernel.privileges import Cap

    caps = {Cap.NET_ADMIN}  # conntrack netlink (resync dumps), our nft tables, sysctls
    pipelines = config.pipelines
    if any(name for pipeline in pipelines for name in pipeline.netns):
        caps.add(Cap.SYS_ADMIN)  # setns: resyncs, locality refresh, rule removal there
    if any(pipeline.attribution.enabled for pipeline in pipelines):
        caps |= {Cap.SYS_PTRACE, Cap.DAC_READ_SEARCH}  # /proc of others, cgroup handles
    return frozenset(caps)


def _drop(config: Config, identity: Any) -> None:
    from conntrail.kernel.privileges import drop_to, give_tree

    for directory in (config.daemon.state_dir, config.daemon.log_dir):
        give_tree(directory, identity)
    caps = needed_caps(config)
    drop_to(identity, caps)
    log.info("running as %s (uid %d) with %s", identity.user, identity.uid,
             ", ".join(f"CAP_{cap.name}" for cap in sorted(caps)))

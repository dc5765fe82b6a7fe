"""The daemon's TOML configuration → frozen settings, validated before anything starts.

```toml
[daemon]            # user, group, state_dir, log_dir, drain_timeout, nice, realtime
[metrics]           # listen = "127.0.0.1:9477", statsd = "127.0.0.1:8125", …
[pipelines.NAME]    # netns, events, filter, dump, buffer, rules, accounting
[pipelines.NAME.attribution]   # enabled, ebpf, socket_lookup, identity_from, cgroup_levels
[pipelines.NAME.sinks.SINK]    # type = file | syslog | sqlite | postgresql | stdout, plus
                               # queue, when_full, spill_max, retry, filter, events, and the
                               # type's own keys (read by the sink's from_config)
```
With no file, `DEFAULT_CONFIG` applies: conntrack NEW+DESTROY with attribution, to a JSON
lines file under /var/log/conntrail/ and the SQLite history under /var/lib/conntrail/.
Sink tables are kept raw here and read by the sink's own `from_config` when built (see
daemon/build.py), which is also when their keys are checked.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conntrail.api import parse_kinds
from conntrail.config import Table
from conntrail.errors import ConfigError
from conntrail.model import EventKind
from conntrail.pipeline.queued import FullPolicy

DEFAULT_PATH = Path("/etc/conntrail/conntrail.toml")
DEFAULT_METRICS = "127.0.0.1:9477"
HISTORY_TYPES = ("sqlite", "postgresql")
SINK_TYPES = ("file", "syslog", "stdout", *HISTORY_TYPES)
DEFAULT_CONFIG = """\
[pipelines.default]
events = ["new", "destroy"]

[pipelines.default.sinks.flows]
type = "file"
format = "json"

[pipelines.default.sinks.history]
type = "sqlite"
"""


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """Process-wide settings."""

    user: str | None = None  # drop to this user once kernel resources are open
    group: str | None = None  # default: the user's primary group
    state_dir: Path = Path("/var/lib/conntrail")
    log_dir: Path = Path("/var/log/conntrail")
    drain_timeout_s: float = 10.0  # SIGTERM: queued events get this long to be written
    nice: int | None = None
    realtime: int | None = None


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """Where metrics go (None: off)."""

    listen: str | None = DEFAULT_METRICS
    statsd: str | None = None
    statsd_prefix: str = "conntrail"
    statsd_interval_s: float = 10.0
    statsd_tags: bool = False


@dataclass(frozen=True, slots=True)
class AttributionSettings:
    """The attribution enricher's layers, as `watch` offers them."""

    enabled: bool = True
    ebpf: str = "auto"
    socket_lookup: bool = True
    identity_from: str = "labels"
    cgroup_levels: int = 8


@dataclass(frozen=True, slots=True)
class SinkSettings:
    """One sink: the keys the daemon handles; `table` holds the rest for the sink."""

    name: str
    type: str
    path: str  # its key path, e.g. "pipelines.default.sinks.flows"
    data: dict[str, Any]  # the raw table (the sink's own keys are read at build time)
    queue: int = 1024
    when_full: FullPolicy = FullPolicy.BLOCK
    spill_max: int = 1 << 30
    retry: bool = True
    filters: tuple[str, ...] = ()
    events: frozenset[EventKind] | None = None  # None: the pipeline's

    @property
    def is_history(self) -> bool:
        """A history store: receives every event kind the flow lifecycle needs."""
        return self.type in HISTORY_TYPES


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    """One stack: namespaces → conntrack source → attribution → filters → sinks."""

    name: str
    netns: tuple[str, ...]
    events: frozenset[EventKind]
    filters: tuple[str, ...]
    dump: bool
    buffer: int
    buffer_max: int
    reliable: bool
    install_rules: bool
    keep_rules: bool
    accounting: bool
    attribution: AttributionSettings
    sinks: tuple[SinkSettings, ...]

    @property
    def source_events(self) -> frozenset[EventKind]:
        """What the source subscribes to: the pipeline's kinds, the sinks' own, and NEW and
        DESTROY when a history store needs the flow lifecycle."""
        kinds = set(self.events)
        for sink in self.sinks:
            kinds |= sink.events or set()
            if sink.is_history:
                kinds |= {EventKind.NEW, EventKind.UPDATE, EventKind.DESTROY}
        kinds.discard(EventKind.DUMP)
        return frozenset(kinds)

    @property
    def source_dump(self) -> bool:
        """Dump the table at start: asked for, or needed by a history store."""
        return self.dump or any(sink.is_history for sink in self.sinks)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration."""

    origin: str  # the file it came from, or "built-in defaults"
    daemon: DaemonSettings
    metrics: MetricsSettings
    pipelines: tuple[PipelineSettings, ...]

    def source_settings(self) -> tuple[object, ...]:
        """What only a restart can change (privileges are dropped after these are opened)."""
        return (self.daemon, self.metrics,
                tuple((p.name, p.netns, p.source_events, p.source_dump, p.buffer,
                       p.buffer_max, p.reliable, p.install_rules, p.keep_rules, p.accounting,
                       p.attribution) for p in self.pipelines))


def load(path: Path | None) -> Config:
    """Read and validate `path` (None: the built-in defaults)."""
    if path is None:
        return parse(DEFAULT_CONFIG, "built-in defaults")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from exc
    return parse(text, str(path))


def parse(text: str, origin: str) -> Config:
    """Validate a configuration text; errors name the key path (or the TOML line)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(origin, f"not valid TOML: {exc}") from None
    root = Table(data)
    daemon = _daemon(root.table("daemon"))
    metrics = _metrics(root.table("metrics"))
    pipelines = tuple(_pipeline(name, table) for name, table in root.tables("pipelines").items())
    root.done()
    if not pipelines:
        raise ConfigError("pipelines", "no pipeline configured (add [pipelines.NAME])")
    _check_namespaces(pipelines)
    return Config(origin, daemon, metrics, pipelines)


def _daemon(table: Table) -> DaemonSettings:
    settings = DaemonSettings(
        user=table.text("user", None),
        group=table.text("group", None),
        state_dir=Path(table.text("state_dir", "/var/lib/conntrail")),
        log_dir=Path(table.text("log_dir", "/var/log/conntrail")),
        drain_timeout_s=table.duration("drain_timeout", 10.0),
        nice=table.integer("nice", None, minimum=-20, maximum=19),
        realtime=table.integer("realtime", None, minimum=1, maximum=99))
    table.done()
    if settings.group is not None and settings.user is None:
        raise table.error("group", "only applies with daemon.user")
    return settings


def _metrics(table: Table) -> MetricsSettings:
    settings = MetricsSettings(
        listen=table.text("listen", DEFAULT_METRICS) or None,
        statsd=table.text("statsd", None) or None,
        statsd_prefix=table.text("statsd_prefix", "conntrail"),
        statsd_interval_s=table.duration("statsd_interval", 10.0),
        statsd_tags=table.boolean("statsd_tags", False))
    from conntrail.metrics.server import parse_listen

    for key in ("listen", "statsd"):
        value = getattr(settings, key)
        if value is not None:
            parse_listen(value, table.key_path(key))
    table.done()
    if settings.statsd_interval_s <= 0:
        raise table.error("statsd_interval", "must be positive")
    return settings


def _pipeline(name: str, table: Table) -> PipelineSettings:
    events = _kinds(table, "events", ["new", "destroy"])
    assert events is not None
    buffer = table.size("buffer", "32M", maximum=1 << 30)
    settings = PipelineSettings(
        name=name,
        netns=tuple(table.texts("netns", [""])) or ("",),
        events=events,
        filters=tuple(_filters(table)),
        dump=table.boolean("dump", False),
        buffer=buffer,
        buffer_max=max(buffer, table.size("buffer_max", "128M", maximum=1 << 30)),
        reliable=table.boolean("reliable", False),
        install_rules=table.boolean("rules", True),
        keep_rules=table.boolean("keep_rules", False),
        accounting=table.boolean("accounting", True),
        attribution=_attribution(table.table("attribution")),
        sinks=tuple(_sink(sink_name, sink) for sink_name, sink in table.tables("sinks").items()))
    table.done()
    if not settings.sinks:
        raise table.error("sinks", "no sink configured (add [pipelines."
                          f"{name}.sinks.NAME] with a type)")
    return settings


def _kinds(table: Table, key: str, default: list[str] | None) -> frozenset[EventKind] | None:
    names = table.texts(key, default)
    if names is None:
        return None
    try:
        return frozenset(parse_kinds(names))
    except ConfigError as exc:
        raise table.error(key, exc.reason) from None


def _filters(table: Table) -> list[str]:
    """Compile now: a typo in a filter is a config error, not a surprise at the first event."""
    from conntrail.filters.match import compile_filter

    texts: list[str] = table.texts("filter", [])
    for index, text in enumerate(texts):
        try:
            compile_filter(text)
        except ConfigError as exc:
            where = table.key_path("filter") + (f"[{index}]" if len(texts) > 1 else "")
            raise ConfigError(where, str(exc)) from None
    return texts


def _attribution(table: Table) -> AttributionSettings:
    settings = AttributionSettings(
        enabled=table.boolean("enabled", True),
        ebpf=table.text("ebpf", "auto", choices=("auto", "on", "off")),
        socket_lookup=table.boolean("socket_lookup", True),
        identity_from=table.text("identity_from", "labels", choices=("labels", "nflog")),
        cgroup_levels=table.integer("cgroup_levels", 8, minimum=0, maximum=255))
    table.done()
    return settings


def _sink(name: str, table: Table) -> SinkSettings:
    kind = table.text("type", choices=SINK_TYPES)
    policy_name = table.text("when_full", "block", choices=[p.value for p in FullPolicy])
    settings = SinkSettings(
        name=name, type=kind, path=table.path, data=table.data,
        queue=table.integer("queue", 1024, minimum=1, maximum=1 << 20),
        when_full=FullPolicy(policy_name),
        spill_max=table.size("spill_max", "1G"),
        retry=table.boolean("retry", True),
        filters=tuple(_filters(table)),
        events=_kinds(table, "events", None))
    if kind in HISTORY_TYPES and settings.when_full is FullPolicy.SPILL:
        # Its lifecycle reconciles against the store at start: batches still in a spill
        # would be replayed after that, and leave flows open forever (PostgreSQL spools
        # durably on its own while the database is away).
        raise table.error("when_full", "a history store cannot spill; use block (the "
                          "default) or drop_oldest")
    if kind in HISTORY_TYPES and (settings.events is not None or settings.filters):
        key = "events" if settings.events is not None else "filter"
        raise table.error(key, "a history store records every flow's whole lifecycle; "
                          "filter in the pipeline instead")
    # The remaining keys belong to the sink type; build.py checks them with its from_config.
    return settings


def _check_namespaces(pipelines: tuple[PipelineSettings, ...]) -> None:
    """One listener per namespace: two pipelines on one namespace would install and remove
    each other's rules; per-sink filters and events serve that need instead."""
    owner: dict[str, str] = {}
    for pipeline in pipelines:
        for netns in pipeline.netns:
            if netns in owner:
                shown = netns or "(the daemon's own)"
                raise ConfigError(f"pipelines.{pipeline.name}.netns",
                                  f"namespace {shown} is already in pipelines.{owner[netns]}")
            owner[netns] = pipeline.name

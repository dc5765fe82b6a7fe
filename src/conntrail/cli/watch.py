"""`conntrail watch`: stream conntrack events to stdout, as text lines or ECS JSON."""

from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import dataclass, replace
from typing import Any

from conntrail.api import parse_kinds
from conntrail.cli.common import (
    add_kernel_options,
    apply_priority,
    buffer_policy,
    install_signals,
    parse_protocols,
    parse_size,
    restore_signals,
    silence_stdout,
)
from conntrail.errors import ConfigError
from conntrail.formats.fields import ALIASES, FIELDS
from conntrail.formats.text import DEFAULT_TEMPLATE
from conntrail.history.store import HistoryStore
from conntrail.kernel.netns import NetnsRef, resolve
from conntrail.model import EventKind, FlowEvent, Record
from conntrail.pipeline import registry
from conntrail.pipeline.runner import Pipeline, QueuedSink
from conntrail.pipeline.stages import Filter, Formatter, Source
from conntrail.session import KernelSession, SessionOptions
from conntrail.sinks.stream import StreamSink
from conntrail.sources.conntrack import ConntrackOptions, ConntrackSource

DESCRIPTION = """\
Stream the connections the kernel tracks, as they are created, change and end.

Default line (conntrack-logger style), one per event:
  {ts}: {family_proto} {orig} :: {event}{details}
  2026-11-22T01:55:21.123456Z: ipv4/tcp 198.18.1.2/40000 > 198.18.2.2/80 :: new SYN_SENT

In a namespace where no rule uses conntrack, the kernel tracks nothing: watch then installs
a one-rule table `inet conntrail` and removes it on exit (--keep-rules, --no-rules).
"""


def _fields_epilog() -> str:
    lines = ["template fields for --format:"]
    lines += [f"  {{{name}}}  {desc}" for name, (_get, desc) in FIELDS.items()]
    lines.append("  aliases: " + ", ".join(f"{{{a}}}={{{b}}}" for a, b in ALIASES.items()))
    lines.append("--format-ts: iso (default), epoch, epoch-ms, epoch-ns, or a strftime "
                 "pattern (UTC)")
    lines.append("--filter: see `conntrail watch --help-filter`")
    return "\n".join(lines)


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register `watch` and its options."""
    parser = subparsers.add_parser("watch", parents=parents,
                                   help="stream conntrack events to stdout",
                                   description=DESCRIPTION, epilog=_fields_epilog(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-p", "--proto", action="append", default=[], metavar="PROTO",
                        help="only these protocols (name or number; repeat or comma-separate)")
    parser.add_argument("-e", "--events", default="new,update,destroy", metavar="KINDS",
                        help="event kinds, comma-separated (default new,update,destroy)")
    parser.add_argument("-f", "--filter", action="append", default=[], metavar="EXPR",
                        help="filter expression (repeat: all must match)")
    parser.add_argument("--help-filter", action="store_true",
                        help="describe the filter language and exit")
    parser.add_argument("--json", action="store_true", help="one ECS JSON object per line")
    parser.add_argument("--format", default=DEFAULT_TEMPLATE, metavar="TEMPLATE",
                        help="text line template (fields below)")
    parser.add_argument("--format-ts", default="iso", metavar="TS",
                        help="how {ts} is written (below)")
    dump = parser.add_mutually_exclusive_group()
    dump.add_argument("--dump", action="store_true",
                      help="first print the flows that already exist (event 'dump')")
    dump.add_argument("--no-dump", dest="dump", action="store_false",
                      help="do not print existing flows (default)")
    parser.add_argument("-c", "--count", type=int, metavar="N",
                        help="exit after printing N events")
    history = parser.add_argument_group("history (see `conntrail query` and `conntrail who`)")
    history.add_argument("--store", nargs="?", const="", default=None, metavar="URL",
                         help="also record the flows: an SQLite file or postgresql://… DSN "
                              "(no URL: $CONNTRAIL_STORE, else "
                              "/var/lib/conntrail/history.sqlite)")
    history.add_argument("-q", "--quiet", action="store_true",
                         help="print no events (with --store: only record)")
    history.add_argument("--retention", metavar="DURATION",
                         help="SQLite store: delete flows that ended longer ago (e.g. 90d)")
    history.add_argument("--max-size", metavar="SIZE",
                         help="SQLite store: delete the oldest flows beyond SIZE (e.g. 20G)")
    who = parser.add_argument_group("attribution (who opened each flow)")
    who.add_argument("--no-attribution", dest="attribution", action="store_false",
                     help="do not label new local flows with their socket's uid, gid and "
                          "cgroup, nor look processes up")
    who.add_argument("--cgroup-levels", type=int, default=8, metavar="N",
                     help="cgroup v2 levels labelled, deepest wins (default 8, max 255)")
    who.add_argument("--identity-from", choices=("labels", "nflog"), default="labels",
                     help="uid/gid of new local flows from conntrack labels (default; NFLOG "
                          "is used where labels cannot be) or from NFLOG")
    who.add_argument("--no-socket-lookup", dest="socket_lookup", action="store_false",
                     help="no sock_diag lookup per new local flow")
    who.add_argument("--ebpf", choices=("auto", "on", "off"), default="auto",
                     help="the eBPF tier (exact pid and command line even for processes "
                          "gone in a millisecond): auto (default) when kernel and tools "
                          "allow, on (fail without it), off")
    parser.add_argument("--reliable", action="store_true",
                        help="ask for reliable delivery (NETLINK_BROADCAST_ERROR)")
    parser.add_argument("--nice", type=int, metavar="N",
                        help="scheduling niceness, e.g. -10, so load does not starve us")
    parser.add_argument("--realtime", type=int, metavar="PRIO",
                        help="SCHED_FIFO priority 1-99 (strongest protection against loss)")
    add_kernel_options(parser)
    parser.set_defaults(run=run)


@dataclass(frozen=True)
class WatchPlan:
    """Everything `watch` will do, validated before anything touches the kernel."""

    kinds: frozenset[EventKind]
    filters: list[Filter]
    formatter: Formatter
    options: ConntrackOptions
    session: SessionOptions
    store: str | None = None  # None: no history; "": the default store
    retention_s: float | None = None
    max_bytes: int | None = None


def plan(args: argparse.Namespace) -> WatchPlan:
    """Validate every option into a WatchPlan; errors name the option."""
    kinds = parse_kinds(args.events.split(","))
    filters: list[Filter] = []
    protocols = parse_protocols(args.proto)
    if protocols:
        filters.append(lambda event: event.flow.orig.proto in protocols)
    if args.filter:
        from conntrail.filters.match import compile_filter

        filters.extend(compile_filter(text) for text in args.filter)
    formatter: Formatter = (registry.load("format", "json", "--json")() if args.json else
                            registry.load("format", "text", "--format")(args.format,
                                                                        args.format_ts))
    options = ConntrackOptions(kinds, dump=args.dump, buffer=buffer_policy(args),
                               reliable=args.reliable)
    if not 0 <= args.cgroup_levels <= 255:
        raise ConfigError("--cgroup-levels", "must be within 0-255")
    session = SessionOptions(accounting=not args.no_accounting, install_rule=not args.no_rules,
                             keep_rule=args.keep_rules,
                             attribution=args.attribution and args.identity_from == "labels",
                             cgroup_levels=args.cgroup_levels)
    if args.count is not None and args.count <= 0:
        raise ConfigError("--count", "must be a positive number")
    if args.store is None:
        if args.retention or args.max_size:
            raise ConfigError("--retention/--max-size", "only apply with --store")
        return WatchPlan(kinds, filters, formatter, options, session)
    return _with_store(args, WatchPlan(kinds, filters, formatter, options, session))


def _with_store(args: argparse.Namespace, base: WatchPlan) -> WatchPlan:
    """History needs every flow's NEW and DESTROY and the table at start: listen to them
    all, and show on stdout only what was asked for."""
    from conntrail.cli.timeargs import parse_duration

    retention = parse_duration(args.retention, "--retention") / 1e9 if args.retention else None
    max_bytes = parse_size(args.max_size, "--max-size", 1 << 50) if args.max_size else None
    shown = base.kinds | ({EventKind.DUMP} if args.dump else frozenset())
    options = replace(base.options, kinds=base.kinds | {EventKind.NEW, EventKind.DESTROY},
                      dump=True)
    # Filters choose what is printed, not what is recorded: a history missing the DESTROYs a
    # filter dropped would keep those flows open, and answer `who` with them, forever.
    return replace(base, formatter=_only_shown(base.formatter, shown, base.filters),
                   filters=[], options=options, store=args.store, retention_s=retention,
                   max_bytes=max_bytes)


def _only_shown(formatter: Formatter, kinds: frozenset[EventKind],
                filters: list[Filter]) -> Formatter:
    """A formatter printing only events of these kinds that pass the filters (and every
    notice)."""
    def only(record: Record) -> bytes:
        if type(record) is FlowEvent and (record.kind not in kinds
                                          or not all(keep(record) for keep in filters)):
            return b""
        return formatter(record)

    return only


def _print_filter_help() -> int:
    from conntrail.filters import match

    print(match.__doc__)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run `conntrail watch`."""
    if args.help_filter:
        return _print_filter_help()
    watch_plan = plan(args)
    apply_priority(args.nice, args.realtime)
    stop = threading.Event()
    namespaces = [resolve(name) for name in args.netns or [""]]
    session = KernelSession(watch_plan.session)
    sources: list[Source] = []
    sink = QueuedSink(StreamSink("stdout", sys.stdout.buffer, watch_plan.formatter))
    sinks = [] if args.quiet else [sink]
    if watch_plan.store is not None:
        sinks.append(_history_sink(watch_plan, [ns.name for ns in namespaces]))
    attributor = _attributor(args, namespaces)
    pipeline = Pipeline(sources, sinks, filters=watch_plan.filters,
                        enrichers=[attributor] if attributor is not None else [])
    previous = install_signals(stop, pipeline.request_stop)
    try:
        if attributor is not None:
            attributor.start()
            if attributor.bpf is None and attributor.sockets is not None:
                # Without eBPF a pid is found only while its socket exists: waiting 5 ms to
                # batch events lets short-lived sockets go (measured: pids found for 61-90 %
                # of events handled within 1 ms, almost none after 2-5 ms).
                pipeline.idle_sleep = 0.0
        for netns in namespaces:
            session.prepare(netns)
            if attributor is not None:
                attributor.add_namespace(netns, labelled=netns in session.labelled,
                                         rules=not args.no_rules)
            source = ConntrackSource(netns, watch_plan.options)
            source.start()
            sources.append(source)
        pipeline.run(stop, args.count)
    finally:
        stats = [source.stats() for source in sources]
        try:
            pipeline.shutdown()
        finally:
            if attributor is not None:
                attributor.stop()
            session.close()
            restore_signals(previous)
    if sink.failed.is_set():
        silence_stdout()
    _print_summary(pipeline, stats, sinks)
    return 0


def _attributor(args: argparse.Namespace, namespaces: list[NetnsRef]) -> Any:
    """The attribution stage, unless turned off."""
    if not args.attribution:
        return None
    from conntrail.enrichers.attribution import AttributionOptions, Attributor
    from conntrail.kernel.localview import LocalityCache, read_named

    return Attributor(LocalityCache(read_named), {ns.name: ns for ns in namespaces},
                      AttributionOptions(sockdiag=args.socket_lookup, ebpf=args.ebpf,
                                         identity=args.identity_from))


def _history_sink(watch_plan: WatchPlan, netns: list[str]) -> QueuedSink:
    """The history sink, its store opened now: an unreachable store stops us before we
    touch the kernel."""
    from conntrail.history.store import default_store, is_postgres, open_store
    from conntrail.sinks.history import HistorySink

    url = watch_plan.store or default_store()
    store = open_store(url, "--store", create=True, retention_s=watch_plan.retention_s,
                       max_bytes=watch_plan.max_bytes)
    writer = _spooling_writer(store, url) if is_postgres(url) else None
    return QueuedSink(HistorySink(store.url, netns, store=store, writer=writer))


def _spooling_writer(store: HistoryStore, url: str) -> Any:
    """PostgreSQL writes go through an on-disk spool while the database is away."""
    from conntrail.history.pgwriter import SpoolingWriter
    from conntrail.history.store import open_store, spool_dir

    first = [store]

    def connect() -> HistoryStore:
        # The store opened at start first (it proved the database reachable), then new ones.
        return first.pop() if first else open_store(url, "--store", create=True)

    return SpoolingWriter(connect, spool_dir(url))


def _print_summary(pipeline: Pipeline, stats: list[dict[str, int]],
                   sinks: list[QueuedSink]) -> None:
    """One line on stderr: what we saw, what the filters kept out, what was lost and where."""
    lost = sum(item.get("lost", 0) for item in stats)
    enobufs = sum(item.get("enobufs", 0) for item in stats)
    counters = pipeline.counters
    dropped = sum(sink.counters.dropped for sink in sinks)
    print(f"conntrail: {counters.events} events, {counters.filtered} filtered, "
          f"{lost} lost in kernel ({enobufs} overflows), {dropped} dropped "
          f"in output", file=sys.stderr)


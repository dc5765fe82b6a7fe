"""`conntrail inventory`: every distinct flow seen, dumped on demand, and firewall rules.

conntracker's job, finished: aggregate flows (ephemeral source ports collapsed), mark those
both sides spoke in as confirmed, dump sorted lists on Ctrl-C, SIGUSR1 or a timer, keep the
inventory across restarts, rebuild it from history, write an nftables ruleset admitting
exactly what was seen, and ask the kernel which observed flows a ruleset would drop.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from conntrail.cli.common import (
    add_kernel_options,
    buffer_policy,
    install_signals,
    parse_protocols,
    restore_signals,
    silence_stdout,
)
from conntrail.cli.history_common import add_store_option, add_window_options, window
from conntrail.errors import ConfigError
from conntrail.formats import inventory as formats
from conntrail.formats.inventory import DumpInfo
from conntrail.inventory import persist
from conntrail.inventory.aggregate import Inventory, SourcePorts
from conntrail.inventory.model import InventoryEntry
from conntrail.inventory.view import ViewOptions, build_view, parse_group_by
from conntrail.kernel.localview import LocalityCache, read_named
from conntrail.kernel.netns import resolve
from conntrail.model import EventKind, FlowEvent
from conntrail.pipeline.runner import Pipeline, QueuedSink
from conntrail.pipeline.stages import Filter, Source
from conntrail.session import KernelSession, SessionOptions
from conntrail.sinks.inventory import DumpPlan, InventorySink, Renderer

log = logging.getLogger(__name__)

DESCRIPTION = """\
Keep every distinct flow seen (ephemeral source ports collapsed) and dump the list, sorted
by protocol and addresses, on Ctrl-C, on SIGUSR1 (without stopping) and every --interval.
A flow is confirmed when both sides spoke (SEEN_REPLY or ASSURED). Direction is from the
namespace's point of view: inbound (to a local address), outbound (from one), forwarded,
or local (loopback). Addresses are those a firewall rule sees: source before SNAT,
destination after DNAT.

  conntrail inventory                        # Ctrl-C prints the table
  conntrail inventory --emit nft -o fw.nft   # a ruleset admitting the confirmed flows
  conntrail inventory --from-history --last 7d --group-by /24
  conntrail inventory --from-history --check-against /etc/nftables.conf
"""


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register `inventory` and its options."""
    parser = subparsers.add_parser("inventory", parents=parents,
                                   help="distinct flows seen, and firewall rules from them",
                                   description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-p", "--proto", action="append", default=[], metavar="PROTO",
                        help="only these protocols (name or number; repeat or comma-separate)")
    parser.add_argument("-f", "--filter", action="append", default=[], metavar="EXPR",
                        help="only flows matching EXPR (the `watch` filter language)")
    parser.add_argument("-x", "--exclude", action="append", default=[], metavar="EXPR",
                        help="leave out flows matching EXPR (repeat)")
    dumps = parser.add_argument_group("dumps")
    dumps.add_argument("--format", choices=("table", "json", "csv"), default="table",
                       help="dump format (default table)")
    dumps.add_argument("--emit", choices=("nft",),
                       help="dump an nftables ruleset admitting the confirmed flows instead")
    dumps.add_argument("-o", "--output", metavar="PATH",
                       help="write each dump to PATH (replaced atomically) instead of stdout")
    dumps.add_argument("--interval", metavar="DURATION",
                       help="also dump every DURATION (e.g. 10m)")
    view = parser.add_argument_group("aggregation")
    view.add_argument("--group-by", default="host", metavar="PREFIX",
                      help="fold addresses into networks: /24 (IPv6 /64), /24,/48, or host "
                           "(default)")
    view.add_argument("--ports-only", action="store_true",
                      help="one entry per direction, protocol and destination port")
    view.add_argument("--merge-families", action="store_true",
                      help="with --ports-only: IPv4 and IPv6 of the same port as one entry")
    view.add_argument("--ephemeral", metavar="LOW-HIGH",
                      help="source ports to collapse (default: the namespace's "
                           "ip_local_port_range, and any above 1023 towards a port below "
                           "1024 or a local listener's); 1024-65535 collapses like "
                           "conntracker")
    view.add_argument("--keep-source-ports", action="store_true",
                      help="never collapse source ports")
    rules = parser.add_argument_group("rules (--emit nft) and checks")
    rules.add_argument("--policy", choices=("drop", "accept", "reject"), default="drop",
                       help="default policy of the emitted chains (default drop)")
    rules.add_argument("--table", default="conntrail_policy", metavar="NAME",
                       help="name of the emitted inet table (default conntrail_policy)")
    rules.add_argument("--check-against", metavar="RULESET",
                       help="report the confirmed flows this ruleset would drop, as the "
                            "kernel evaluates it: an nft file, or netns:NAME for the live "
                            "ruleset of a namespace (netns: alone: the current one)")
    state = parser.add_argument_group("persistence")
    state.add_argument("--state", metavar="PATH",
                       help="state file kept across restarts (default "
                            f"${persist.STATE_ENV}, else {persist.DEFAULT_PATH})")
    state.add_argument("--no-state", action="store_true",
                       help="neither load nor save a state file")
    state.add_argument("--reset", action="store_true",
                       help="start empty, replacing the state file at the first save")
    state.add_argument("--from-state", action="store_true",
                       help="dump the saved inventory once and exit (no kernel listening): "
                            "e.g. with --emit nft or --check-against")
    history = parser.add_argument_group("from history (see `conntrail query`)")
    history.add_argument("--from-history", action="store_true",
                         help="build the inventory from the stored flows of a window, dump "
                              "it once and exit (no kernel listening)")
    add_store_option(history)
    add_window_options(history)
    add_kernel_options(parser)
    parser.set_defaults(run=run)


@dataclass(frozen=True)
class InventoryPlan:
    """Everything `inventory` will do, validated before the kernel is touched."""

    filters: list[Filter]
    ports: SourcePorts
    view: ViewOptions
    render: Renderer
    output: Path | None
    interval_s: float | None
    state: Path | None
    reset: bool


def plan(args: argparse.Namespace, checks: list[bool]) -> InventoryPlan:
    """Validate every option; errors name the option."""
    from conntrail.cli.timeargs import parse_duration

    v4, v6 = parse_group_by(args.group_by)
    view = ViewOptions(v4, v6, args.ports_only, args.merge_families)
    interval = parse_duration(args.interval, "--interval") / 1e9 if args.interval else None
    if interval is not None and interval < 1:
        raise ConfigError("--interval", "must be at least 1s")
    if args.from_history and (args.interval or args.state or args.reset or args.no_state
                              or args.from_state):
        raise ConfigError("--from-history", "dumps once from the store: --interval, "
                                            "--state, --from-state, --no-state and --reset "
                                            "do not apply")
    if args.from_state and (args.interval or args.reset or args.no_state):
        raise ConfigError("--from-state", "dumps the state file once: --interval, --reset "
                                          "and --no-state do not apply")
    if (args.from_state or args.from_history) and args.netns:
        raise ConfigError("--netns", "--from-state and --from-history do not listen: to keep "
                                     "one namespace's flows, use -f 'netns == \"NAME\"'")
    if args.no_state and args.state:
        raise ConfigError("--no-state", "contradicts --state")
    if args.check_against and (args.emit or args.format == "csv"):
        raise ConfigError("--check-against", "reports as a table or JSON: --emit and "
                                             "--format csv do not apply")
    if not args.from_history and (args.store or args.since or args.until or args.last):
        raise ConfigError("--store/--from/--to/--last", "only apply with --from-history")
    state = None if args.no_state or args.from_history else \
        Path(args.state) if args.state else persist.default_state_path()
    return InventoryPlan(_filters(args), _source_ports(args), view, _renderer(args, checks),
                         _output(args.output), interval, state, args.reset)


def _output(option: str | None) -> Path | None:
    """-o PATH: its directory must exist now, not at the first dump an hour later."""
    if option is None:
        return None
    path = Path(option)
    if path.is_dir():
        raise ConfigError("--output", f"{option} is a directory: give a file name")
    if not path.parent.is_dir():
        raise ConfigError("--output", f"{path.parent} is not an existing directory")
    return path


def _filters(args: argparse.Namespace) -> list[Filter]:
    filters: list[Filter] = []
    protocols = parse_protocols(args.proto)
    if protocols:
        filters.append(lambda event: event.flow.orig.proto in protocols)
    if args.filter or args.exclude:
        from conntrail.filters.match import compile_filter

        filters.extend(compile_filter(text) for text in args.filter)
        filters.extend(_negated(compile_filter(text)) for text in args.exclude)
    return filters


def _negated(test: Filter) -> Filter:
    return lambda event: not test(event)


def _source_ports(args: argparse.Namespace) -> SourcePorts:
    if args.ephemeral is None:
        return SourcePorts(keep_all=args.keep_source_ports)
    low, _, high = args.ephemeral.partition("-")
    if not (low.isascii() and low.isdigit() and high.isascii() and high.isdigit()
            and 1 <= int(low) <= int(high) <= 65535):
        raise ConfigError("--ephemeral", f"{args.ephemeral!r}: expected LOW-HIGH within "
                                         "1-65535, e.g. 32768-60999")
    return SourcePorts((int(low), int(high)), args.keep_source_ports)


def _renderer(args: argparse.Namespace, checks: list[bool]) -> Renderer:
    """The dump renderer; with --check-against, the kernel check's report."""
    if args.check_against:
        from conntrail.cli.inventory_check import check_renderer

        return check_renderer(args.check_against, args.format, checks)
    if args.emit == "nft":
        from conntrail.inventory.nftables import RulesetOptions, render_ruleset

        # Built now so a bad --table or --policy is refused before the kernel is touched.
        try:
            options = RulesetOptions(generated_ns=0, table=args.table, policy=args.policy)
        except ConfigError as exc:  # it names its field; ours is the option
            raise ConfigError(f"--{exc.path}", exc.reason) from None

        def ruleset(entries: list[InventoryEntry], info: DumpInfo) -> bytes:
            dated = replace(options, generated_ns=info.taken_ns)
            namespaces = sorted({entry.netns for entry in entries})
            if len(namespaces) <= 1:
                return render_ruleset(entries, dated).encode()
            # A ruleset belongs to one namespace: one after the other, each headed by where
            # it goes (select one with -f 'netns == "NAME"').
            return "\n".join(
                f"# ---- netns {netns or '(host)'}: "
                f"{f'ip netns exec {netns} ' if netns else ''}nft -f FILE ----\n"
                + render_ruleset([e for e in entries if e.netns == netns], dated)
                for netns in namespaces).encode()

        return ruleset
    if args.format == "json":
        return formats.json_document
    if args.format == "csv":
        return lambda entries, _info: formats.csv_text(entries).encode()
    return lambda entries, info: "".join(
        line + "\n" for line in formats.table_lines(entries, info)).encode()


def run(args: argparse.Namespace) -> int:
    """Run `conntrail inventory`."""
    # SIGUSR1 asks for a dump from the start: its default action would kill us while a
    # large state file loads. The request is served at the first batch.
    requested = threading.Event()
    previous = signal.signal(signal.SIGUSR1, lambda _sig, _frame: requested.set())
    try:
        checks: list[bool] = []  # per dump with --check-against: did every flow pass?
        inventory_plan = plan(args, checks)
        if args.from_history:
            _dump_once(_from_history(args, inventory_plan), inventory_plan, "history")
        elif args.from_state:
            _dump_once(_from_state(inventory_plan), inventory_plan, "state")
        else:
            _live(args, inventory_plan, requested)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    return 1 if checks and not checks[-1] else 0


def _from_state(inventory_plan: InventoryPlan) -> Inventory:
    """The saved inventory; a missing state file is an error here, not an empty start."""
    path = inventory_plan.state
    assert path is not None  # plan() gives one unless --no-state, refused with --from-state
    if not path.exists():
        raise ConfigError("--state", f"{path}: no saved inventory there")
    inventory = Inventory(lambda _netns: None, inventory_plan.ports)
    inventory.events = persist.load(path, inventory)
    return inventory


def _dump_once(inventory: Inventory, inventory_plan: InventoryPlan, reason: str) -> None:
    entries = build_view(inventory.entries(), inventory_plan.view)
    data = inventory_plan.render(entries, DumpInfo(time.time_ns(), inventory.events, 0, reason))
    if inventory_plan.output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        persist.write_atomically(inventory_plan.output, data)


def _from_history(args: argparse.Namespace, inventory_plan: InventoryPlan) -> Inventory:
    """The inventory of the stored flows in the window."""
    from conntrail.history.rows import flow_of_row
    from conntrail.history.store import FlowQuery, open_store

    start, end = window(args)
    store = open_store(args.store, "--store", create=False)
    inventory = Inventory(LocalityCache(read_named), inventory_plan.ports)
    keep = inventory_plan.filters
    try:
        for row in store.query(FlowQuery(start_ns=start, end_ns=end, limit=None)):
            event = FlowEvent(EventKind.DUMP, flow_of_row(row), row.netns, row.start_ns)
            if all(test(event) for test in keep):
                inventory.add(event, whole=True)
    finally:
        store.close()
    return inventory


def _live(args: argparse.Namespace, inventory_plan: InventoryPlan,
          requested: threading.Event) -> None:
    """Listen until stopped, dumping as asked; the state file is locked and loaded first."""
    locality = LocalityCache(read_named)
    inventory = Inventory(locality, inventory_plan.ports)
    state_lock = None
    if inventory_plan.state is not None:
        state_lock = persist.lock(inventory_plan.state)
        if not inventory_plan.reset:
            _load_state(inventory, inventory_plan.state)
    try:
        _listen(args, inventory_plan, inventory, locality, requested)
    finally:
        if state_lock is not None:
            os.close(state_lock)


def _load_state(inventory: Inventory, path: Path) -> None:
    inventory.events = persist.load(path, inventory)
    # The earlier run counted the flows it saw; the start-up dump lists those still alive
    # again, so it only adds flows that make new entries.
    for netns in inventory.namespaces:
        inventory.dump_complete(netns)
    if len(inventory):
        log.info("inventory: %d entries loaded from %s", len(inventory), path)


def _listen(args: argparse.Namespace, inventory_plan: InventoryPlan, inventory: Inventory,
            locality: LocalityCache[Any], requested: threading.Event) -> None:
    from conntrail.sources.conntrack import ConntrackOptions, ConntrackSource

    sink = InventorySink(inventory, DumpPlan(
        inventory_plan.view, inventory_plan.render, inventory_plan.output,
        inventory_plan.state, inventory_plan.interval_s), locality, requested)
    queued = QueuedSink(sink)
    options = ConntrackOptions(frozenset({EventKind.NEW, EventKind.UPDATE, EventKind.DESTROY}),
                               dump=True, buffer=buffer_policy(args))
    session = KernelSession(SessionOptions(accounting=not args.no_accounting,
                                           install_rule=not args.no_rules,
                                           keep_rule=args.keep_rules))
    sources: list[Source] = []
    pipeline = Pipeline(sources, [queued], filters=inventory_plan.filters)
    stop = threading.Event()
    previous = install_signals(stop, pipeline.request_stop)
    try:
        for netns in [resolve(name) for name in args.netns or [""]]:
            session.prepare(netns)
            source = ConntrackSource(netns, options)
            source.start()
            sources.append(source)
        pipeline.run(stop)
    finally:
        try:
            pipeline.shutdown(drain_seconds=60.0)  # the final dump and save happen here
        finally:
            session.close()
            restore_signals(previous)
    if queued.failed.is_set():
        silence_stdout()
    print(f"conntrail: {len(inventory)} entries from {inventory.events} events, "
          f"{pipeline.counters.filtered} filtered out, {sink.lost} lost in kernel, "
          f"{sink.dumps} dumps", file=sys.stderr)

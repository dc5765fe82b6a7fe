"""`conntrail query`: stored flows by time window, filter expression and attribution."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from conntrail.cli.history_common import add_store_option, add_window_options, window
from conntrail.errors import ConfigError
from conntrail.formats import history as fmt
from conntrail.history.store import FlowQuery, HistoryStore, open_store, read_errors

DESCRIPTION = """\
List stored flows that were active in a time window and match a filter (the `watch` filter
language: see `conntrail watch --help-filter`; `event` does not apply, use --open/--closed).
Times are printed in UTC.

examples:
  conntrail query --last 1h -f 'dport == 443 and dst in 203.0.113.0/24'
  conntrail query --from 2026-11-17T14:00:00Z --to 2026-11-17T15:00:00Z -f snat --format csv
  conntrail query --uid 1000 --exe '*/curl' --format json
"""


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register `query` and its options."""
    parser = subparsers.add_parser("query", parents=parents, help="search stored flows",
                                   description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_option(parser)
    add_window_options(parser)
    parser.add_argument("-f", "--filter", action="append", default=[], metavar="EXPR",
                        help="filter expression (repeat: all must match)")
    state = parser.add_mutually_exclusive_group()
    state.add_argument("--open", dest="state", action="store_const", const="open",
                       default="any", help="only flows still open")
    state.add_argument("--closed", dest="state", action="store_const", const="closed",
                       help="only flows that ended")
    parser.add_argument("--pid", type=int, help="opened by this process id")
    parser.add_argument("--uid", type=int, help="opened by this user id")
    parser.add_argument("--gid", type=int, help="opened by this group id")
    parser.add_argument("--exe", metavar="GLOB", help="executable path (glob)")
    parser.add_argument("--unit", metavar="GLOB", help="systemd unit or container (glob)")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table",
                        help="output: aligned table (default), JSON lines, or CSV")
    parser.add_argument("--limit", type=int, default=1000,
                        help="at most N flows (default 1000; 0 = no limit)")
    parser.add_argument("--newest", action="store_true", help="newest first")
    parser.set_defaults(run=run)


def build_query(args: argparse.Namespace) -> FlowQuery:
    """Validate the options into a FlowQuery; errors name the option."""
    start, end = window(args)
    where = None
    if args.filter:
        from conntrail.filters.ast import And
        from conntrail.filters.parser import parse

        exprs = [parse(text) for text in args.filter]
        where = exprs[0] if len(exprs) == 1 else And(tuple(exprs))
    if args.limit < 0:
        raise ConfigError("--limit", "must be 0 (no limit) or positive")
    attributes: dict[str, int | str] = {name: getattr(args, name) for name in
                                        ("pid", "uid", "gid", "exe", "unit")
                                        if getattr(args, name) is not None}
    return FlowQuery(where, start, end, attributes, args.state, args.limit or None,
                     args.newest)


def run(args: argparse.Namespace) -> int:
    """Run `conntrail query`; exit 1 when nothing matched."""
    query = build_query(args)
    store = open_store(args.store, create=False)
    try:
        return _print(store, query, args.format)
    except read_errors() as exc:
        raise ConfigError("--store", f"{store.url}: {exc}") from exc
    finally:
        store.close()


def _print(store: HistoryStore, query: FlowQuery, form: str) -> int:
    """Print the matching flows; exit 1 when there are none."""
    rows = store.query(query)
    out = sys.stdout
    count = 0
    if form == "json":
        for row in rows:
            out.buffer.write(fmt.json_line(row))
            count += 1
    else:
        lines = list(rows)
        count = len(lines)
        out.writelines(fmt.csv_lines(lines) if form == "csv" else
                       (line + "\n" for line in fmt.table_lines(lines)))
    out.flush()
    if count == 0:
        print("conntrail: no stored flow matches", file=sys.stderr)
        return 1
    return 0

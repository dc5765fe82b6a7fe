"""Options shared by the commands that read history: the store and the time window."""

from __future__ import annotations

import argparse
import time

from conntrail.cli.timeargs import parse_duration, parse_time
from conntrail.errors import ConfigError
from conntrail.history.store import STORE_ENV, default_store


def add_store_option(parser: argparse.ArgumentParser) -> None:
    """--store URL: an SQLite file path or a postgresql:// DSN."""
    parser.add_argument("--store", metavar="URL", default=None,
                        help="history store: an SQLite file or postgresql://… DSN "
                             f"(default ${STORE_ENV}, else {default_store()})")


def add_window_options(parser: argparse.ArgumentParser) -> None:
    """--from/--to/--last: the time window (RFC 3339, epoch seconds or now)."""
    parser.add_argument("--from", dest="since", metavar="TIME",
                        help="flows active at or after TIME (RFC 3339 or epoch seconds)")
    parser.add_argument("--to", dest="until", metavar="TIME",
                        help="flows active at or before TIME")
    parser.add_argument("--last", metavar="DURATION",
                        help="flows active in the last DURATION (30s, 5m, 2h, 7d)")


def window(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """(start_ns, end_ns) from --from/--to/--last; None is unbounded."""
    if args.last and args.since:
        raise ConfigError("--last", "use either --last or --from, not both")
    end = parse_time(args.until, "--to") if args.until else None
    start: int | None
    if args.last:
        start = (end or time.time_ns()) - parse_duration(args.last, "--last")
    else:
        start = parse_time(args.since, "--from") if args.since else None
    if start is not None and end is not None and start > end:
        raise ConfigError("--from", "the window starts after it ends")
    return start, end

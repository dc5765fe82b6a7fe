"""`conntrail who ADDRESS:PORT --at TIME`: the NAT answer, from the stored history."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from conntrail.cli.common import parse_protocols
from conntrail.cli.history_common import add_store_option
from conntrail.cli.timeargs import parse_duration, parse_endpoint, parse_time
from conntrail.errors import ConfigError
from conntrail.formats import history as fmt
from conntrail.formats.timefmt import iso_utc
from conntrail.history.store import HistoryStore, WhoMatch, WhoQuery, open_store, read_errors

DESCRIPTION = """\
Who was behind a public (post-NAT) address and port at a given time? Looks for
  snat   inside hosts whose connections left through ADDRESS:PORT (masquerade/SNAT),
  dnat   inside hosts that ADDRESS:PORT was forwarded to (port forward/DNAT),
  local  this host's own connections from ADDRESS:PORT (no NAT),
among the flows active at TIME (or in the window). Times: RFC 3339 with a zone, or epoch
seconds; output in UTC.

exit status: 0 found, 1 no flow matched (the store covers that time), 3 the store does not
cover that time (conntrail was not recording, or retention removed it).

example: conntrail who 198.51.100.7:53500 --at 2026-11-17T14:02:00Z
"""
NOT_COVERED = 3
HEARTBEAT_SLACK_NS = 2_000_000_000


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register `who` and its options."""
    parser = subparsers.add_parser("who", parents=parents, description=DESCRIPTION,
                                   help="who was behind a public address:port at a time",
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("endpoint", metavar="ADDRESS[:PORT]",
                        help="198.51.100.7:53500, [2001:db8::1]:443, or an address")
    parser.add_argument("--at", metavar="TIME", help="the moment (default: now)")
    parser.add_argument("--window", metavar="DURATION", default="0s",
                        help="also flows active within DURATION around --at (e.g. 30s, "
                             "for clocks that disagree)")
    parser.add_argument("--from", dest="since", metavar="TIME",
                        help="instead of --at: flows active from TIME …")
    parser.add_argument("--to", dest="until", metavar="TIME", help="… to TIME")
    parser.add_argument("-p", "--proto", metavar="PROTO", help="only this protocol (tcp, udp…)")
    parser.add_argument("--json", action="store_true", help="one JSON object per answer")
    parser.add_argument("--limit", type=int, default=100, help="at most N answers (100)")
    add_store_option(parser)
    parser.set_defaults(run=run)


def build_query(args: argparse.Namespace) -> WhoQuery:
    """Validate the arguments into a WhoQuery; errors name the argument."""
    address, port = parse_endpoint(args.endpoint)
    if args.at and (args.since or args.until):
        raise ConfigError("--at", "use either --at or --from/--to")
    if args.since or args.until:
        start = parse_time(args.since, "--from") if args.since else 0
        end = parse_time(args.until, "--to") if args.until else parse_time("now", "--to")
    else:
        moment = parse_time(args.at or "now", "--at")
        slack = parse_duration(args.window, "--window")
        start, end = moment - slack, moment + slack
    if start > end:
        raise ConfigError("--from", "the window starts after it ends")
    proto = None
    if args.proto:
        protocols = parse_protocols([args.proto])
        if len(protocols) != 1:
            raise ConfigError("--proto", f"one protocol, not {args.proto!r}")
        [proto] = protocols
    if args.limit <= 0:
        raise ConfigError("--limit", "must be positive")
    return WhoQuery(address, port, start, end, proto, args.limit)


def _describe(query: WhoQuery) -> str:
    where = fmt.endpoint(query.address, query.port)
    if query.start_ns == query.end_ns:
        return f"{where} at {iso_utc(query.start_ns)}"
    return f"{where} between {iso_utc(query.start_ns)} and {iso_utc(query.end_ns)}"


def _coverage(store: HistoryStore, query: WhoQuery) -> tuple[str, str]:
    """('full' | 'partial' | 'none', what is missing): did recording cover the window? The
    sessions' union must have no hole in it (a recorder extends its coverage every second,
    so the last HEARTBEAT_SLACK_NS before it are taken as covered)."""
    spans = sorted((span.start_ns, span.end_ns + HEARTBEAT_SLACK_NS)
                   for span in store.coverage(query.start_ns - HEARTBEAT_SLACK_NS,
                                              query.end_ns))
    if not spans:
        return "none", "the store does not cover that time: conntrail was not recording then"
    reached = query.start_ns
    for start, end in spans:
        if start > reached:
            break
        reached = max(reached, end)
    if reached >= query.end_ns:
        return "full", "the store covers that time"
    return "partial", (f"recording did not cover all of that window (covered from "
                       f"{iso_utc(query.start_ns)} to {iso_utc(min(reached, query.end_ns))}"
                       " at most)" if reached > query.start_ns else
                       "recording did not cover the start of that window")


def _print(matches: list[WhoMatch], as_json: bool) -> None:
    for match in matches:
        if as_json:
            sys.stdout.buffer.write(orjson.dumps(fmt.who_document(match),
                                                 option=orjson.OPT_APPEND_NEWLINE))
        else:
            print(fmt.who_line(match))
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    """Run `conntrail who`."""
    query = build_query(args)
    store = open_store(args.store, create=False)
    try:
        matches = store.who(query)
        covered, note = _coverage(store, query)
        gaps = store.gaps(query.start_ns - 60_000_000_000, query.end_ns + 60_000_000_000)
    except read_errors() as exc:
        raise ConfigError("--store", f"{store.url}: {exc}") from exc
    finally:
        store.close()
    if not args.json:
        print(f"# {_describe(query)} (times UTC)")
    _print(matches, args.json)
    for netns, at_ns, lost in gaps:
        where = f" in netns {netns}" if netns else ""
        print(f"conntrail: warning: {lost if lost is not None else 'some'} events were lost"
              f"{where} at {iso_utc(at_ns)}: the answer may be incomplete", file=sys.stderr)
    if matches:
        if covered != "full":
            print(f"conntrail: note: {note}", file=sys.stderr)
        return 0
    if covered == "none":
        print(f"conntrail: no answer for {_describe(query)}: {note}", file=sys.stderr)
        return NOT_COVERED
    print(f"conntrail: no flow used {_describe(query)} ({note})", file=sys.stderr)
    return 1

"""`conntrail record`: save raw conntrack netlink datagrams for bug reports and golden tests."""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
from typing import Any, TextIO

from conntrail.api import parse_kinds
from conntrail.cli.common import (
    add_kernel_options,
    buffer_policy,
    install_signals,
    restore_signals,
)
from conntrail.errors import ConfigError
from conntrail.kernel.netns import NetnsRef, resolve
from conntrail.kernel.socket import NetlinkSocket
from conntrail.model import AF_UNSPEC
from conntrail.netlink.conntrack import DumpRequest, encode_dump_request
from conntrail.recording import format_line, header_lines
from conntrail.session import KernelSession, SessionOptions
from conntrail.sources.conntrack import multicast_groups


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register `record`."""
    parser = subparsers.add_parser(
        "record", parents=parents, help="save raw conntrack datagrams to a .hex file",
        description="Save the raw netlink datagrams conntrack sends, one per line as "
                    "'<received_ns> <hex>', after a '#' comment header saying how they were "
                    "recorded. `conntrail decode` reads them back.")
    parser.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="where to write ('-' for stdout)")
    parser.add_argument("-e", "--events", default="new,update,destroy", metavar="KINDS")
    parser.add_argument("--dump", action="store_true",
                        help="also record the reply to a table dump first")
    parser.add_argument("-c", "--count", type=int, metavar="N", help="stop after N datagrams")
    parser.add_argument("-t", "--duration", type=float, metavar="S", help="stop after S seconds")
    parser.add_argument("--comment", action="append", default=[], metavar="TEXT",
                        help="a line for the header (how the traffic was made)")
    add_kernel_options(parser)
    parser.set_defaults(run=run)


def _header(args: argparse.Namespace, netns: NetnsRef) -> str:
    lines = [f"recorded by conntrail record on Linux {platform.release()} at "
             f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
             f"netns: {netns.name or 'current'}; events: {args.events}; dump: {args.dump}",
             *args.comment]
    return header_lines(lines)


def _record(sock: NetlinkSocket, out: TextIO, stop: threading.Event, count: int | None,
            deadline: float | None) -> int:
    written = 0
    while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
        if not sock.wait(0.1):
            continue
        for datagram in sock.recv_batch():
            out.write(format_line(time.time_ns(), datagram))
            written += 1
            if count is not None and written >= count:
                return written
        if sock.take_overflow():  # say where the recording has a gap
            out.write(header_lines(["kernel dropped events here (ENOBUFS)"]))
        out.flush()
    return written


def _open_output(path: str) -> TextIO:
    try:
        if path == "-":
            return os.fdopen(os.dup(1), "w", encoding="ascii")
        return open(path, "w", encoding="ascii")
    except OSError as exc:
        raise ConfigError("--output", f"{path}: {exc.strerror}") from exc


def run(args: argparse.Namespace) -> int:
    """Run `conntrail record`."""
    if len(args.netns) > 1:
        raise ConfigError("--netns", "record takes one namespace")
    kinds = parse_kinds(args.events.split(","))
    for option, value in (("--count", args.count), ("--duration", args.duration)):
        if value is not None and value <= 0:
            raise ConfigError(option, "must be a positive number")
    netns = resolve(args.netns[0] if args.netns else "")
    session = KernelSession(SessionOptions(not args.no_accounting, not args.no_rules,
                                           args.keep_rules))
    deadline = None if args.duration is None else time.monotonic() + args.duration
    stop = threading.Event()
    previous = install_signals(stop)
    out = _open_output(args.output)
    try:
        session.prepare(netns)
        groups = multicast_groups(kinds)
        with NetlinkSocket(netns, groups, buffer_policy(args)) as sock:
            out.write(_header(args, netns))
            if args.dump:
                # One AF_UNSPEC request dumps both families; a second request sent while the
                # first dump runs would be refused with EBUSY.
                sock.send(encode_dump_request(DumpRequest(AF_UNSPEC, int(time.time()))))
            _record(sock, out, stop, args.count, deadline)
    finally:
        out.close()
        session.close()
        restore_signals(previous)
    return 0

"""`conntrail decode`: turn a recording into JSON lines (or text), for bugs and goldens."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from conntrail.errors import ConfigError, DecodeError
from conntrail.formats.jsonl import JsonFormat
from conntrail.formats.text import TextFormat
from conntrail.model import FlowEvent
from conntrail.netlink.conntrack import decode_datagram
from conntrail.pipeline.stages import Formatter
from conntrail.recording import parse_line


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register `decode`."""
    parser = subparsers.add_parser(
        "decode", parents=parents, help="decode a recording to JSON lines",
        description="Decode a file written by `conntrail record` ('-' for stdin). Bad lines "
                    "are reported with their line number and byte offset, and skipped.")
    parser.add_argument("file", metavar="FILE")
    parser.add_argument("--layout", choices=("ecs", "record", "text"), default="ecs",
                        help="ecs (as watch --json), record (every decoded field), "
                             "or text (as watch)")
    parser.set_defaults(run=run)


def _formatter(layout: str) -> Formatter:
    return TextFormat() if layout == "text" else JsonFormat(layout)


def _open_input(path: str) -> TextIO:
    if path == "-":
        return sys.stdin
    try:
        # errors="replace": a non-ASCII line becomes a bad line, reported and skipped.
        return open(path, encoding="ascii", errors="replace")
    except OSError as exc:
        raise ConfigError("FILE", f"{path}: {exc.strerror}") from exc


def run(args: argparse.Namespace) -> int:
    """Run `conntrail decode`; exit status 1 when any line could not be decoded."""
    formatter = _formatter(args.layout)
    errors = 0
    out = sys.stdout.buffer
    with _open_input(args.file) as source:
        for number, line in enumerate(source, start=1):
            try:
                item = parse_line(number, line)
                if item is None:
                    continue
                records = decode_datagram(item.data, "", item.received_ns)
            except DecodeError as exc:
                errors += 1
                print(f"conntrail: {args.file}:{number}: {exc}", file=sys.stderr)
                continue
            out.write(b"".join(formatter(rec) for rec in records if isinstance(rec, FlowEvent)))
    out.flush()
    return 1 if errors else 0

"""Entry point: parse the subcommand, run it, turn known errors into one clear line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from conntrail import __version__
from conntrail.cli import decode, inventory, query, record, run, watch, who
from conntrail.cli.common import silence_stdout
from conntrail.errors import ConntrailError

SUBCOMMANDS = (watch, run, who, query, inventory, record, decode)


def build_parser() -> argparse.ArgumentParser:
    """The full parser, every subcommand included."""
    parser = argparse.ArgumentParser(
        prog="conntrail",
        description="The connection audit trail: conntrack flows, who made them, and NAT.",
    )
    parser.add_argument("--version", action="version", version=f"conntrail {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output on stderr (-vv for debug)")
    # -v is accepted after the subcommand too; SUPPRESS keeps the top-level count otherwise.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more log output on stderr (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers, [common])
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 \
        else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="conntrail: %(levelname)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    """Run conntrail; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        status: int = args.run(args)
    except ConntrailError as exc:
        print(f"conntrail: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        silence_stdout()  # the reader of our output left: not an error
        return 0
    except KeyboardInterrupt:  # Ctrl-C before a command installed its own handling
        return 130
    except PermissionError as exc:
        print(f"conntrail: error: {exc.strerror}: run as root or with CAP_NET_ADMIN",
              file=sys.stderr)
        return 2
    return status

"""Options and helpers shared by subcommands that listen to the kernel."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from conntrail.errors import ConfigError
from conntrail.kernel.privileges import apply_priority
from conntrail.kernel.socket import BufferPolicy
from conntrail.model import PROTO_NUMBERS
from conntrail.units import MAX_BUFFER, parse_size

__all__ = ["MAX_BUFFER", "apply_priority", "parse_size"]

def add_kernel_options(parser: argparse.ArgumentParser) -> None:
    """--netns, buffer sizing, and what we may change in the kernel."""
    parser.add_argument("-n", "--netns", action="append", default=[], metavar="NAME",
                        help="network namespace: a name under /run/netns or a path "
                             "(repeat for several; default: the current one)")
    parser.add_argument("--buffer", default="32M", metavar="SIZE",
                        help="netlink receive buffer at start (default 32M)")
    parser.add_argument("--buffer-max", default="128M", metavar="SIZE",
                        help="largest size the buffer grows to after losses (default 128M)")
    parser.add_argument("--no-rules", action="store_true",
                        help="never install the `inet conntrail` table that activates "
                             "conntrack in a namespace with no conntrack rule")
    parser.add_argument("--keep-rules", action="store_true",
                        help="leave the `inet conntrail` table in place on exit")
    parser.add_argument("--no-accounting", action="store_true",
                        help="do not enable nf_conntrack_acct/nf_conntrack_timestamp "
                             "(no byte counters or kernel timestamps then)")


def buffer_policy(args: argparse.Namespace) -> BufferPolicy:
    """The BufferPolicy the options describe."""
    initial = parse_size(args.buffer, "--buffer")
    maximum = max(initial, parse_size(args.buffer_max, "--buffer-max"))
    return BufferPolicy(initial, maximum)


def silence_stdout() -> None:
    """After the reader of our stdout went away (`| head`): point fd 1 at /dev/null so the
    interpreter's final flush does not print a BrokenPipeError of its own."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def install_signals(stop: threading.Event,
                    also: Callable[[], None] | None = None) -> dict[int, Any]:
    """SIGINT/SIGTERM set `stop` (and call `also`); returns the handlers to put back."""
    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()
        if also is not None:
            also()

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def restore_signals(previous: dict[int, Any]) -> None:
    """Put back the handlers `install_signals` replaced."""
    for sig, old in previous.items():
        signal.signal(sig, old)


def parse_protocols(values: list[str]) -> frozenset[int]:
    """-p values (names or numbers, comma-separated) to protocol numbers."""
    out = set()
    for value in ",".join(values).split(","):
        name = value.strip().lower()
        if not name:
            continue
        if name.isdigit() and 0 <= int(name) <= 255:
            out.add(int(name))
        elif name in PROTO_NUMBERS:
            out.add(PROTO_NUMBERS[name])
        else:
            raise ConfigError("--proto", f"unknown protocol {value!r}; known: "
                              + ", ".join(sorted(PROTO_NUMBERS)))
    return frozenset(out)

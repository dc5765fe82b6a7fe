"""Decode cost per event on a recorded corpus (a `conntrail record` file of >= 100k messages).

    sudo python3 bench/decode_cost.py RECORDING.hex [--repeat 3]

Reports µs per event for: decode only; decode + ECS JSON; decode + text line. The recording is
loaded first so file I/O is not measured; the best of --repeat runs is kept (least noise).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from conntrail.formats.jsonl import JsonFormat
from conntrail.formats.text import TextFormat
from conntrail.model import FlowEvent
from conntrail.netlink.conntrack import decode_datagram
from conntrail.recording import parse_lines


def _load(path: Path) -> list[bytes]:
    with path.open(encoding="ascii") as handle:
        return [item.data for item in parse_lines(handle)]


def _measure(datagrams: list[bytes], work: Callable[[FlowEvent], object]) -> tuple[int, float]:
    events = 0
    start = time.process_time()
    for data in datagrams:
        for item in decode_datagram(data):
            if isinstance(item, FlowEvent):
                events += 1
                work(item)
    return events, time.process_time() - start


def main() -> int:
    """Run the three measurements and print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("recording", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    datagrams = _load(args.recording)
    json_fmt, text_fmt = JsonFormat(), TextFormat()
    cases: dict[str, Callable[[FlowEvent], object]] = {
        "decode": lambda event: None, "decode+json": json_fmt, "decode+text": text_fmt}
    print(f"{len(datagrams)} datagrams from {args.recording}")
    for name, work in cases.items():
        runs = [_measure(datagrams, work) for _ in range(args.repeat)]
        events = runs[0][0]
        best = min(seconds for _, seconds in runs)
        print(f"{name:12s} {events:8d} events  {best / events * 1e6:6.2f} µs/event (CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

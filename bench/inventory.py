"""Inventory ingest benchmark: memory per distinct entry and CPU per event.

    python3 bench/inventory.py                      # 1M distinct flows, 10M events
    python3 bench/inventory.py --entries 100000     # a quicker run

Each distinct entry (a client x server x port shape) gets two flows with different ephemeral
source ports, each flow NEW, three UPDATEs (reply seen, assured, closing) and DESTROY with
counters: 10 events per entry, the mix a busy TCP gateway produces. Events are generated in
chunks outside the timed region; only `Inventory.add` is timed. Memory is measured two
ways: the Python objects the inventory holds (dict table, keys, row numbers, counter
arrays, summed with sys.getsizeof) and the process RSS growth.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from conntrail.inventory.aggregate import Inventory
from conntrail.model import (
    AF_INET,
    Counters,
    CtStatus,
    EventKind,
    Flow,
    FlowEvent,
    FlowTuple,
)

S = 1_000_000_000
T0 = 1_795_000_000 * S
NEW_STATUS = CtStatus.CONFIRMED
REPLIED = CtStatus.CONFIRMED | CtStatus.SEEN_REPLY
ASSURED = REPLIED | CtStatus.ASSURED


class GatewayLocality:
    """A router owning 198.18.0.1: every generated flow is forwarded."""

    addresses = frozenset({"198.18.0.1"})
    port_range = (32768, 60999)
    tcp_listening: frozenset[int] = frozenset()
    udp_bound: frozenset[int] = frozenset()

    def is_local_destination(self, address: str) -> bool:
        return address in self.addresses


def shape(index: int) -> tuple[str, str, int]:
    """The index-th distinct (client, server, port): 65536 clients x servers x 16 ports."""
    client = f"198.18.{(index >> 8) & 255}.{index & 255}"
    server_index = index >> 16
    server = f"198.19.{(server_index >> 4) & 255}.{server_index & 15}"
    return client, server, 1 + (index % 16) * 1000


def events_for(index: int) -> Iterator[FlowEvent]:
    """Ten events: two flows of one entry, each NEW, three UPDATEs and DESTROY."""
    client, server, port = shape(index)
    at = T0 + index * 1000
    for flow_number in range(2):
        sport = 33000 + (index * 2 + flow_number) % 27000
        orig = FlowTuple(AF_INET, 6, client, server, sport, port)
        reply = FlowTuple(AF_INET, 6, server, client, port, sport)
        base = Flow(orig=orig, reply=reply, status=NEW_STATUS, ct_id=index * 2 + flow_number)
        yield FlowEvent(EventKind.NEW, base, "gw", at)
        yield FlowEvent(EventKind.UPDATE, base._replace(status=REPLIED), "gw", at + 1)
        yield FlowEvent(EventKind.UPDATE, base._replace(status=ASSURED), "gw", at + 2)
        yield FlowEvent(EventKind.UPDATE, base._replace(status=ASSURED), "gw", at + 3)
        counters = Counters(10, 4000)
        yield FlowEvent(EventKind.DESTROY, base._replace(status=ASSURED, counters_orig=counters,
                                                          counters_reply=counters), "gw", at + 4)


def held_bytes(inventory: Inventory) -> int:
    """Bytes of the Python objects only the inventory holds."""
    index = inventory._index
    total = sys.getsizeof(index)
    total += sum(sys.getsizeof(key) for key in index)
    total += sum(sys.getsizeof(row) for row in index.values() if row > 256)  # small ints shared
    for column in (inventory.first, inventory.last, inventory.flows, inventory.confirmed,
                   inventory.packets, inventory.bytes):
        total += column.buffer_info()[1] * column.itemsize
    return total


def rss_bytes() -> int:
    """Current resident set size."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def run(entries: int, chunk: int) -> dict[str, float]:
    inventory = Inventory(lambda _netns: GatewayLocality())
    inventory.dump_complete("gw")  # as in a real run once the start-up dump has ended
    gc.collect()
    rss0 = rss_bytes()
    timed = 0.0
    cpu = 0.0
    events = 0
    for start in range(0, entries, chunk):
        batch = [event for index in range(start, min(entries, start + chunk))
                 for event in events_for(index)]
        add = inventory.add
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for event in batch:
            add(event)
        timed += time.perf_counter() - wall0
        cpu += time.process_time() - cpu0
        events += len(batch)
        del batch
    gc.collect()
    rss1 = rss_bytes()
    assert len(inventory) == entries, (len(inventory), entries)
    snapshot_s = time.perf_counter()
    snapshot = inventory.snapshot()
    snapshot_s = time.perf_counter() - snapshot_s
    del snapshot
    return {
        "entries": entries, "events": events,
        "us_per_event_wall": timed / events * 1e6, "us_per_event_cpu": cpu / events * 1e6,
        "events_per_s": events / timed,
        "bytes_per_entry_objects": held_bytes(inventory) / entries,
        "bytes_per_entry_rss": (rss1 - rss0) / entries,
        "snapshot_s": snapshot_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=20_000, help="entries generated at once")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    result = run(args.entries, args.chunk)
    for name, value in result.items():
        print(f"{name:26} {value:,.2f}" if isinstance(value, float) else f"{name:26} {value:,}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

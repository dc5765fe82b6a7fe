"""`conntrail inventory` options, the entry → probe mapping, and failure handling (no root)."""

from __future__ import annotations

import io
import os
import threading
import zlib
from pathlib import Path

import pytest
from tests.unit.inventory.test_aggregate import LOCALITY, T0, flow_event

from conntrail.cli.inventory import plan
from conntrail.cli.inventory_check import probes_for
from conntrail.cli.main import build_parser
from conntrail.errors import ConfigError
from conntrail.history.rows import ClosedBy, build_row, flow_of_row
from conntrail.inventory import persist
from conntrail.inventory.aggregate import KEY, Inventory
from conntrail.inventory.model import ANY_FAMILY, Direction, InventoryEntry
from conntrail.inventory.view import ViewOptions
from conntrail.kernel.fwcheck import Hook
from conntrail.kernel.localview import LocalityCache
from conntrail.model import AF_INET, AF_INET6, Counters, CtStatus
from conntrail.sinks.inventory import DumpPlan, InventorySink


def planned(*argv: str) -> object:
    return plan(build_parser().parse_args(["inventory", *argv]), [])


@pytest.mark.parametrize(("argv", "option", "words"), [
    (("--group-by", "²"), "--group-by", "expected host"),
    (("--ephemeral", "²-5"), "--ephemeral", "LOW-HIGH"),
    (("--ephemeral", "9-5"), "--ephemeral", "LOW-HIGH"),
    (("--interval", "0s"), "--interval", "at least 1s"),
    (("--merge-families",), "--merge-families", "--ports-only"),
    (("--no-state", "--state", "x"), "--no-state", "contradicts"),
    (("--from-state", "-n", "x"), "--netns", "do not listen"),
    (("--from-history", "--reset"), "--from-history", "do not apply"),
    (("--store", "x.sqlite"), "--store/--from/--to/--last", "only apply"),
    (("--emit", "nft", "--table", "9x"), "--table", "not a table name"),
    (("-o", "/nonexistent-dir/x"), "--output", "not an existing directory"),
])
def test_bad_options_name_the_option(argv: tuple[str, ...], option: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as caught:
        planned(*argv)
    assert caught.value.path == option


def test_check_against_refuses_files_it_cannot_use(tmp_path: Path) -> None:
    binary = tmp_path / "rules.nft"
    binary.write_bytes(b"\xff\xfe\x00")
    for spec, words in [(str(tmp_path / "none"), "no such ruleset file"),
                        (str(tmp_path), "no such ruleset file"),
                        (str(binary), "not a text file")]:
        with pytest.raises(ConfigError, match=words):
            planned("--check-against", spec)
    with pytest.raises(ConfigError, match="--emit and --format csv"):
        planned("--check-against", str(binary), "--emit", "nft")


def entry(direction: Direction, family: int, src: str, dst: str, proto: int = 6,
          dport: int | None = 22) -> InventoryEntry:
    return InventoryEntry("", direction, family, proto, src, dst, None, dport, None, None,
                          T0, T0, 1, True, 0, 0)


def test_probes_stand_for_entries() -> None:
    [local] = probes_for(entry(Direction.LOCAL, AF_INET, "127.0.0.1", "127.0.0.1"))
    assert (local.hook, local.src, local.dst, local.dport) == (Hook.LOCAL, "127.0.0.1",
                                                               "127.0.0.1", 22)
    [grouped] = probes_for(entry(Direction.FORWARDED, AF_INET, "198.18.1.0/24",
                                 "198.18.2.2"))
    assert (grouped.hook, grouped.src) == (Hook.FORWARD, "198.18.1.1")
    both = list(probes_for(entry(Direction.INBOUND, ANY_FAMILY, "", "")))
    assert [(p.hook, p.family) for p in both] == [(Hook.INPUT, AF_INET),
                                                  (Hook.INPUT, AF_INET6)]
    assert both[1].dst.startswith("2001:db8:")


def test_a_stored_row_is_the_flow_it_was_built_from() -> None:
    event = flow_event("198.18.1.1", "198.18.2.2", 40000, 80, status=CtStatus.ASSURED,
                       counters=Counters(2, 100))
    flow = event.flow._replace(ct_id=9, start_ns=T0, stop_ns=T0 + 5, labels=0xAB, mark=3)
    back = flow_of_row(build_row(flow, "gw", T0, T0 + 5, ClosedBy.DESTROY))
    assert back == flow._replace(event_ns=None)


def test_a_state_entry_that_would_not_decode_is_refused_at_load(tmp_path: Path) -> None:
    inventory = Inventory(lambda _ns: LOCALITY)
    inventory.add(flow_event("198.18.1.1", "198.18.2.2", 40000, 80))
    data = bytearray(persist.encode_state(inventory.snapshot(), T0)[:-4])
    key_at = data.index(b"198.18.1.1 ")
    data[key_at + len("198.18.1.1")] = ord("_")  # "src dst" without its separator
    damaged = bytes(data) + zlib.crc32(bytes(data)).to_bytes(4, "little")
    with pytest.raises(persist.StateError, match=r"byte \d+: undecodable entry"):
        persist.decode_state(damaged, Inventory(lambda _ns: LOCALITY))
    assert KEY.size < key_at


def test_a_second_writer_of_one_state_file_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "inventory.state"
    fd = persist.lock(state)
    try:
        with pytest.raises(ConfigError, match="in use by another conntrail"):
            persist.lock(state)
    finally:
        os.close(fd)
    os.close(persist.lock(state))  # released with its holder


def test_a_failing_dump_still_saves_the_state_and_shutdown_goes_on(tmp_path: Path) -> None:
    def broken(_entries: list[InventoryEntry], _info: object) -> bytes:
        raise RuntimeError("ruleset does not load")

    cache = LocalityCache(lambda _ns: LOCALITY)
    state = tmp_path / "inventory.state"
    sink = InventorySink(Inventory(cache), DumpPlan(ViewOptions(), broken, state=state),
                         cache, threading.Event(), io.BytesIO())
    sink.write(sink.encode([flow_event("198.18.1.1", "198.18.2.2", 40000, 80)]))
    sink.close()  # logs, does not raise
    assert sink.dump_failures == 1
    reloaded = Inventory(lambda _ns: LOCALITY)
    persist.load(state, reloaded)
    assert len(reloaded) == 1

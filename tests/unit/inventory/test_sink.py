"""The inventory sink: ingest on encode, dumps on request, timer and exit, state saves."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest
from tests.unit.inventory.test_aggregate import LOCALITY, flow_event

from conntrail.formats.inventory import DumpInfo
from conntrail.inventory import persist
from conntrail.inventory.aggregate import Inventory
from conntrail.inventory.model import InventoryEntry
from conntrail.inventory.view import ViewOptions
from conntrail.kernel.localview import LocalityCache
from conntrail.model import LossNotice, TableSnapshot
from conntrail.sinks import inventory as sink_module
from conntrail.sinks.inventory import DumpPlan, InventorySink


def render(entries: list[InventoryEntry], info: DumpInfo) -> bytes:
    return f"{info.reason} {len(entries)} {sum(e.flows for e in entries)} {info.lost}\n".encode()


def make_sink(tmp_path: Path, clock: list[float] | None = None, **plan: object
              ) -> tuple[InventorySink, io.BytesIO, threading.Event]:
    cache = LocalityCache(lambda _ns: LOCALITY)
    stream = io.BytesIO()
    requested = threading.Event()
    dump_plan = DumpPlan(ViewOptions(), render, **plan)  # type: ignore[arg-type]
    now = clock or [0.0]
    sink = InventorySink(Inventory(cache), dump_plan, cache, requested, stream,
                         clock=lambda: now[0])
    return sink, stream, requested


def feed(sink: InventorySink, *records: object) -> None:
    sink.write(sink.encode(list(records)))  # type: ignore[arg-type]


def test_signal_dumps_without_stopping_and_exit_dumps_again(tmp_path: Path) -> None:
    sink, stream, requested = make_sink(tmp_path)
    feed(sink, flow_event("198.18.1.1", "198.18.2.2", 40000, 80))
    assert stream.getvalue() == b""
    requested.set()
    feed(sink)  # the heartbeat's empty batch is enough
    feed(sink, flow_event("198.18.1.1", "198.18.2.2", 40001, 80),
         LossNotice("", "overflow", 7))
    sink.close()
    sink.close()  # idempotent
    assert stream.getvalue().decode().splitlines() == ["signal 1 1 0", "exit 1 2 7"]
    assert not requested.is_set()


def test_timer_dumps(tmp_path: Path) -> None:
    clock = [1000.0]
    sink, stream, _ = make_sink(tmp_path, clock, interval_s=60.0, on_exit=False)
    feed(sink, flow_event("198.18.1.1", "198.18.2.2", 40000, 80))
    clock[0] += 59
    feed(sink)
    clock[0] += 2
    feed(sink)
    clock[0] += 30
    feed(sink)
    sink.close()
    assert stream.getvalue().decode().splitlines() == ["timer 1 1 0"]


def test_state_is_saved_at_exit_and_periodically(tmp_path: Path) -> None:
    clock = [1000.0]
    state = tmp_path / "inv.state"
    sink, stream, _ = make_sink(tmp_path, clock, state=state, on_exit=False)
    feed(sink, flow_event("198.18.1.1", "198.18.2.2", 40000, 80))
    assert not state.exists()
    clock[0] += sink_module.SAVE_INTERVAL_S + 1
    feed(sink)
    assert state.exists() and stream.getvalue() == b""  # saved, not shown
    feed(sink, flow_event("198.18.1.1", "198.18.2.3", 40000, 80))
    sink.close()
    reloaded = Inventory(lambda _ns: LOCALITY)
    persist.load(state, reloaded)
    assert len(reloaded) == 2


def test_resync_dumps_are_told_apart_by_the_snapshot_mark(tmp_path: Path) -> None:
    from conntrail.model import EventKind

    sink, stream, _ = make_sink(tmp_path)
    dumped = flow_event("198.18.1.1", "198.18.2.2", 40000, 80, kind=EventKind.DUMP)
    feed(sink, dumped, TableSnapshot("", 1, 0), dumped)
    sink.close()
    assert stream.getvalue().decode() == "exit 1 1 0\n"


def test_output_file_is_replaced_at_each_dump(tmp_path: Path) -> None:
    output = tmp_path / "inventory.txt"
    sink, _, requested = make_sink(tmp_path, output=output)
    feed(sink, flow_event("198.18.1.1", "198.18.2.2", 40000, 80))
    requested.set()
    feed(sink)
    assert output.read_text() == "signal 1 1 0\n"
    sink.close()
    assert output.read_text() == "exit 1 1 0\n"
    assert [p.name for p in tmp_path.iterdir()] == ["inventory.txt"]


def test_a_namespace_that_cannot_be_read_is_logged_once(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    calls = []

    def failing(netns: str) -> object:
        calls.append(netns)
        raise OSError("gone")

    cache = LocalityCache(failing, refresh_s=0.0)
    assert cache("ns1") is None and cache("ns1") is None
    cache.refresh_due()
    assert calls == ["ns1", "ns1"]  # cached between refreshes, re-read at one
    assert len([r for r in caplog.records if "ns1" in r.getMessage()]) == 1

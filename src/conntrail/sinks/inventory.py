"""The inventory sink: counts every flow into the inventory and dumps it when asked.

Ingest runs in `encode`, on the pipeline thread in event order. A dump is due on request
(SIGUSR1), on a timer, and at exit; `encode` then takes a snapshot (a copy: ~50 ms per
million entries) and hands it to the worker thread, which groups, sorts, renders, writes and
saves it, so ingest never waits for a dump to be written.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from conntrail.formats.inventory import DumpInfo
from conntrail.inventory import persist
from conntrail.inventory.aggregate import Inventory, Snapshot
from conntrail.inventory.model import InventoryEntry
from conntrail.inventory.view import ViewOptions, build_view
from conntrail.kernel.localview import LocalityCache
from conntrail.model import FlowEvent, LossNotice, Record, TableSnapshot

log = logging.getLogger(__name__)
SAVE_INTERVAL_S = 300.0

Renderer = Callable[[list[InventoryEntry], DumpInfo], bytes]
"""A dump's entries (grouped and sorted) to the bytes written."""


@dataclass(frozen=True)
class DumpPlan:
    """How dumps are made: view, renderer, destination, persistence, schedule."""

    view: ViewOptions
    render: Renderer
    output: Path | None = None  # None: standard output; a path is replaced atomically
    state: Path | None = None  # the state file, or None (not persisted)
    interval_s: float | None = None  # timer dumps
    on_exit: bool = True


@dataclass(frozen=True, slots=True)
class _Dump:
    snapshot: Snapshot
    info: DumpInfo
    show: bool  # False: only save the state


class InventorySink:
    """Feeds the inventory; dumps on request, on the timer and at exit."""

    def __init__(self, inventory: Inventory, plan: DumpPlan, locality: LocalityCache[Any],
                 requested: threading.Event, stream: BinaryIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inventory = inventory
        self.plan = plan
        self.locality = locality
        self.requested = requested
        self.stream = stream or sys.stdout.buffer
        self.name = "inventory"
        self.heartbeat = True  # idle: the runner still calls encode, so timers fire
        self.lost = 0
        self.dumps = 0
        self.dump_failures = 0
        self.save_failures = 0
        self._closed = False
        self._clock = clock
        now = clock()
        self._next_dump = now + plan.interval_s if plan.interval_s else None
        self._next_save = now + SAVE_INTERVAL_S

    def open(self) -> None:
        """Nothing to open: the state was loaded before the kernel was touched."""

    def encode(self, batch: Sequence[Record]) -> _Dump | None:
        """Ingest the batch; a snapshot when a dump or a save is due."""
        self.locality.refresh_due()
        add = self.inventory.add
        for record in batch:
            if type(record) is FlowEvent:
                add(record)
            elif isinstance(record, LossNotice):
                self.lost += record.lost or 1
            elif isinstance(record, TableSnapshot):
                self.inventory.dump_complete(record.netns)
        return self._due()

    def _due(self) -> _Dump | None:
        now = self._clock()
        reason = None
        if self.requested.is_set():
            self.requested.clear()
            reason = "signal"
        elif self._next_dump is not None and now >= self._next_dump:
            reason = "timer"
        if reason is not None:
            if self.plan.interval_s:
                self._next_dump = now + self.plan.interval_s
            self._next_save = now + SAVE_INTERVAL_S
            return self._dump(reason, show=True)
        if self.plan.state is not None and now >= self._next_save:
            self._next_save = now + SAVE_INTERVAL_S
            return self._dump("save", show=False)
        return None

    def _dump(self, reason: str, show: bool) -> _Dump:
        info = DumpInfo(time.time_ns(), self.inventory.events, self.lost, reason)
        return _Dump(self.inventory.snapshot(), info, show)

    def write(self, payload: _Dump | None) -> None:
        """Save, then render and write a dump (worker thread). The state goes first: a dump
        that cannot be written (a full disk, a closed stdout, a ruleset that fails to
        load) must not cost what the inventory has accepted."""
        if payload is None:
            return
        if self.plan.state is not None:
            try:
                persist.save(self.plan.state, payload.snapshot, payload.info.taken_ns)
            except OSError as exc:
                self.save_failures += 1
                log.error("inventory state not saved to %s: %s", self.plan.state, exc)
        if payload.show:
            entries = build_view(payload.snapshot.entries(), self.plan.view)
            self._emit(self.plan.render(entries, payload.info))
            self.dumps += 1

    def _emit(self, data: bytes) -> None:
        if self.plan.output is None:
            self.stream.write(data)
            self.stream.flush()
        else:
            persist.write_atomically(self.plan.output, data)

    def close(self) -> None:
        """The final dump (and save), after the worker has finished; a failure is logged,
        not raised: shutdown goes on."""
        if self._closed:
            return
        self._closed = True
        try:
            self.write(self._dump("exit", show=self.plan.on_exit))
        except BrokenPipeError:
            pass  # the reader of our output left (e.g. `| head`): nothing to say
        except Exception as exc:  # noqa: BLE001 - any failure of the final dump is reported
            self.dump_failures += 1
            log.error("final inventory dump failed: %s", exc)

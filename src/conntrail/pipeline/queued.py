"""A sink behind a bounded queue: its own worker thread, a declared policy when full, retries.

Encoding runs on the pipeline thread (`offer`); writing runs on the sink's worker. When the
queue is full the policy decides: `block` the reader (the kernel's socket buffer absorbs the
wait, or the kernel counts losses), `spill` batches to an on-disk queue replayed in order once
the sink catches up, `drop_oldest` to keep the newest, or `drop` the new batch. Every event
that does not reach the sink is counted. A write that fails is retried with exponential
backoff (the same payload, so order holds); meanwhile the queue fills and the policy applies,
and a `block` sink that is failing drops instead of stalling the other sinks.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from conntrail.model import FlowEvent, Record
from conntrail.pipeline.stages import Filter, Sink

log = logging.getLogger(__name__)
_STOP = None
MERGE_MAX = 64  # batches folded into one write at most
_IDLE_WAKE_S = 0.25  # the worker looks at reopen requests and the spill this often


class FullPolicy(enum.Enum):
    """What a sink's queue does when full."""

    BLOCK = "block"  # back-pressure onto the reader (the kernel buffer absorbs it, or drops)
    SPILL = "spill"  # to an on-disk queue, replayed in order
    DROP_OLDEST = "drop_oldest"  # make room by dropping the oldest queued batch
    DROP = "drop"  # drop the new batch


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff between attempts of a failed write: initial, doubling, capped."""

    initial_s: float = 0.5
    max_s: float = 30.0

    def delays(self) -> Any:
        """0.5, 1, 2, … max, max, …"""
        delay = self.initial_s
        while True:
            yield delay
            delay = min(self.max_s, delay * 2)


class SpillStore(Protocol):
    """The on-disk queue the `spill` policy uses (pipeline.spill.SpillQueue)."""

    def put(self, record: bytes) -> bool:
        """Append; False when full."""

    def get(self) -> bytes | None:
        """The oldest record not yet committed."""

    def commit(self) -> None:
        """The last record from get() was written."""

    def __len__(self) -> int:
        """Records waiting."""

    def close(self) -> None:
        """Flush and release."""


@dataclass(slots=True)
class SinkCounters:
    """Per-sink counters, all monotonic."""

    written: int = 0  # events written
    dropped: int = 0  # events that will never be written (full, failing, shutdown)
    errors: int = 0  # failed encodes and writes (each retry counts)
    retries: int = 0  # writes attempted again after a failure
    spilled: int = 0  # events that went through the on-disk spill
    filtered: int = 0  # events this sink's own filter left out


class QueuedSink:
    """A sink behind a bounded queue drained by its own thread."""

    def __init__(self, sink: Sink, capacity: int = 1024,
                 policy: FullPolicy = FullPolicy.BLOCK, *, keep: Filter | None = None,
                 spill: SpillStore | None = None, retry: RetryPolicy | None = None,
                 label: str | None = None) -> None:
        if policy is FullPolicy.SPILL and spill is None:
            raise ValueError("the spill policy needs a spill store")
        self.sink = sink
        self._label = label  # a stable name for metrics (a sink may rename itself at open)
        self.policy = policy
        self.keep = keep
        self.counters = SinkCounters()
        self.failed = threading.Event()  # permanently: the reader went away (stdout)
        self.failing = threading.Event()  # for now: writes fail and are being retried
        self.stopping = threading.Event()  # set by the runner: a blocked offer gives up
        self._abandon = threading.Event()  # set at the drain deadline: retries give up
        self._reopen = threading.Event()
        self._spill = spill
        self._retry = retry
        self._to_spool = getattr(sink, "to_spool", None)
        self._from_spool = getattr(sink, "from_spool", None)
        # (events in the batch, encoded payload)
        self._queue: queue.Queue[tuple[int, Any] | None] = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._drain, name=f"sink:{sink.name}",
                                        daemon=True)

    @property
    def name(self) -> str:
        """The configured name, else the wrapped sink's."""
        return self._label or self.sink.name

    def start(self, spill_required: bool = True) -> None:
        """Open the sink (and its spill: a directory another process holds fails here, unless
        `spill_required` is False, as on a reload while the replaced sink still drains it)
        and start the worker."""
        open_spill = getattr(self._spill, "open", None)
        if open_spill is not None:
            open_spill(required=spill_required)
        self.sink.open()
        self._thread.start()

    def alive(self) -> bool:
        """The worker runs (or was never started)."""
        return self._thread.is_alive() or self._thread.ident is None

    def request_reopen(self) -> None:
        """Ask the worker to reopen the destination between writes (SIGHUP)."""
        self._reopen.set()

    def offer(self, batch: Sequence[Record]) -> None:
        """Encode a batch and queue it according to the full-queue policy."""
        if self.keep is not None and batch:  # (an empty batch is a heartbeat: passes)
            batch = self._kept(batch)
            if not batch:
                return
        if self.failed.is_set():
            self.counters.dropped += len(batch)
            return
        try:
            item = (len(batch), self.sink.encode(batch))
        except Exception:  # a failing sink must never kill the daemon
            self.counters.errors += 1
            self.counters.dropped += len(batch)
            log.exception("sink %s failed to encode a batch", self.sink.name)
            return
        try:
            self._enqueue(item)
        except Exception:  # e.g. the spill's disk: counted, never fatal to the reader
            self.counters.errors += 1
            self.counters.dropped += item[0]
            log.exception("sink %s: a batch could not be queued", self.name)

    def _kept(self, batch: Sequence[Record]) -> list[Record]:
        keep = self.keep
        assert keep is not None
        try:
            kept = [r for r in batch if type(r) is not FlowEvent or keep(r)]
        except Exception:
            self.counters.errors += 1
            log.exception("sink %s: its filter failed; batch passed unfiltered", self.name)
            return list(batch)
        self.counters.filtered += len(batch) - len(kept)
        return kept

    def _enqueue(self, item: tuple[int, Any]) -> None:
        if self.policy is FullPolicy.SPILL:
            self._put_or_spill(item)
        elif self.policy is FullPolicy.BLOCK:
            self._put_blocking(item)
        elif self.policy is FullPolicy.DROP_OLDEST:
            self._put_dropping_oldest(item)
        else:
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                self.counters.dropped += item[0]

    def _put_blocking(self, item: tuple[int, Any]) -> None:
        """Wait for room, but give up (and count the batch) once a stop is requested, or
        while the sink is failing: a dead destination must not stall the other sinks."""
        while not self.stopping.is_set():
            if self.failing.is_set() and self._queue.full():
                break
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        self.counters.dropped += item[0]

    def _put_dropping_oldest(self, item: tuple[int, Any]) -> None:
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    oldest = self._queue.get_nowait()
                    if oldest is not _STOP:
                        self.counters.dropped += oldest[0]

    def _put_or_spill(self, item: tuple[int, Any]) -> None:
        """In memory while there is room and nothing is spilled (order: the spill holds the
        newest batches once used, and is replayed after the queue empties)."""
        assert self._spill is not None
        if not len(self._spill):
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                pass
        count, payload = item
        record = count.to_bytes(4, "little") + self._spool_bytes(payload)
        if self._spill.put(record):
            self.counters.spilled += count
        else:
            self.counters.dropped += count

    def _spool_bytes(self, payload: Any) -> bytes:
        if self._to_spool is not None:
            data: bytes = self._to_spool(payload)
            return data
        return bytes(payload)

    def depth(self) -> int:
        """Batches waiting in memory."""
        return self._queue.qsize()

    def spilled_pending(self) -> int:
        """Batches waiting on disk."""
        return len(self._spill) if self._spill is not None else 0

    def _drain(self) -> None:
        while True:
            try:
                if self._drain_until_stop():
                    return
            except Exception:  # a bad spill record, a failing merge: counted, and go on
                self.counters.errors += 1
                log.exception("sink %s: the worker hit an error; it goes on", self.name)
                self._abandon.wait(1.0)

    def _drain_until_stop(self) -> bool:
        merge = getattr(self.sink, "merge", None)
        while True:
            try:
                item = self._queue.get(timeout=_IDLE_WAKE_S)
            except queue.Empty:
                self._idle()
                continue
            if item is _STOP:
                self._idle()
                return True
            count, payload = item
            stop_next = False
            if merge is not None and not self._queue.empty():
                count, payload, stop_next = self._merge_waiting(merge, count, payload)
            self._write(count, payload)
            if self._queue.empty():
                self._idle()
            if stop_next:
                self._idle()
                return True

    def _idle(self) -> None:
        """Nothing in memory: reopen if asked, then replay what was spilled."""
        self._maybe_reopen()
        if self._spill is None:
            return
        while not self._abandon.is_set():
            record = self._spill.get()
            if record is None:
                return
            count = int.from_bytes(record[:4], "little")
            payload = self._from_spool(record[4:]) if self._from_spool else record[4:]
            if not self._write(count, payload, on_disk=True) and self._abandon.is_set():
                return  # abandoned: stays on disk for the next run (not counted as lost)
            # While the spill holds anything, new batches go there too (offer), so nothing
            # newer can overtake it through memory.
            self._spill.commit()

    def _maybe_reopen(self) -> None:
        if not self._reopen.is_set():
            return
        self._reopen.clear()
        reopen = getattr(self.sink, "reopen", None)
        if reopen is None:
            return
        try:
            reopen()
        except Exception:  # the next write reports and retries
            self.counters.errors += 1
            log.exception("sink %s: reopen failed", self.name)

    def _merge_waiting(self, merge: Any, count: int,
                       payload: Any) -> tuple[int, Any, bool]:
        """Fold the batches already waiting into one write (a sink with `merge`, e.g. a
        database: one transaction for many batches when it falls behind)."""
        payloads = [payload]
        stop_next = False
        while len(payloads) < MERGE_MAX:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop_next = True
                break
            count += item[0]
            payloads.append(item[1])
        return count, merge(payloads), stop_next

    def _write(self, count: int, payload: Any, on_disk: bool = False) -> bool:
        """Write, retrying with backoff when a retry policy is set; False if given up (a
        spilled batch given up at the drain deadline stays on disk: not counted)."""
        delays = self._retry.delays() if self._retry is not None else None
        while True:
            self._maybe_reopen()
            try:
                self.sink.write(payload)
            except BrokenPipeError:
                self.counters.dropped += count
                self.failed.set()
                return False
            except Exception as exc:  # a failing sink must never kill the daemon
                self.counters.errors += 1
                if delays is None or self._abandon.is_set():
                    if not (on_disk and self._abandon.is_set()):
                        self.counters.dropped += count
                    log.exception("sink %s failed to write a batch", self.name)
                    return False
                self._report_failure(exc)
                self.counters.retries += 1
                if self._abandon.wait(next(delays)):
                    if not on_disk:
                        self.counters.dropped += count
                    return False
                continue
            self.counters.written += count
            if self.failing.is_set():
                self.failing.clear()
                log.warning("sink %s: writing again", self.name)
            return True

    def _report_failure(self, exc: Exception) -> None:
        """Once per failure episode at ERROR (loss may follow), then DEBUG."""
        if not self.failing.is_set():
            self.failing.set()
            log.error("sink %s: write failed (%s); retrying with backoff, queue policy %s "
                      "applies meanwhile", self.name, exc, self.policy.value)
        else:
            log.debug("sink %s: still failing: %s", self.name, exc)

    def stop(self, deadline: float) -> None:
        """Finish queued (and spilled) batches until `deadline` (monotonic), then close.

        A sink still stuck at the deadline is abandoned (its thread is a daemon): what it had
        queued in memory is counted as dropped (spilled batches stay on disk for the next
        run), and it is not closed under its own feet.
        """
        if self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put(_STOP, timeout=max(0.0, deadline - time.monotonic()))
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._abandon.set()
            self._thread.join(1.0)
        if self._thread.is_alive():
            abandoned = self._abandon_queue()
            log.error("sink %s: not drained before the deadline; %d events dropped",
                      self.sink.name, abandoned)
            return
        abandoned = self._abandon_queue()
        if abandoned:
            log.error("sink %s: not drained before the deadline; %d events dropped",
                      self.sink.name, abandoned)
        self._close()

    def _close(self) -> None:
        try:
            self.sink.close()
        finally:
            if self._spill is not None:
                self._spill.close()

    def _abandon_queue(self) -> int:
        abandoned = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                abandoned += item[0]
        self.counters.dropped += abandoned
        return abandoned

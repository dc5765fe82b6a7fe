"""The history sink: keeps the flow trail in a store (SQLite file or PostgreSQL).

The lifecycle (which rows to open, close, reconcile) runs in `encode` on the pipeline thread,
in event order; the store write runs on the sink's worker thread, one transaction per batch
(queued batches are merged first, so a slow disk means bigger transactions, not a backlog).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from conntrail.config import Table
from conntrail.errors import BatchSpooled, ConfigError
from conntrail.history import spool
from conntrail.history.rows import HistoryBatch, Lifecycle
from conntrail.history.store import HistoryStore, open_store, spool_dir
from conntrail.model import Record
from conntrail.pipeline.stages import SinkContext

log = logging.getLogger(__name__)
RETRY_MAX_ROWS = 1_000_000  # failed row changes kept for the next write, at most


class BatchWriter(Protocol):
    """Where batches go when not straight to the store (e.g. a spooling writer)."""

    def apply(self, batch: HistoryBatch) -> None:
        """Write one batch durably."""

    def close(self) -> None:
        """Flush what can be flushed and release."""


class HistorySink:
    """Writes flow rows, coverage and loss gaps to a history store."""

    def __init__(self, url: str | None, netns: Sequence[str], option: str = "--store",
                 store: HistoryStore | None = None, writer: BatchWriter | None = None, *,
                 store_factory: Callable[[], HistoryStore] | None = None,
                 writer_factory: Callable[[HistoryStore], BatchWriter] | None = None,
                 check: Callable[[], str] | None = None) -> None:
        self._url = url
        # Two sinks on one store are refused (config check); an SQLite path resolved.
        self.destination = (url if url is None or "://" in url else str(Path(url).resolve()))
        self._option = option
        self._store = store
        self._writer: BatchWriter | None = writer
        # Built from configuration: nothing is opened until open() (check and build stay
        # free of I/O).
        self._store_factory = store_factory
        self._writer_factory = writer_factory
        self._check = check
        # A writer of its own (the PostgreSQL spool) keeps failed batches itself; keeping
        # them here too would apply them twice.
        self._keep_failed = writer is None
        self._failed: HistoryBatch | None = None
        self.heartbeat = True  # the runner offers empty batches when idle: coverage grows
        self.lifecycle = Lifecycle(secrets.randbits(62), list(netns), time.time_ns())
        self.name = "history"

    def open(self) -> None:
        """Open (creating) the store, and reload the flows an earlier run left open: the
        first table dump then closes those that ended while nobody was recording."""
        if self._store is None:
            self._store = (self._store_factory() if self._store_factory is not None
                           else open_store(self._url, self._option, create=True))
        if self._writer is None:
            self._writer = (self._writer_factory(self._store)
                            if self._writer_factory is not None else self._store)
            self._keep_failed = self._writer is self._store
        self.name = f"history[{self._store.url}]"
        flush = getattr(self._writer, "flush", None)
        if flush is not None and not flush():
            # Spooled batches from an earlier run must be in the store before its open flows
            # are read, or the reconciliation would not see them (and duplicate them).
            raise ConfigError(self._option, f"{self._store.url}: the spool of an earlier run "
                              "could not be replayed; see the log")
        rows, last_seen = self._store.load_open(self.lifecycle.netns)
        self.lifecycle.seed(rows, last_seen)
        if rows:
            log.info("%s: %d flows were open at the last stop; reconciling with the table",
                     self.name, len(rows))
        self._writer.apply(HistoryBatch(coverage=self.lifecycle.coverage(time.time_ns())))

    def check(self) -> str:
        """`conntrail check`: the store opens (a database must accept the connection);
        SQLite has its own check, which creates nothing."""
        if self._check is not None:
            return self._check()
        store = (self._store_factory() if self._store_factory is not None
                 else open_store(self._url, self._option, create=True))
        try:
            return f"{store.url}: opened"
        finally:
            store.close()

    def encode(self, batch: Sequence[Record]) -> HistoryBatch:
        """The store operations this batch implies (pipeline thread, in order)."""
        return self.lifecycle.feed(batch, time.time_ns())

    def merge(self, payloads: Sequence[HistoryBatch]) -> HistoryBatch:
        """Several queued batches as one transaction (order kept within each list)."""
        merged = HistoryBatch()
        for payload in payloads:
            merged.upserts += payload.upserts
            merged.closes += payload.closes
            merged.coverage += payload.coverage
            merged.gaps += payload.gaps
        return merged

    def write(self, payload: HistoryBatch) -> None:
        """One transaction (worker thread). A batch that failed is kept and written first
        next time (writes are idempotent and must stay in order: the lifecycle has moved on
        and will not send those rows again), up to RETRY_MAX_ROWS."""
        if self._failed is not None:
            if self._failed is not payload:  # the runner retrying this very batch: once
                payload = self.merge([self._failed, payload])
            self._failed = None
        if not len(payload):
            return
        assert self._writer is not None, "open() first"
        try:
            self._writer.apply(payload)
        except BatchSpooled as exc:  # durable in the writer's spool: not to be retried
            log.error("%s: %s", self.name, exc)
            return
        except Exception:
            if not self._keep_failed:
                raise
            if len(payload) <= RETRY_MAX_ROWS:
                self._failed = payload
            else:
                log.error("%s: %d row changes could not be written and are dropped (more "
                          "than %d pending)", self.name, len(payload), RETRY_MAX_ROWS)
            raise

    def to_spool(self, payload: HistoryBatch) -> bytes:
        """A batch as the `spill` policy keeps it on disk (the history spool's encoding)."""
        return spool.encode(payload)

    def from_spool(self, data: bytes) -> HistoryBatch:
        """The inverse of `to_spool`."""
        return spool.decode(data)

    def close(self) -> None:
        """Record how far coverage went, then close the store (open flows stay open)."""
        if self._store is None or self._writer is None:
            return
        try:
            self.write(HistoryBatch(coverage=self.lifecycle.coverage(time.time_ns())))
        except Exception:  # at shutdown: say so, and close anyway
            log.exception("%s: the final write failed", self.name)
        finally:
            self._writer.close()
            if self._writer is not self._store:
                self._store.close()
            self._store = self._writer = None


def sqlite_from_config(table: Table, context: SinkContext) -> HistorySink:
    """`type = "sqlite"`: path (default STATE_DIR/history.sqlite), retention, max_size,
    cache_size (SQLite's page cache: the daemon's memory levels off at about this much above
    its base once the file outgrows it; default 64M)."""
    path = table.text("path", str(context.state_dir / "history.sqlite"))
    retention = table.duration("retention", None)
    max_bytes = table.size("max_size", None)
    cache = table.size("cache_size", "64M", maximum=1 << 34)
    table.done()
    where = table.key_path("path")
    return HistorySink(path, context.netns, option=where,
                       store_factory=lambda: open_store(path, where, create=True,
                                                        retention_s=retention,
                                                        max_bytes=max_bytes,
                                                        cache_bytes=cache),
                       check=lambda: _check_sqlite(Path(path), where))


def _check_sqlite(path: Path, where: str) -> str:
    """An existing file must open as a store; a missing one needs a directory it can be
    created in (nothing is created by the check)."""
    if path.exists():
        open_store(str(path), where, create=False).close()
        return f"{path}: opened"
    directory = path.parent
    while not directory.exists():
        directory = directory.parent
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(where, f"{path} cannot be created: {directory} is not writable")
    return f"{path}: will be created (in {directory})"


def postgresql_from_config(table: Table, context: SinkContext) -> HistorySink:
    """`type = "postgresql"`: dsn (postgresql://…). While the database is away, batches
    spool under STATE_DIR/spool/ and are replayed in order."""
    from conntrail.history.store import is_postgres

    dsn = table.text("dsn")
    table.done()
    where = table.key_path("dsn")
    if not is_postgres(dsn):
        raise table.error("dsn", "must be a postgresql:// URL")
    spool_path = spool_dir(dsn, context.state_dir / "spool")

    def spooling_writer(first: HistoryStore) -> BatchWriter:
        from conntrail.history.pgwriter import SpoolingWriter

        opened = [first]  # the store open() connected (it proved the database reachable)
        return SpoolingWriter(lambda: opened.pop() if opened else
                              open_store(dsn, where, create=True), spool_path)

    return HistorySink(dsn, context.netns, option=where,
                       store_factory=lambda: open_store(dsn, where, create=True),
                       writer_factory=spooling_writer)

"""Writes that survive a database outage: spool while it is away, replay in order when back.

Nothing is lost: a batch goes to the store or, should the store be unreachable, to a local
fsynced spool. Nothing is duplicated: spooled batches are replayed oldest first before any
new one, and every write is an idempotent upsert, so a batch applied twice (a crash between
its commit and the spool's delete) changes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from conntrail.errors import BatchSpooled
from conntrail.history.postgres import StoreUnavailableError, describe
from conntrail.history.rows import HistoryBatch
from conntrail.history.spool import Spool
from conntrail.history.store import HistoryStore

log = logging.getLogger(__name__)

# What "the database is away" looks like: connection refused or lost, server shutting down,
# disk full… (libpq's and the server's operational errors), at connect or while writing.
UNAVAILABLE: tuple[type[Exception], ...] = (psycopg.OperationalError, StoreUnavailableError)


class SpoolingWriter:
    """apply() to the store, or to the spool while it is unreachable (retried with backoff);
    spooled batches always go to the store first, in order."""

    def __init__(self, store_factory: Callable[[], HistoryStore], spool_dir: Path | str, *,
                 min_backoff_s: float = 1.0, max_backoff_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._factory = store_factory
        self.spool = Spool(spool_dir)
        self._store: HistoryStore | None = None
        self._min_backoff = min_backoff_s
        self._max_backoff = max_backoff_s
        self._backoff = min_backoff_s
        self._clock = clock
        self._retry_at = 0.0
        self._spooling = False

    @property
    def store(self) -> HistoryStore | None:
        """The connected store, or None while the database is away."""
        return self._store

    def apply(self, batch: HistoryBatch) -> None:
        """Write a batch (after any spooled ones), or spool it; durable either way. An error
        that is not an outage propagates (after a failed replay, with the batch spooled
        behind the others, since it must not overtake them)."""
        try:
            ready = self.flush()
        except Exception as exc:
            self.spool.append(batch)
            raise BatchSpooled(f"replaying the spool failed ({exc}); this batch is kept "
                               "in the spool behind it") from exc
        except BaseException:
            self.spool.append(batch)
            raise
        if not ready:
            self.spool.append(batch)
            return
        store = self._store
        assert store is not None
        try:
            store.apply(batch)
        except UNAVAILABLE as exc:
            self._lost(exc)
            self.spool.append(batch)

    def flush(self) -> bool:
        """Replay the spool if the store is reachable (or due to be retried): True when the
        store is connected and the spool is empty."""
        store = self._connected()
        if store is None:
            return False
        if self.spool.pending():
            try:
                count = self.spool.replay(store.apply)
            except UNAVAILABLE as exc:
                self._lost(exc)
                return False
            log.info("history %s: replayed %d spooled batches, none lost", store.url, count)
        if self._spooling:
            self._spooling = False
            self._backoff = self._min_backoff
        return True

    def pending(self) -> int:
        """Batches waiting in the spool."""
        return self.spool.pending()

    def _connected(self) -> HistoryStore | None:
        """The store, reconnecting when the backoff allows; None while unreachable."""
        if self._store is None and self._clock() >= self._retry_at:
            try:
                self._store = self._factory()
            except UNAVAILABLE as exc:
                self._lost(exc)
        return self._store

    def _lost(self, exc: Exception) -> None:
        """Drop the connection and schedule the next attempt (doubling, up to the max)."""
        if self._store is not None:
            with contextlib.suppress(psycopg.Error):
                self._store.close()
            self._store = None
        self._retry_at = self._clock() + self._backoff
        if not self._spooling:
            self._spooling = True
            log.error("history store unreachable (%s): spooling batches to %s until it is "
                      "back (retrying in %.0f s)", describe(exc), self.spool.directory,
                      self._backoff)
        else:
            log.debug("history store still unreachable (%s); next try in %.0f s",
                      describe(exc), self._backoff)
        self._backoff = min(self._backoff * 2, self._max_backoff)

    def close(self) -> None:
        """Replay what the store can take now, then close both (the rest stays spooled for
        the next run)."""
        try:
            if self.spool.pending() and self._store is not None:
                self.flush()
        finally:
            if self._store is not None:
                with contextlib.suppress(psycopg.Error):
                    self._store.close()
                self._store = None
            self.spool.close()

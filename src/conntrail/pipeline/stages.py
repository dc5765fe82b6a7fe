"""The stage protocols every source, enricher, filter and sink follows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from conntrail.model import FlowEvent, Record

Enricher = Callable[[FlowEvent], FlowEvent]
"""Returns a new, richer event (events are immutable)."""

Filter = Callable[[FlowEvent], bool]
"""True keeps the event."""

Formatter = Callable[[Record], bytes]
"""Turns one record into the bytes a sink writes (pure, no I/O)."""


class Source(Protocol):
    """Produces records from the kernel (or a recording); readable through `fileno`."""

    name: str

    def start(self) -> None:
        """Acquire kernel resources; may emit start-up records on the first `read`."""

    def fileno(self) -> int:
        """An fd that becomes readable when `read` has something."""

    def read(self) -> list[Record]:
        """Everything available now, without blocking."""

    def stats(self) -> dict[str, int]:
        """Counters: received, decode errors, lost, resyncs…"""

    def stop(self) -> None:
        """Release kernel resources (idempotent)."""


class Sink(Protocol):
    """Consumes batches of records; runs in its own worker thread behind a queue."""

    name: str

    def open(self) -> None:
        """Acquire the destination (file, connection…)."""

    def write(self, batch: Sequence[Record]) -> None:
        """Write one batch; raise to report failure (the runner counts and retries)."""

    def close(self) -> None:
        """Flush and release (idempotent)."""

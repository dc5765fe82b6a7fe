"""What every history store offers (SQLite, PostgreSQL), the query values, and store choice."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from conntrail.errors import ConfigError
from conntrail.filters.ast import Expr
from conntrail.history.rows import Coverage, FlowRow, HistoryBatch

DEFAULT_PATH = Path("/var/lib/conntrail/history.sqlite")
STORE_ENV = "CONNTRAIL_STORE"  # overrides the default store (e.g. for unprivileged use)
SPOOL_ENV = "CONNTRAIL_SPOOL"  # where PostgreSQL batches wait while the database is away
# Attribution columns a query may select on: numbers exactly, text by glob.
ATTRIBUTE_COLUMNS = frozenset({"pid", "uid", "gid", "exe", "cmdline", "unit"})


@dataclass(frozen=True, slots=True)
class FlowQuery:
    """Which stored flows: those overlapping [start_ns, end_ns], matching the filter."""

    where: Expr | None = None
    start_ns: int | None = None
    end_ns: int | None = None
    # Attribution columns by exact value (pid, uid, gid) or glob (exe, unit, cmdline).
    attributes: dict[str, int | str] = field(default_factory=dict)
    state: str = "any"  # "any", "open" or "closed"
    limit: int | None = 1000
    newest_first: bool = False


@dataclass(frozen=True, slots=True)
class WhoQuery:
    """A post-NAT endpoint and a time window: who was behind it then?"""

    address: str
    port: int | None
    start_ns: int
    end_ns: int
    proto: int | None = None
    limit: int = 100


@dataclass(frozen=True, slots=True)
class WhoMatch:
    """A flow that used the endpoint, and how: 'snat' (an inside host's connection left
    through it), 'dnat' (it was forwarded to an inside host), 'local' (the address is the
    host's own, no NAT)."""

    role: str
    row: FlowRow

    @property
    def inside(self) -> tuple[str | None, int | None]:
        """The inside (pre-SNAT source, or post-DNAT destination) address and port."""
        row = self.row
        if self.role == "dnat":
            return row.reply_src, row.reply_sport
        return row.orig_src, row.orig_sport


class HistoryStore(Protocol):
    """A connection to one store: writes (the sink's worker thread) and reads (commands)."""

    url: str

    def load_open(self, netns: Sequence[str]) -> tuple[list[FlowRow], dict[str, int]]:
        """Rows still open for these namespaces, and each namespace's last coverage end."""

    def apply(self, batch: HistoryBatch) -> None:
        """Write one batch atomically; when it returns, the batch is durable."""

    def query(self, query: FlowQuery) -> Iterator[FlowRow]:
        """Stored flows matching, oldest first (or newest first), at most `limit`."""

    def who(self, query: WhoQuery) -> list[WhoMatch]:
        """Flows that used the endpoint in the window, newest first."""

    def coverage(self, start_ns: int, end_ns: int) -> list[Coverage]:
        """Recording sessions overlapping the window, oldest first."""

    def gaps(self, start_ns: int, end_ns: int) -> list[tuple[str, int, int | None]]:
        """(netns, at_ns, lost) for event losses recorded in the window."""

    def close(self) -> None:
        """Release the connection (idempotent)."""


def default_store() -> str:
    """$CONNTRAIL_STORE, else the embedded SQLite file under /var/lib/conntrail."""
    return os.environ.get(STORE_ENV) or str(DEFAULT_PATH)


def spool_dir(url: str, base: Path | None = None) -> Path:
    """The spool of one database: under `base` (else $CONNTRAIL_SPOOL, else
    /var/lib/conntrail/spool) a directory per DSN, so two databases never share (or replay
    into each other's) spool."""
    import hashlib

    if base is None:
        base = Path(os.environ.get(SPOOL_ENV) or DEFAULT_PATH.parent / "spool")
    return base / hashlib.sha256(url.encode()).hexdigest()[:16]


def is_postgres(url: str) -> bool:
    """True for a postgresql:// (or postgres://) DSN."""
    return url.startswith(("postgresql://", "postgres://"))


def open_store(url: str | None, option: str = "--store", *, create: bool,
               retention_s: float | None = None, max_bytes: int | None = None,
               cache_bytes: int | None = None) -> HistoryStore:
    """Open the store `url` names (an SQLite path or a PostgreSQL DSN).

    `create` makes (and migrates) the schema; readers pass False and get a clear error when
    there is no store yet. Retention by age or size applies to SQLite only.
    """
    target = url or default_store()
    if is_postgres(target):
        if retention_s or max_bytes:
            raise ConfigError("--retention/--max-size", "apply to the SQLite store only "
                              "(PostgreSQL: drop old partitions)")
        try:
            from conntrail.history.postgres import PostgresStore
        except ImportError as exc:
            raise ConfigError(option, f"PostgreSQL support is not installed ({exc}); install "
                              "it with: pip install 'conntrail[postgres]'") from exc
        return PostgresStore(target, option, create=create)
    from conntrail.history.sqlite import DEFAULT_CACHE, SqliteStore

    return SqliteStore(target.removeprefix("sqlite://"), option, create=create,
                       retention_s=retention_s, max_bytes=max_bytes,
                       cache_bytes=DEFAULT_CACHE if cache_bytes is None else cache_bytes)


def read_errors() -> tuple[type[Exception], ...]:
    """The exceptions a store may raise while reading (turned into one clear line)."""
    import sqlite3

    errors: list[type[Exception]] = [sqlite3.Error]
    try:
        import psycopg
    except ImportError:
        pass
    else:
        errors.append(psycopg.Error)
    return tuple(errors)

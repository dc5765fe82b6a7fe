"""The embedded history store: one SQLite file, WAL, one transaction per batch.

Schema choices, for the two questions asked of it:
- "who had public IP:port at T" — SNAT answers come from the reply tuple's destination, DNAT
  and local ones from the original tuple; each has an index (address, port, start, end) so
  the lookup is one index range, answered from the index alone until the matching rows.
- "flows in this window" — the unique key starts with start_ns, so a time window is a range.
Addresses are packed BLOBs (4 or 16 bytes): a CIDR is a byte range, and rows stay small.
Every write is an upsert on (start_ns, ct_id, netns): re-applying a batch changes nothing.
Durability: WAL with synchronous=FULL by default, so a batch reported written survives a
crash or power loss; `sync="normal"` trades the last batches on power loss for speed.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from conntrail.errors import ConfigError
from conntrail.history import sqlite_sql as sql
from conntrail.history.addr import pack, pack_optional, unpack, unpack_optional
from conntrail.history.rows import COLUMNS, Coverage, FlowRow, HistoryBatch
from conntrail.history.store import ATTRIBUTE_COLUMNS, FlowQuery, WhoMatch, WhoQuery

log = logging.getLogger(__name__)

_ADDR_INDEXES = tuple(COLUMNS.index(name) for name in sql.ADDRESS_COLUMNS)
RETENTION_EVERY_S = 60.0
RETENTION_CHUNK = 20_000


def _to_db(row: FlowRow) -> tuple[Any, ...]:
    """A row with its addresses packed."""
    values: list[Any] = list(row)
    i_src, i_dst, r_src, r_dst = _ADDR_INDEXES
    values[i_src] = pack(row.orig_src)
    values[i_dst] = pack(row.orig_dst)
    values[r_src] = pack_optional(row.reply_src)
    values[r_dst] = pack_optional(row.reply_dst)
    return tuple(values)


def _from_db(values: Sequence[Any]) -> FlowRow:
    """A stored row back into a FlowRow with text addresses."""
    out = list(values)
    i_src, i_dst, r_src, r_dst = _ADDR_INDEXES
    out[i_src] = unpack(out[i_src])
    out[i_dst] = unpack(out[i_dst])
    out[r_src] = unpack_optional(out[r_src])
    out[r_dst] = unpack_optional(out[r_dst])
    return FlowRow(*out)


class SqliteStore:
    """A HistoryStore in one SQLite file."""

    def __init__(self, path: str, option: str = "--store", *, create: bool,
                 sync: str = "full", retention_s: float | None = None,
                 max_bytes: int | None = None) -> None:
        self.url = path
        self.option = option
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        self._next_retention = 0.0
        self._db = self._connect(Path(path), create, sync)

    def _connect(self, path: Path, create: bool, sync: str) -> sqlite3.Connection:
        if not create and not path.exists():
            raise ConfigError(self.option, f"no history at {path} (nothing recorded there yet; "
                              f"record with: conntrail watch --store {path})")
        try:
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            # The sink opens on the pipeline thread and writes on its worker thread, one at a
            # time: the connection is never used concurrently.
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                 timeout=30.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'NORMAL' if sync == 'normal' else 'FULL'}")
            db.execute("PRAGMA cache_size=-65536")  # 64 MiB: the hot index pages stay cached
            if create:
                self._migrate(db)
            else:
                self._check_schema(db)
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(self.option, f"cannot open history {path}: {exc}") from exc
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = self._version(db)
        if version > sql.SCHEMA_VERSION:
            raise ConfigError(self.option, f"{self.url} has schema version {version}, newer "
                              f"than this conntrail knows ({sql.SCHEMA_VERSION}): upgrade")
        if version < sql.SCHEMA_VERSION:
            db.executescript(sql.SCHEMA)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                       (str(sql.SCHEMA_VERSION),))

    def _check_schema(self, db: sqlite3.Connection) -> None:
        if self._version(db) == 0:
            raise ConfigError(self.option, f"{self.url} is not a conntrail history")

    @staticmethod
    def _version(db: sqlite3.Connection) -> int:
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError:
            return 0  # no meta table: a fresh (or foreign) file
        return int(row[0]) if row else 0

    # -----------------------------------------------------------------------------------------
    # Writing
    # -----------------------------------------------------------------------------------------

    def load_open(self, netns: Sequence[str]) -> tuple[list[FlowRow], dict[str, int]]:
        """Open rows of these namespaces, and each namespace's last recorded moment."""
        rows: list[FlowRow] = []
        alive: dict[str, int] = {}
        for name in netns:
            cursor = self._db.execute(f"SELECT {sql.COLUMN_LIST} FROM flows "
                                      "WHERE end_ns IS NULL AND netns = ?", (name,))
            rows.extend(_from_db(values) for values in cursor)
            last = self._db.execute("SELECT max(end_ns) FROM coverage WHERE netns = ?",
                                    (name,)).fetchone()[0]
            if last is not None:
                alive[name] = int(last)
        return rows, alive

    def apply(self, batch: HistoryBatch) -> None:
        """One transaction: upserts, closes, coverage, gaps; then retention when due."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if batch.upserts:
                db.executemany(sql.UPSERT, map(_to_db, batch.upserts))
            if batch.closes:
                db.executemany(sql.CLOSE, [(op.end_ns, op.closed_by, op.start_ns, op.ct_id,
                                            op.netns) for op in batch.closes])
            if batch.coverage:
                db.executemany(sql.COVERAGE, batch.coverage)
            if batch.gaps:
                db.executemany("INSERT INTO gaps VALUES (?, ?, ?)", batch.gaps)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if (self.retention_s or self.max_bytes) and time.monotonic() >= self._next_retention:
            self._next_retention = time.monotonic() + RETENTION_EVERY_S
            self.enforce_retention(time.time_ns())

    def enforce_retention(self, now_ns: int) -> int:
        """Delete closed flows older than the retention age, then the oldest until the file
        is under its size cap; in chunks, so writers are never held up long. Rows deleted."""
        deleted = 0
        if self.retention_s:
            cutoff = now_ns - int(self.retention_s * 1e9)
            deleted += self._delete_before(cutoff)
            self._db.execute("DELETE FROM coverage WHERE end_ns < ?", (cutoff,))
            self._db.execute("UPDATE coverage SET start_ns = ? WHERE start_ns < ?",
                             (cutoff, cutoff))
            self._db.execute("DELETE FROM gaps WHERE at_ns < ?", (cutoff,))
        while self.max_bytes and self.used_bytes() > self.max_bytes:
            oldest = self._db.execute("SELECT start_ns FROM flows ORDER BY start_ns "
                                      f"LIMIT 1 OFFSET {RETENTION_CHUNK}").fetchone()
            if oldest is None:
                break
            removed = self._delete_before(int(oldest[0]))
            self._db.execute("UPDATE coverage SET start_ns = max(start_ns, ?)", (oldest[0],))
            deleted += removed
            if removed == 0:
                break
        if deleted:
            log.info("history %s: retention removed %d flows", self.url, deleted)
        return deleted

    def _delete_before(self, cutoff_ns: int) -> int:
        """Delete closed flows that ended before the cutoff, a chunk per transaction."""
        total = 0
        while True:
            cursor = self._db.execute(sql.DELETE_CHUNK, (cutoff_ns, cutoff_ns, RETENTION_CHUNK))
            total += cursor.rowcount
            if cursor.rowcount < RETENTION_CHUNK:
                return total

    def used_bytes(self) -> int:
        """Bytes in use by the database (its pages minus the free list)."""
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        size = self._db.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    # -----------------------------------------------------------------------------------------
    # Reading
    # -----------------------------------------------------------------------------------------

    def query(self, query: FlowQuery) -> Iterator[FlowRow]:
        """Flows overlapping the window that match the filter and attributes."""
        clauses, params = sql.window_clauses(query.start_ns, query.end_ns)
        if query.state != "any":
            clauses.append("end_ns IS NULL" if query.state == "open" else "end_ns IS NOT NULL")
        for name, value in query.attributes.items():
            if name not in ATTRIBUTE_COLUMNS:
                raise ConfigError(self.option, f"unknown attribute {name!r}")
            clauses.append(f"{name} GLOB ?" if isinstance(value, str) else f"{name} = ?")
            params.append(value)
        if query.where is not None:
            from conntrail.history.sqlwhere import Dialect, compile_where

            text, values = compile_where(query.where, Dialect.SQLITE)
            clauses.append(f"({text})")
            params.extend(values)
        statement = f"SELECT {sql.COLUMN_LIST} FROM flows"
        if clauses:
            statement += " WHERE " + " AND ".join(clauses)
        statement += f" ORDER BY start_ns {'DESC' if query.newest_first else 'ASC'}"
        if query.limit is not None:
            statement += f" LIMIT {int(query.limit)}"
        for values in self._db.execute(statement, params):
            yield _from_db(values)

    def who(self, query: WhoQuery) -> list[WhoMatch]:
        """SNAT, DNAT and local flows that used address[:port] in the window, newest first."""
        address = pack(query.address)
        matches: list[WhoMatch] = []
        for role, statement in sql.who_statements(query.port is not None,
                                                  query.proto is not None):
            params: list[Any] = [address]
            if query.port is not None:
                params.append(query.port)
            params += [query.end_ns, query.start_ns]
            if query.proto is not None:
                params.append(query.proto)
            params.append(query.limit)
            matches += [WhoMatch(role, _from_db(values))
                        for values in self._db.execute(statement, params)]
        matches.sort(key=lambda match: match.row.start_ns, reverse=True)
        return matches[:query.limit]

    def coverage(self, start_ns: int, end_ns: int) -> list[Coverage]:
        """Recording sessions overlapping the window, oldest first."""
        cursor = self._db.execute("SELECT session, netns, start_ns, end_ns FROM coverage "
                                  "WHERE start_ns <= ? AND end_ns >= ? ORDER BY start_ns",
                                  (end_ns, start_ns))
        return [Coverage(*values) for values in cursor]

    def gaps(self, start_ns: int, end_ns: int) -> list[tuple[str, int, int | None]]:
        """Event losses recorded in the window."""
        cursor = self._db.execute("SELECT netns, at_ns, lost FROM gaps WHERE at_ns "
                                  "BETWEEN ? AND ? ORDER BY at_ns", (start_ns, end_ns))
        return [(str(n), int(t), None if lost is None else int(lost)) for n, t, lost in cursor]

    def bounds(self) -> tuple[int, int] | None:
        """Earliest and latest recorded moments, or None for an empty store."""
        low, high = self._db.execute("SELECT min(start_ns), max(end_ns) FROM coverage")\
            .fetchone()
        return None if low is None else (int(low), int(high))

    def close(self) -> None:
        """Close the connection (idempotent); a WAL checkpoint happens on the last close."""
        self._db.close()

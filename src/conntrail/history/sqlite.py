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

import heapq
import itertools
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
from conntrail.history.store import FlowQuery, WhoMatch, WhoQuery

log = logging.getLogger(__name__)

_ADDR_INDEXES = tuple(COLUMNS.index(name) for name in sql.ADDRESS_COLUMNS)
RETENTION_EVERY_S = 60.0
# A moment needs 2 buckets per span; a long --from/--to window more for the short spans.
# Beyond this many, those buckets are scanned as one range instead (correct, slower).
WHO_MAX_BUCKETS = 64
RETENTION_CHUNK = 20_000


def _start(values: Sequence[Any]) -> int:
    return int(values[0])  # start_ns is the first column


def _to_db(row: FlowRow) -> tuple[Any, ...]:
    """A row with its addresses packed."""
    values: list[Any] = list(row)
    i_src, i_dst, r_src, r_dst = _ADDR_INDEXES
    values[i_src] = pack(row.orig_src)
    values[i_dst] = pack(row.orig_dst)
    values[r_src] = pack_optional(row.reply_src)
    values[r_dst] = pack_optional(row.reply_dst)
    return tuple(values)


def _closed_to_db(row: FlowRow) -> tuple[Any, ...]:
    """A closed row with its addresses packed, then its span and bucket."""
    span = sql.span(row.start_ns, row.end_ns or row.start_ns)
    return (*_to_db(row), span, sql.bucket(row.start_ns, span))


def _from_db(values: Sequence[Any]) -> FlowRow:
    """A stored row back into a FlowRow with text addresses."""
    out = list(values)
    i_src, i_dst, r_src, r_dst = _ADDR_INDEXES
    out[i_src] = unpack(out[i_src])
    out[i_dst] = unpack(out[i_dst])
    out[r_src] = unpack_optional(out[r_src])
    out[r_dst] = unpack_optional(out[r_dst])
    return FlowRow(*out)


DEFAULT_CACHE = 256 << 20  # bytes of SQLite page cache


class SqliteStore:
    """A HistoryStore in one SQLite file."""

    def __init__(self, path: str, option: str = "--store", *, create: bool,
                 sync: str = "full", retention_s: float | None = None,
                 max_bytes: int | None = None, cache_bytes: int = DEFAULT_CACHE) -> None:
        self.url = path
        self.option = option
        self.cache_bytes = cache_bytes
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
            # 256 MiB of page cache by default: the index pages that random keys (addresses,
            # ports) touch stay cached; checkpoint every 64 MiB of WAL rather than 4 MiB
            # (fewer, larger checkpoint fsyncs). Measured on 1M flows: see bench/README.md.
            # The cache is most of a long-running process's memory once the file outgrows
            # it: the daemon's sink sets it (cache_size), and RSS levels off there.
            db.execute(f"PRAGMA cache_size=-{max(1, self.cache_bytes // 1024)}")
            db.execute("PRAGMA wal_autocheckpoint=16384")
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
            cursor = self._db.execute(f"SELECT {sql.COLUMN_LIST} FROM open_flows "
                                      "WHERE netns = ?", (name,))
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
                self._upsert(batch.upserts)
            if batch.closes:
                keys = [(op.start_ns, op.ct_id, op.netns) for op in batch.closes]
                db.executemany(sql.MOVE_OPEN, [
                    (op.end_ns, op.closed_by, sql.span(op.start_ns, op.end_ns), *key)
                    for op, key in zip(batch.closes, keys, strict=True)])
                db.executemany(sql.DELETE_OPEN, keys)
            if batch.coverage:
                db.executemany(sql.COVERAGE, batch.coverage)
            if batch.gaps:
                db.executemany("INSERT INTO gaps VALUES (?, ?, ?)", batch.gaps)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back itself (disk full, I/O)
                db.execute("ROLLBACK")
            raise
        if (self.retention_s or self.max_bytes) and time.monotonic() >= self._next_retention:
            self._next_retention = time.monotonic() + RETENTION_EVERY_S
            self.enforce_retention(time.time_ns())

    def _upsert(self, rows: list[FlowRow]) -> None:
        """Open rows into open_flows; closed rows into flows, leaving open_flows. In order:
        a flow opened and closed within one batch ends up closed."""
        db = self._db
        opened = [_to_db(row) for row in rows if row.end_ns is None]
        if opened:
            db.executemany(sql.OPEN_UPSERT, opened)
        closed = [row for row in rows if row.end_ns is not None]
        if closed:
            db.executemany(sql.CLOSED_UPSERT, [_closed_to_db(row) for row in closed])
            db.executemany(sql.DELETE_OPEN, [(row.start_ns, row.ct_id, row.netns)
                                             for row in closed])

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
            # Until the last deleted flow ended, the store no longer knows everything: say so
            # to `who` by starting coverage there.
            gone_until = self._db.execute(sql.OLDEST_END, (RETENTION_CHUNK,)).fetchone()[0]
            removed = self._db.execute(sql.DELETE_OLDEST, (RETENTION_CHUNK,)).rowcount
            if gone_until is not None:
                self._db.execute("UPDATE coverage SET start_ns = max(start_ns, ?)",
                                 (gone_until,))
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
        """Flows overlapping the window that match the filter and attributes: the open ones
        and, per span, the closed ones, merged in start order."""
        clauses, params = self._filter_clauses(query)
        order = "DESC" if query.newest_first else "ASC"
        open_clauses, open_params = self._open_window(query)
        cursors = [self._select("open_flows", clauses + open_clauses, params + open_params,
                                order, query.limit)]
        if query.state != "open":
            cursors += [self._select("flows", clauses + window, params + window_params,
                                     order, query.limit)
                        for window, window_params in self._closed_windows(query)]
        if query.state == "closed":
            cursors = cursors[1:]
        merged = heapq.merge(*cursors, key=_start, reverse=query.newest_first)
        for values in itertools.islice(merged, query.limit):
            yield _from_db(values)

    def _filter_clauses(self, query: FlowQuery) -> tuple[list[str], list[Any]]:
        """WHERE clauses for the attribution columns and the filter expression."""
        from conntrail.history.sqlwhere import Dialect, compile_attributes, compile_where

        clauses, params = compile_attributes(query.attributes, Dialect.SQLITE, self.option)
        if query.where is not None:
            text, values = compile_where(query.where, Dialect.SQLITE)
            clauses.append(text)
            params.extend(values)
        return clauses, params

    @staticmethod
    def _open_window(query: FlowQuery) -> tuple[list[str], list[Any]]:
        """An open flow overlaps any window that ends after it began (it is alive now)."""
        if query.end_ns is None:
            return [], []
        return ["start_ns <= ?"], [query.end_ns]

    @staticmethod
    def _closed_windows(query: FlowQuery) -> list[tuple[list[str], list[Any]]]:
        """Per-span clauses for closed flows overlapping the window (one when unbounded
        below: then there is nothing to bound)."""
        high = query.end_ns if query.end_ns is not None else 1 << 62
        if query.start_ns is None:
            return [(["start_ns <= ?"], [high])]
        low = query.start_ns
        out: list[tuple[list[str], list[Any]]] = []
        for span in range(sql.MAX_SPAN + 1):
            first, last = sql.buckets_covering(low, high, span)
            out.append((["span = ?", "bucket BETWEEN ? AND ?", "start_ns <= ?", "end_ns >= ?"],
                        [span, first, last, high, low]))
        return out

    def _select(self, table: str, clauses: list[str], params: list[Any], order: str,
                limit: int | None) -> Iterator[Any]:
        statement = f"SELECT {sql.COLUMN_LIST} FROM {table}"
        if clauses:
            statement += " WHERE " + " AND ".join(clauses)
        statement += f" ORDER BY start_ns {order}"
        if limit is not None:
            statement += f" LIMIT {int(limit)}"
        return iter(self._db.execute(statement, params))

    def who(self, query: WhoQuery) -> list[WhoMatch]:
        """SNAT, DNAT and local flows that used address[:port] in the window, newest first:
        per role, the open flows and one tight index range per span of the closed ones."""
        self._db.execute("BEGIN")  # one snapshot: a close between probes cannot show twice
        try:
            return self._who(query)
        finally:
            self._db.execute("COMMIT")

    def _who(self, query: WhoQuery) -> list[WhoMatch]:
        address = pack(query.address)
        head = [address] + ([query.port] if query.port is not None else [])
        tail = ([query.proto] if query.proto is not None else []) + [query.limit]
        flags = (query.port is not None, query.proto is not None)
        matches: list[WhoMatch] = []
        for role, addr_col, port_col, nat in sql.WHO_ROLES:
            rows = list(self._db.execute(sql.who_open(addr_col, port_col, nat, *flags),
                                         [*head, query.end_ns, *tail]))
            probe = sql.who_closed(addr_col, port_col, nat, *flags)
            scan = sql.who_closed(addr_col, port_col, nat, *flags, ranged=True)
            window = [query.end_ns, query.start_ns]
            for span in range(sql.MAX_SPAN + 1):
                first, last = sql.buckets_covering(query.start_ns, query.end_ns, span)
                if last - first >= WHO_MAX_BUCKETS:  # a long window over short flows
                    rows += self._db.execute(scan, [span, first, last, *head, *window, *tail])
                    continue
                for bucket in range(first, last + 1):
                    rows += self._db.execute(probe, [span, bucket, *head, *window, *tail])
            matches += [WhoMatch(role, _from_db(values)) for values in rows]
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

    def close(self) -> None:
        """Close the connection (idempotent); a WAL checkpoint happens on the last close."""
        self._db.close()

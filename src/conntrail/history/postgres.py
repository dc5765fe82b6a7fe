"""The PostgreSQL history store (psycopg 3): one transaction per batch, COPY into a staging
table, then set-based upserts into the live `flows_open` and the partitioned `flows`.

Idempotence: the batch is merged to one row per key in Python, COPYed into a TEMP table and
moved with INSERT … ON CONFLICT (key) DO UPDATE, where new non-NULL values win for the
mutable columns and the rest keep the first write's. An open row of a flow already closed is
ignored, and a close applies only to an open row, so applying a batch twice (a replay after a
crash between commit and spool delete) changes nothing. The schema is in postgres_schema.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg import sql as pgsql

from conntrail.errors import ConfigError
from conntrail.history import postgres_schema as schema
from conntrail.history.rows import (
    COLUMNS,
    MUTABLE_COLUMNS,
    CloseOp,
    Coverage,
    FlowRow,
    HistoryBatch,
)
from conntrail.history.store import FlowQuery, WhoMatch, WhoQuery

log = logging.getLogger(__name__)

Connection = psycopg.Connection[tuple[Any, ...]]
_MUTABLE = tuple(COLUMNS.index(name) for name in MUTABLE_COLUMNS)
_END = COLUMNS.index("end_ns")
_EPOCH = dt.date(1970, 1, 1)
_BOUND = re.compile(r"FROM \((.+?)\) TO \((.+?)\)")
_INT64 = 1 << 63


class StoreUnavailableError(ConfigError):
    """The database could not be reached: a writer may spool and retry later."""


def redact(url: str) -> str:
    """The DSN without its password (for messages and logs)."""
    parts = urlsplit(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    items = parts.query.split("&") if parts.query else []
    kept = [item for item in items if item.split("=", 1)[0].lower() != "password"]
    if ":" not in userinfo and kept == items:
        return url
    user = userinfo.split(":", 1)[0]
    netloc = f"{user}@{hostport}" if user else hostport
    query = f"?{'&'.join(kept)}" if kept else ""
    fragment = f"#{parts.fragment}" if parts.fragment else ""
    return f"{parts.scheme}://{netloc}{parts.path}{query}{fragment}"


def describe(exc: BaseException) -> str:
    """libpq's message on one line, without psycopg's generic prefix."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    first = re.sub(r"^connection (is bad|failed): ", "", lines[0])
    hints = " ".join(lines[1:])
    return f"{first} ({hints[:1].lower()}{hints[1:]})" if hints else first


def merge_rows(rows: Iterable[FlowRow]) -> list[FlowRow]:
    """One row per key, in first-seen order, merged as the database would merge them."""
    merged: dict[tuple[str, int, int], FlowRow] = {}
    for row in rows:
        key = (row.netns, row.ct_id, row.start_ns)
        old = merged.get(key)
        merged[key] = row if old is None else merge_pair(old, row)
    return list(merged.values())


def merge_pair(old: FlowRow, new: FlowRow) -> FlowRow:
    """`new` written over `old`: new non-None mutable values win; an open row never
    reopens a closed one."""
    if old.end_ns is not None and new.end_ns is None:
        return old
    values: list[Any] = list(old)
    for index in _MUTABLE:
        if new[index] is not None:
            values[index] = new[index]
    return FlowRow(*values)


def _first_closes(closes: Iterable[CloseOp]) -> list[CloseOp]:
    """One close per key: the first (a later one would find the row closed already)."""
    first: dict[tuple[str, int, int], CloseOp] = {}
    for op in closes:
        first.setdefault((op.netns, op.ct_id, op.start_ns), op)
    return list(first.values())


def _merged_coverage(coverage: Iterable[Coverage]) -> list[Coverage]:
    spans: dict[tuple[int, str], Coverage] = {}
    for cov in coverage:
        old = spans.get((cov.session, cov.netns))
        spans[(cov.session, cov.netns)] = cov if old is None else cov._replace(
            start_ns=min(old.start_ns, cov.start_ns), end_ns=max(old.end_ns, cov.end_ns))
    return list(spans.values())


def _bound(text: str) -> int:
    text = text.strip().strip("'").upper()
    if text in ("MINVALUE", "MAXVALUE"):
        return -_INT64 if text == "MINVALUE" else _INT64
    return int(text)


def _free_range(start_ns: int, parts: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The start's day, clipped where a partition someone else made already covers it."""
    lo = start_ns // schema.DAY_NS * schema.DAY_NS
    hi = lo + schema.DAY_NS
    for p_lo, p_hi in parts:
        if p_hi <= start_ns:
            lo = max(lo, p_hi)
        elif p_lo > start_ns:
            hi = min(hi, p_lo)
    return lo, hi


def _partition_name(lo: int, hi: int) -> str:
    day = lo // schema.DAY_NS
    name = f"flows_{_EPOCH + dt.timedelta(days=day):%Y%m%d}"
    return name if (lo, hi) == (day * schema.DAY_NS, (day + 1) * schema.DAY_NS) else \
        f"{name}_{lo}"


class PostgresStore:
    """A HistoryStore in a PostgreSQL database (schema `conntrail`)."""

    def __init__(self, url: str, option: str = "--store", *, create: bool,
                 connect_timeout: int = 10) -> None:
        self.url = redact(url)  # shown in logs and errors: never the password
        self.option = option
        self._conn = self._connect(url, connect_timeout)
        self._staged = False
        self._parts: list[tuple[int, int]] = []
        self._days: set[int] = set()  # days wholly inside a known partition
        try:
            if create:
                self._migrate()
            else:
                self._check_schema()
            self._load_partitions()
        except psycopg.OperationalError as exc:
            self.close()
            raise StoreUnavailableError(option, f"lost {self.url}: {describe(exc)}") from exc
        except psycopg.Error as exc:
            self.close()
            raise ConfigError(option, f"cannot set up the history in {self.url}: "
                              f"{describe(exc)}") from exc
        except ConfigError:
            self.close()
            raise

    def _connect(self, url: str, timeout: int) -> Connection:
        try:
            params = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(self.option, f"not a valid PostgreSQL URL {self.url}: "
                              f"{describe(exc)}") from exc
        params.setdefault("connect_timeout", timeout)
        params.setdefault("application_name", "conntrail")
        try:
            return psycopg.connect(psycopg.conninfo.make_conninfo("", **params),
                                   autocommit=True)
        except psycopg.OperationalError as exc:
            raise StoreUnavailableError(self.option, f"cannot connect to {self.url}: "
                                   f"{describe(exc)}") from exc

    # -----------------------------------------------------------------------------------------
    # Schema and partitions
    # -----------------------------------------------------------------------------------------

    def _migrate(self) -> None:
        """Create or upgrade the schema, one transaction, one migrator at a time."""
        conn = self._conn
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (schema.LOCK_KEY,))
            for statement in schema.BOOTSTRAP:
                conn.execute(statement)
            version = self._version()
            if version > schema.SCHEMA_VERSION:
                raise ConfigError(self.option, f"{self.url} has history schema version "
                                  f"{version}, newer than this conntrail knows "
                                  f"({schema.SCHEMA_VERSION}): upgrade conntrail")
            for number, (description, statements) in enumerate(schema.MIGRATIONS, 1):
                if number <= version:
                    continue
                for statement in statements:
                    conn.execute(statement)
                conn.execute("INSERT INTO conntrail.schema_version (version, description) "
                             "VALUES (%s, %s)", (number, description))
                log.info("history %s: schema migrated to version %d", self.url, number)

    def _check_schema(self) -> None:
        row = self._conn.execute("SELECT to_regclass('conntrail.schema_version')").fetchone()
        if row is None or row[0] is None:
            raise ConfigError(self.option, f"no conntrail history in {self.url} (nothing "
                              "recorded there yet; record with: conntrail watch --store URL)")
        version = self._version()
        if version != schema.SCHEMA_VERSION:
            advice = "upgrade conntrail" if version > schema.SCHEMA_VERSION else \
                "run the recorder once to migrate it"
            raise ConfigError(self.option, f"{self.url} has history schema version {version}, "
                              f"this conntrail reads version {schema.SCHEMA_VERSION}: {advice}")

    def _version(self) -> int:
        row = self._conn.execute(schema.VERSION).fetchone()
        return int(row[0]) if row else 0

    def _load_partitions(self) -> None:
        """Read the partitions of `flows` (their bounds, whatever made them)."""
        parts = []
        for (text,) in self._conn.execute(schema.PARTITIONS):
            found = _BOUND.search(str(text))
            if found:  # no match: a DEFAULT partition, which we never create nor use
                parts.append((_bound(found.group(1)), _bound(found.group(2))))
        self._parts = sorted(parts)
        self._days = {day for lo, hi in parts
                      for day in range(-(-lo // schema.DAY_NS), hi // schema.DAY_NS)
                      if hi - lo < 4000 * schema.DAY_NS}

    def _covered(self, start_ns: int) -> bool:
        if start_ns // schema.DAY_NS in self._days:
            return True
        return any(lo <= start_ns < hi for lo, hi in self._parts)

    def _ensure_partitions(self, starts: Iterable[int]) -> None:
        """Create the daily partitions these start times need, and the next day's: creating
        one locks `flows` briefly, better done a day early than under midnight's load.
        Committed before the batch writes, so the cache never claims what does not exist."""
        days = {start // schema.DAY_NS for start in starts}
        if days <= self._days and {day + 1 for day in days} <= self._days:
            return  # the usual case: a set lookup per distinct day, not per row
        wanted = {start for start in starts if start // schema.DAY_NS not in self._days}
        wanted |= {(day + 1) * schema.DAY_NS for day in days}
        missing = sorted(start for start in wanted if not self._covered(start))
        if not missing:
            return
        conn = self._conn
        with conn.transaction():
            # Waiting behind a long reader must not stall the writer forever: time out, and
            # the batch is retried (a spooling writer spools it meanwhile).
            conn.execute("SET LOCAL lock_timeout = '10s'")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (schema.LOCK_KEY,))
            self._load_partitions()  # another writer may have made some meanwhile
            for start in missing:
                if self._covered(start):
                    continue
                lo, hi = _free_range(start, self._parts)
                conn.execute(pgsql.SQL(
                    "CREATE TABLE conntrail.{} PARTITION OF conntrail.flows "
                    "FOR VALUES FROM ({}) TO ({})").format(
                    pgsql.Identifier(_partition_name(lo, hi)), pgsql.Literal(lo),
                    pgsql.Literal(hi)))
                self._parts = sorted([*self._parts, (lo, hi)])
                if hi - lo == schema.DAY_NS:
                    self._days.add(lo // schema.DAY_NS)
                log.debug("history %s: partition %s created", self.url,
                          _partition_name(lo, hi))

    # -----------------------------------------------------------------------------------------
    # Writing
    # -----------------------------------------------------------------------------------------

    def load_open(self, netns: Sequence[str]) -> tuple[list[FlowRow], dict[str, int]]:
        """Open rows of these namespaces, and each namespace's last recorded moment."""
        names = list(netns)
        rows = [FlowRow(*values) for values in self._conn.execute(
            f"SELECT {schema.SELECT_LIST} FROM conntrail.flows_open WHERE netns = ANY(%s)",
            (names,))]
        alive = {str(name): int(last) for name, last in self._conn.execute(
            "SELECT netns, max(end_ns) FROM conntrail.coverage WHERE netns = ANY(%s) "
            "GROUP BY netns", (names,))}
        return rows, alive

    def apply(self, batch: HistoryBatch) -> None:
        """One transaction: upserts, closes, coverage, gaps; committed when this returns."""
        upserts = merge_rows(batch.upserts)
        closes = _first_closes(batch.closes)
        starts = [row.start_ns for row in upserts if row.end_ns is not None]
        starts += [op.start_ns for op in closes]
        self._ensure_partitions(starts)
        try:
            self._write(upserts, closes, batch)
        except psycopg.errors.CheckViolation as exc:
            if "no partition" not in str(exc):
                raise
            # A partition was dropped behind our back (retention by hand): learn, retry once.
            self._load_partitions()
            self._ensure_partitions(starts)
            self._write(upserts, closes, batch)

    def _write(self, upserts: list[FlowRow], closes: list[CloseOp],
               batch: HistoryBatch) -> None:
        conn = self._conn
        if not self._staged:
            conn.execute(schema.STAGE)
            self._staged = True
        with conn.transaction():
            if upserts:
                with conn.cursor() as cursor, cursor.copy(schema.COPY_STAGE) as copy:
                    for row in upserts:
                        copy.write_row(row)
                if any(row[_END] is None for row in upserts):
                    conn.execute(schema.UPSERT_OPEN)
                if any(row[_END] is not None for row in upserts):
                    conn.execute(schema.UPSERT_CLOSED)
            if closes:
                conn.execute(schema.CLOSE, [list(column) for column in zip(*closes,
                                                                           strict=True)])
            if batch.coverage:
                spans = _merged_coverage(batch.coverage)
                conn.execute(schema.COVERAGE, [list(column) for column in zip(*spans,
                                                                              strict=True)])
            if batch.gaps:
                conn.execute(schema.GAPS, [list(column) for column in zip(*batch.gaps,
                                                                          strict=True)])

    # -----------------------------------------------------------------------------------------
    # Reading
    # -----------------------------------------------------------------------------------------

    def query(self, query: FlowQuery) -> Iterator[FlowRow]:
        """Flows overlapping the window that match the filter and attributes."""
        clauses: list[str] = []
        params: list[Any] = []
        if query.end_ns is not None:
            clauses.append("start_ns <= %s")
            params.append(query.end_ns)
        if query.start_ns is not None:
            clauses.append("(end_ns IS NULL OR end_ns >= %s)")
            params.append(query.start_ns)
        from conntrail.history.sqlwhere import Dialect, compile_attributes, compile_where

        attribute_clauses, attribute_params = compile_attributes(
            query.attributes, Dialect.POSTGRES, self.option)
        clauses += attribute_clauses
        params += attribute_params
        if query.where is not None:
            text, values = compile_where(query.where, Dialect.POSTGRES)
            clauses.append(text)
            params.extend(values)
        order = "DESC" if query.newest_first else "ASC"
        statement = f"SELECT {schema.SELECT_LIST} FROM {schema.flows_source(query.state)}"
        if clauses:
            statement += " WHERE " + " AND ".join(clauses)
        statement += f" ORDER BY start_ns {order}, netns {order}, ct_id {order}"
        if query.limit is not None:
            statement += f" LIMIT {int(query.limit)}"
        return self._stream(statement, params)

    def _stream(self, statement: str, params: Sequence[Any]) -> Iterator[FlowRow]:
        """Rows through a server-side cursor: a large answer never sits whole in memory."""
        with self._conn.transaction(), self._conn.cursor(name="conntrail_query") as cursor:
            cursor.itersize = 2000
            cursor.execute(statement, params)
            for values in cursor:
                yield FlowRow(*values)

    def who(self, query: WhoQuery) -> list[WhoMatch]:
        """SNAT, DNAT and local flows that used address[:port] in the window, newest first."""
        per_role: list[Any] = [query.address]
        if query.port is not None:
            per_role.append(query.port)
        per_role += [query.start_ns, query.end_ns, query.end_ns, query.start_ns]
        if query.proto is not None:
            per_role.append(query.proto)
        params = per_role * len(schema.WHO_ROLES) + [query.limit]
        statement = schema.who_statement(query.port is not None, query.proto is not None)
        return [WhoMatch(str(values[0]), FlowRow(*values[1:]))
                for values in self._conn.execute(statement, params)]

    def coverage(self, start_ns: int, end_ns: int) -> list[Coverage]:
        """Recording sessions overlapping the window, oldest first."""
        cursor = self._conn.execute(
            "SELECT session, netns, start_ns, end_ns FROM conntrail.coverage "
            "WHERE start_ns <= %s AND end_ns >= %s ORDER BY start_ns, session, netns",
            (end_ns, start_ns))
        return [Coverage(*values) for values in cursor]

    def gaps(self, start_ns: int, end_ns: int) -> list[tuple[str, int, int | None]]:
        """Event losses recorded in the window."""
        cursor = self._conn.execute(
            "SELECT netns, at_ns, lost FROM conntrail.gaps WHERE at_ns BETWEEN %s AND %s "
            "ORDER BY at_ns, netns", (start_ns, end_ns))
        return [(str(n), int(t), None if lost is None else int(lost)) for n, t, lost in cursor]

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._conn.close()


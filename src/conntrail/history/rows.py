"""Flow rows and the lifecycle that builds them from events: sans-IO, no store in sight.

A flow is one row, keyed by (netns, ct_id, start_ns). It is opened by NEW (or found in a
table dump) and closed by DESTROY with counters and the kernel's stop time. A NEW event carries
no start timestamp (the kernel sends CTA_TIMESTAMP_START only with DESTROY and dumps), so the
key's start is the first time we knew of the flow: the NEW's kernel event stamp (microseconds
after the real start), the kernel start of a dumped flow, or the start of a DESTROY whose NEW
we never saw. The key never changes afterwards, which makes every write an idempotent upsert:
replaying a batch twice changes nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from conntrail.model import (
    Attribution,
    Counters,
    CtStatus,
    EventKind,
    Flow,
    FlowEvent,
    FlowTuple,
    LossNotice,
    TableSnapshot,
)


class ClosedBy(enum.IntEnum):
    """Why a row's end is what it is."""

    OPEN = 0  # still open (end_ns is NULL)
    DESTROY = 1  # the kernel's DESTROY event: end_ns is the kernel's stop time
    VANISHED = 2  # missing from a later table dump: ended at or before end_ns
    SUPERSEDED = 3  # its conntrack id was reused by a new flow: ended at or before end_ns
    UNRECORDED = 4  # ended while nobody recorded: alive at end_ns (the last record), gone after

    @property
    def label(self) -> str:
        """Lowercase name for output."""
        return self.name.lower()


class NatType(enum.IntEnum):
    """NAT applied to a flow, from its status bits (stored as this number)."""

    NONE = 0
    SNAT = 1
    DNAT = 2
    BOTH = 3

    @property
    def label(self) -> str:
        """Lowercase name for output."""
        return self.name.lower()


_SNAT, _DNAT = int(CtStatus.SRC_NAT), int(CtStatus.DST_NAT)
_ANSWERED = int(CtStatus.SEEN_REPLY | CtStatus.ASSURED)


def nat_code(status: int) -> int:
    """NatType number of a status bitmap."""
    return (1 if status & _SNAT else 0) | (2 if status & _DNAT else 0)


class FlowRow(NamedTuple):
    """One stored flow. Addresses are text; the stores convert them to their own types.

    `start_ns` is the key's start (see the module docstring); `end_ns` is None while open.
    The attribution columns (pid … unit) stay None until an attribution stage fills them.
    """

    start_ns: int
    end_ns: int | None
    closed_by: int
    netns: str
    ct_id: int
    family: int
    proto: int
    orig_src: str
    orig_dst: str
    orig_sport: int | None
    orig_dport: int | None
    reply_src: str | None
    reply_dst: str | None
    reply_sport: int | None
    reply_dport: int | None
    icmp_type: int | None
    icmp_code: int | None
    icmp_id: int | None
    nat: int
    status: int
    state: int | None
    mark: int | None
    zone: int | None
    labels: str | None
    orig_packets: int | None
    orig_bytes: int | None
    reply_packets: int | None
    reply_bytes: int | None
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    exe: str | None = None
    cmdline: str | None = None
    unit: str | None = None

    @property
    def key(self) -> tuple[str, int, int]:
        """The row's identity."""
        return (self.netns, self.ct_id, self.start_ns)


COLUMNS: tuple[str, ...] = FlowRow._fields
KEY_COLUMNS = ("netns", "ct_id", "start_ns")
# Columns a later write may change; the rest are fixed when the row is first written.
MUTABLE_COLUMNS = ("end_ns", "closed_by", "status", "state", "mark", "labels", "orig_packets",
                   "orig_bytes", "reply_packets", "reply_bytes", "pid", "uid", "gid", "exe",
                   "cmdline", "unit")


def build_row(flow: Flow, netns: str, start_ns: int, end_ns: int | None,
              closed_by: ClosedBy, who: Attribution | None = None) -> FlowRow:
    """The row for a flow as one event saw it (and who made it, when known)."""
    orig, reply = flow.orig, flow.reply
    status = int(flow.status)
    c_orig, c_reply = flow.counters_orig, flow.counters_reply
    return FlowRow(
        start_ns, end_ns, int(closed_by), netns, flow.ct_id or 0, orig.family, orig.proto,
        orig.src, orig.dst, orig.sport, orig.dport,
        None if reply is None else reply.src, None if reply is None else reply.dst,
        None if reply is None else reply.sport, None if reply is None else reply.dport,
        orig.icmp_type, orig.icmp_code, orig.icmp_id,
        nat_code(status), status, flow.proto_state, flow.mark,
        flow.zone if flow.zone is not None else orig.zone,
        None if flow.labels is None else f"{flow.labels:x}",
        None if c_orig is None else c_orig.packets, None if c_orig is None else c_orig.bytes,
        None if c_reply is None else c_reply.packets, None if c_reply is None else c_reply.bytes,
        *(_NO_ATTRIBUTION if who is None else
          (who.pid, who.uid, who.gid, who.exe, who.cmdline, who.unit)),
    )


_NO_ATTRIBUTION = (None, None, None, None, None, None)


class CloseOp(NamedTuple):
    """Close a row that is still open (never touches a row already closed)."""

    netns: str
    ct_id: int
    start_ns: int
    end_ns: int
    closed_by: int


class Coverage(NamedTuple):
    """The recorder ran for `netns` from start_ns to (at least) end_ns: its session."""

    session: int
    netns: str
    start_ns: int
    end_ns: int


class Gap(NamedTuple):
    """Events of `netns` were lost at `at_ns` (`lost` of them, None when unknown)."""

    netns: str
    at_ns: int
    lost: int | None


@dataclass(slots=True)
class HistoryBatch:
    """What one batch of records changes in the store; applied as one transaction, in this
    order: upserts, closes, coverage, gaps."""

    upserts: list[FlowRow] = field(default_factory=list)
    closes: list[CloseOp] = field(default_factory=list)
    coverage: list[Coverage] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.upserts) + len(self.closes) + len(self.coverage) + len(self.gaps)


@dataclass(slots=True)
class OpenEntry:
    """What the lifecycle remembers of an open flow."""

    start_ns: int
    orig: tuple[object, ...]  # the original tuple, to tell a reused conntrack id
    # For a flow left open by an earlier run: when that run last wrote. Should the next dump
    # not contain the flow, that is its end as far as the record can tell.
    last_seen_ns: int | None = None
    answered: bool = False  # the stored status already says the other side replied


def _orig_key(flow: Flow) -> tuple[object, ...]:
    o = flow.orig
    return (o.proto, o.src, o.dst, o.sport, o.dport, o.icmp_type, o.icmp_code, o.icmp_id)


def _row_orig_key(row: FlowRow) -> tuple[object, ...]:
    return (row.proto, row.orig_src, row.orig_dst, row.orig_sport, row.orig_dport,
            row.icmp_type, row.icmp_code, row.icmp_id)


GONE_MAX = 65536


@dataclass
class Lifecycle:
    """Turns events (in order) into row operations; remembers open flows per namespace.

    Bounded by the kernel's own table: an entry lives from NEW (or dump) to DESTROY, and a
    table dump (TableSnapshot) closes the entries the kernel no longer has.
    """

    session: int
    netns: Sequence[str]
    started_ns: int
    heartbeat_ns: int = 1_000_000_000  # how often coverage is extended (its resolution)
    _last_beat: int = 0
    _open: dict[tuple[str, int], OpenEntry] = field(default_factory=dict)
    _dumped: dict[str, set[int]] = field(default_factory=dict)
    # Flows we closed without their DESTROY (vanished from a dump, or superseded by a NEW
    # reusing their id): the DESTROY may still be on its way (the kernel sends it when the
    # entry is freed, which can trail the id's reuse), and must land on the same row rather
    # than make a second one. Oldest forgotten first beyond GONE_MAX.
    _gone: dict[tuple[str, int], OpenEntry] = field(default_factory=dict)

    def seed(self, rows: Sequence[FlowRow], alive_ns: dict[str, int]) -> None:
        """Flows the store still holds open from an earlier run; `alive_ns` per netns is
        when that run last wrote (their end, should the next dump not contain them)."""
        for row in rows:
            seen = max(row.start_ns, alive_ns.get(row.netns, row.start_ns))
            self._open[(row.netns, row.ct_id)] = OpenEntry(row.start_ns, _row_orig_key(row),
                                                           seen)

    def open_count(self) -> int:
        """Open flows remembered."""
        return len(self._open)

    def feed(self, records: Sequence[object], now_ns: int) -> HistoryBatch:
        """The operations one batch of records implies, plus a coverage heartbeat."""
        batch = HistoryBatch()
        for record in records:
            if type(record) is FlowEvent:
                self._event(record, batch)
            else:
                self._mark(record, batch)
        if now_ns - self._last_beat >= self.heartbeat_ns or batch.closes:
            batch.coverage.extend(self.coverage(now_ns))
        return batch

    def coverage(self, now_ns: int) -> list[Coverage]:
        """This session's coverage up to now (written at most once per heartbeat, and at the
        end): `who` uses it to tell "no flow" from "not recording then"."""
        self._last_beat = now_ns
        return [Coverage(self.session, name, self.started_ns, now_ns) for name in self.netns]

    def _event(self, event: FlowEvent, batch: HistoryBatch) -> None:
        kind = event.kind
        if kind is EventKind.DESTROY:
            self._destroy(event, batch)
        elif kind is EventKind.NEW or kind is EventKind.DUMP:
            self._open_flow(event, batch)
        elif kind is EventKind.UPDATE:
            self._update(event, batch)

    def _update(self, event: FlowEvent, batch: HistoryBatch) -> None:
        """The first sign of a reply is stored at once (one write per answered flow), so an
        open flow says whether it was answered (inventory's "confirmed"); other updates
        wait for DESTROY, which brings the final status and counters."""
        flow = event.flow
        if not int(flow.status) & _ANSWERED:
            return
        key = (event.netns, flow.ct_id or 0)
        entry = self._open.get(key)
        if entry is None or entry.answered or entry.orig != _orig_key(flow):
            return
        entry.answered = True
        batch.upserts.append(build_row(flow, event.netns, entry.start_ns, None, ClosedBy.OPEN,
                                       event.who))

    def _open_flow(self, event: FlowEvent, batch: HistoryBatch) -> None:
        flow = event.flow
        key = (event.netns, flow.ct_id or 0)
        orig = _orig_key(flow)
        when = event.time_ns
        if event.kind is EventKind.DUMP:
            self._dumped.setdefault(event.netns, set()).add(key[1])
        entry = self._open.get(key)
        if entry is not None and entry.orig != orig:
            # The kernel reuses an id only once its flow is gone: it ended before this one.
            batch.closes.append(CloseOp(key[0], key[1], entry.start_ns,
                                        max(entry.start_ns, when), ClosedBy.SUPERSEDED))
            self._remember_gone(key, entry)
            entry = None
        if entry is None:
            entry = OpenEntry(flow.start_ns or when, orig)
            self._open[key] = entry
        else:
            entry.last_seen_ns = None  # alive now: the earlier run's bound no longer applies
        entry.answered = entry.answered or bool(int(flow.status) & _ANSWERED)
        batch.upserts.append(build_row(flow, event.netns, entry.start_ns, None, ClosedBy.OPEN,
                                       event.who))

    def _destroy(self, event: FlowEvent, batch: HistoryBatch) -> None:
        flow = event.flow
        key = (event.netns, flow.ct_id or 0)
        entry = self._open.get(key)
        end = event.time_ns
        if entry is not None and entry.orig == _orig_key(flow):
            del self._open[key]
            start = entry.start_ns
        elif (gone := self._gone.pop(key, None)) is not None and gone.orig == _orig_key(flow):
            start = gone.start_ns  # closed as vanished a moment ago: now we know its end
        else:  # a flow older than us, or its NEW was lost
            start = flow.start_ns or end
        batch.upserts.append(build_row(flow, event.netns, start, max(end, start),
                                       ClosedBy.DESTROY, event.who))

    def _mark(self, record: object, batch: HistoryBatch) -> None:
        if isinstance(record, TableSnapshot):
            self._snapshot(record, batch)
        elif isinstance(record, LossNotice):
            batch.gaps.append(Gap(record.netns, record.received_ns, record.lost))

    def _remember_gone(self, key: tuple[str, int], entry: OpenEntry) -> None:
        if len(self._gone) >= GONE_MAX:
            del self._gone[next(iter(self._gone))]
        self._gone[key] = entry

    def _snapshot(self, snap: TableSnapshot, batch: HistoryBatch) -> None:
        """Close what the dump did not contain, if it began before the dump did (a flow
        alive through the whole dump is always in it). Its end is not known: we store the
        dump's time (an upper bound) or the earlier run's last write (a lower bound), and
        say which."""
        seen = self._dumped.pop(snap.netns, set())
        gone = [key for key, entry in self._open.items()
                if key[0] == snap.netns and key[1] not in seen
                and entry.start_ns < snap.taken_ns]
        for key in gone:
            entry = self._open.pop(key)
            self._remember_gone(key, entry)
            if entry.last_seen_ns is None:  # gone between our NEW and this dump
                end, why = snap.taken_ns, ClosedBy.VANISHED
            else:  # left open by an earlier run: alive at its last record, gone by now
                end, why = entry.last_seen_ns, ClosedBy.UNRECORDED
            batch.closes.append(CloseOp(key[0], key[1], entry.start_ns,
                                        max(end, entry.start_ns), why))


def flow_of_row(row: FlowRow) -> Flow:
    """The flow a stored row describes (the inverse of `build_row`, as far as rows keep)."""
    orig = FlowTuple(row.family, row.proto, row.orig_src, row.orig_dst, row.orig_sport,
                     row.orig_dport, row.icmp_type, row.icmp_code, row.icmp_id)
    reply = None
    if row.reply_src is not None and row.reply_dst is not None:
        reply = FlowTuple(row.family, row.proto, row.reply_src, row.reply_dst,
                          row.reply_sport, row.reply_dport, row.icmp_type, row.icmp_code,
                          row.icmp_id)
    return Flow(orig=orig, reply=reply, status=CtStatus(row.status), proto_state=row.state,
                mark=row.mark, zone=row.zone,
                labels=None if row.labels is None else int(row.labels, 16), ct_id=row.ct_id,
                counters_orig=_counters(row.orig_packets, row.orig_bytes),
                counters_reply=_counters(row.reply_packets, row.reply_bytes),
                start_ns=row.start_ns, stop_ns=row.end_ns)


def _counters(packets: int | None, nbytes: int | None) -> Counters | None:
    return None if packets is None or nbytes is None else Counters(packets, nbytes)

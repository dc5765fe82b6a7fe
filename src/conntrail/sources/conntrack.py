"""The conntrack source: start-up dump, live NEW/UPDATE/DESTROY events, resync after loss."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

from conntrail.errors import ConntrailError, DecodeError, NetlinkError
from conntrail.kernel.netns import NetnsRef
from conntrail.kernel.socket import (
    NFNLGRP_CONNTRACK_DESTROY,
    NFNLGRP_CONNTRACK_NEW,
    NFNLGRP_CONNTRACK_UPDATE,
    BufferPolicy,
    NetlinkSocket,
    kernel_drops,
)
from conntrail.model import AF_UNSPEC, EventKind, FlowEvent, LossNotice, Record, TableSnapshot
from conntrail.netlink.conntrack import Control, DumpRequest, decode_datagram, encode_dump_request
from conntrail.netlink.wire import split_messages

log = logging.getLogger(__name__)

_GROUPS = {
    EventKind.NEW: NFNLGRP_CONNTRACK_NEW,
    EventKind.UPDATE: NFNLGRP_CONNTRACK_UPDATE,
    EventKind.DESTROY: NFNLGRP_CONNTRACK_DESTROY,
}
DUMP_TIMEOUT_S = 30.0
RESYNC_RETRY_S = 5.0


def multicast_groups(kinds: frozenset[EventKind]) -> tuple[int, ...]:
    """The nfnetlink groups that deliver these event kinds."""
    return tuple(_GROUPS[kind] for kind in sorted(kinds) if kind in _GROUPS)


def _is_event(item: FlowEvent | Control) -> bool:
    return type(item) is FlowEvent


@dataclass(frozen=True, slots=True)
class ConntrackOptions:
    """What to listen to and how: event kinds, start-up dump, buffer policy, reliability."""

    kinds: frozenset[EventKind] = frozenset(_GROUPS)
    dump: bool = False
    buffer: BufferPolicy = field(default_factory=BufferPolicy)
    reliable: bool = False
    batch: int = 256


@dataclass(slots=True)
class ConntrackStats:
    """Per-source counters, all monotonic."""

    received: int = 0
    dumped: int = 0
    decode_errors: int = 0
    enobufs: int = 0
    resyncs: int = 0
    lost: int = 0


class ConntrackSource:
    """Conntrack events of one network namespace."""

    def __init__(self, netns: NetnsRef, options: ConntrackOptions | None = None) -> None:
        self.netns = netns
        self.options = options or ConntrackOptions()
        self.name = f"conntrack[{netns.name or 'current'}]"
        self.counters = ConntrackStats()
        self._events: NetlinkSocket | None = None
        self._pending: list[Record] = []
        self._seq = int(time.time())
        self._drops_seen = 0
        self._resync_due = False
        self._resync_after = 0.0

    def start(self) -> None:
        """Subscribe first, then dump: a flow can appear twice, but none is missed."""
        groups = multicast_groups(self.options.kinds)
        self._events = NetlinkSocket(self.netns, groups, self.options.buffer)
        if self.options.reliable:
            self._events.set_reliable()
        log.info("%s: listening for %s", self.name,
                 ",".join(kind.label for kind in sorted(self.options.kinds)))
        if self.options.dump:
            try:
                self._pending.extend(self.dump())
            except BaseException:
                self.stop()
                raise

    def fileno(self) -> int:
        """The event socket's fd."""
        assert self._events is not None, "start() first"
        return self._events.fileno()

    def dump(self) -> list[Record]:
        """Read the whole conntrack table (every family, one request) on a separate socket,
        then a TableSnapshot mark (only when the dump completed)."""
        out: list[Record] = []
        taken = time.time_ns()
        with NetlinkSocket(self.netns, (), self.options.buffer) as sock:
            self._seq += 1
            sock.send(encode_dump_request(DumpRequest(AF_UNSPEC, self._seq)))
            complete = self._read_dump(sock, self._seq, out)
        self.counters.dumped += len(out)
        if complete:
            out.append(TableSnapshot(self.netns.name, len(out), taken))
        return out

    def _read_dump(self, sock: NetlinkSocket, seq: int, out: list[Record]) -> bool:
        """Append the dumped flows to `out`; True when the kernel said the dump is done."""
        deadline = time.monotonic() + DUMP_TIMEOUT_S
        now = time.time_ns()
        while time.monotonic() < deadline:
            if not sock.wait(0.5):
                continue
            for datagram in sock.recv_batch():
                for item in self._decode(datagram, now):
                    if isinstance(item, Control):
                        if item.seq == seq and item.kind in ("done", "ack"):
                            return True
                        if item.kind == "error":
                            raise NetlinkError(item.errno, "conntrack table dump")
                    else:
                        out.append(item)
        log.error("conntrack dump in %s did not finish in %.0f s", self.name, DUMP_TIMEOUT_S)
        return False

    def _decode(self, datagram: bytes, now: int) -> list[FlowEvent | Control]:
        try:
            return decode_datagram(datagram, self.netns.name, now)
        except DecodeError as exc:
            self.counters.decode_errors += 1
            log.error("%s: undecodable message skipped: %s", self.name, exc)
            return self._decode_each(datagram, now)

    def _decode_each(self, datagram: bytes, now: int) -> list[FlowEvent | Control]:
        """Keep the good messages of a datagram with a bad one (when the framing holds)."""
        out: list[FlowEvent | Control] = []
        try:
            headers = list(split_messages(datagram))
        except DecodeError:
            return out  # the framing itself is broken: nothing can be trusted
        for header in headers:
            with contextlib.suppress(DecodeError):
                out += decode_datagram(datagram[header.start - 16:header.end],
                                       self.netns.name, now)
        return out

    def read(self) -> list[Record]:
        """Drain the socket: decoded events, and a loss notice plus resync after ENOBUFS."""
        sock = self._events
        assert sock is not None, "start() first"
        decoded: list[FlowEvent | Control] = []
        now = time.time_ns()
        datagrams = sock.recv_batch(self.options.batch)
        for datagram in datagrams:
            decoded += self._decode(datagram, now)
        if not all(map(_is_event, decoded)):  # acks/errors on the event socket: rare
            decoded = [item for item in decoded if type(item) is FlowEvent]
        self.counters.received += len(decoded)
        out: list[Record] = self._pending
        self._pending = []
        out += decoded  # type: ignore[arg-type]  # only FlowEvents are left
        if sock.take_overflow():
            out.append(self._overflowed(sock, now))
        if self._resync_due and sock.drained and time.monotonic() >= self._resync_after:
            # Re-read the table only once the backlog is drained: dumping in the middle of
            # the burst that overflowed us would take the CPU the backlog needs.
            out.extend(self._resync())
        return out

    def _resync(self) -> list[Record]:
        """The resync dump; a failure is logged and retried later, never fatal."""
        try:
            records = self.dump()
        except ConntrailError as exc:
            self._resync_after = time.monotonic() + RESYNC_RETRY_S
            log.error("%s: resync dump failed (%s); retrying in %.0f s", self.name, exc,
                      RESYNC_RETRY_S)
            return []
        self._resync_due = False
        self.counters.resyncs += 1
        return records

    def _overflowed(self, sock: NetlinkSocket, now: int) -> LossNotice:
        """After ENOBUFS: count what was lost, grow the buffer, schedule a resync dump."""
        self.counters.enobufs += 1
        drops = kernel_drops(sock)
        lost = None
        if drops is not None:
            lost, self._drops_seen = drops - self._drops_seen, drops
            self.counters.lost += lost
        log.error("%s: kernel dropped %s events (receive buffer full); resyncing",
                  self.name, "some" if lost is None else lost)
        sock.grow_buffer()
        self._resync_due = True
        return LossNotice(self.netns.name, "enobufs", lost, now)

    def stats(self) -> dict[str, int]:
        """Counters, plus the kernel's own drop count for the socket when readable."""
        values = {
            "received": self.counters.received, "dumped": self.counters.dumped,
            "decode_errors": self.counters.decode_errors, "enobufs": self.counters.enobufs,
            "resyncs": self.counters.resyncs, "lost": self.counters.lost,
        }
        if self._events is not None:
            drops = kernel_drops(self._events)
            if drops is not None:
                values["lost"] = max(values["lost"], drops)
        return values

    def stop(self) -> None:
        """Close the event socket."""
        if self._events is not None:
            self._events.close()
            self._events = None

"""Proc connector codec: subscription requests to bytes, process events to records.

Layouts follow linux/connector.h (struct cn_msg, CN_IDX_PROC/CN_VAL_PROC) and linux/cn_proc.h
(enum proc_cn_mcast_op, struct proc_input, struct proc_event and its union). Everything is host
byte order. A connector message travels in a netlink message of type NLMSG_DONE; each event is
one `cn_msg` whose data is one `proc_event` (40 bytes on 6.18: what, cpu, timestamp_ns, then a
24-byte union). Pids are those of the initial pid namespace: the kernel only accepts listeners
there (cn_proc_mcast_ctl), and the events are not scoped to any network namespace.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

from conntrail.errors import DecodeError
from conntrail.netlink.wire import NLMSG_DONE, pack_message, split_messages

CN_IDX_PROC = 0x1  # connector.h: the proc connector's callback id, and its multicast group
CN_VAL_PROC = 0x1

CN_MSG = struct.Struct("=IIIIHH")  # struct cn_msg: id.idx, id.val, seq, ack, len, flags
PROC_EVENT_HEADER = struct.Struct("=IIQ")  # struct proc_event: what, cpu, timestamp_ns
_MCAST_OP = struct.Struct("=I")  # enum proc_cn_mcast_op alone: what every kernel accepts
PROC_INPUT = struct.Struct("=II")  # struct proc_input: mcast_op, event_type (6.6 and later)
_PIDS2 = struct.Struct("=ii")
_PIDS4 = struct.Struct("=iiii")
_ID = struct.Struct("=iiII")
_COMM = struct.Struct("=ii16s")
_EXIT = struct.Struct("=iiIiii")  # exit_signal is a u32 holding an int (-1: a thread)
_ACK = struct.Struct("=I")


class McastOp(enum.IntEnum):
    """enum proc_cn_mcast_op: start or stop receiving events."""

    LISTEN = 1
    IGNORE = 2


class ProcEventType(enum.IntFlag):
    """enum what of struct proc_event (linux/cn_proc.h; NONZERO_EXIT is a 6.6 filter bit)."""

    NONE = 0x00000000  # the acknowledgement of a subscription
    FORK = 0x00000001
    EXEC = 0x00000002
    UID = 0x00000004
    GID = 0x00000040
    SID = 0x00000080
    PTRACE = 0x00000100
    COMM = 0x00000200
    NONZERO_EXIT = 0x20000000
    COREDUMP = 0x40000000
    EXIT = 0x80000000


class AckEvent(NamedTuple):
    """PROC_EVENT_NONE: the kernel's answer to a subscription (`ack` = request's ack + 1)."""

    seq: int
    cpu: int
    timestamp_ns: int  # CLOCK_MONOTONIC (ktime_get_ns), as for every event
    ack: int
    err: int  # 0, or the errno that refused it (EPERM without CAP_NET_ADMIN)


class ForkEvent(NamedTuple):
    """PROC_EVENT_FORK: a new task; a new process when child_pid == child_tgid, else a thread."""

    seq: int
    cpu: int
    timestamp_ns: int
    parent_pid: int
    parent_tgid: int
    child_pid: int
    child_tgid: int


class ExecEvent(NamedTuple):
    """PROC_EVENT_EXEC: the process (tgid) has a new program; the event carries nothing else."""

    seq: int
    cpu: int
    timestamp_ns: int
    pid: int
    tgid: int


class IdEvent(NamedTuple):
    """PROC_EVENT_UID or PROC_EVENT_GID: a credentials change (real and effective id)."""

    seq: int
    cpu: int
    timestamp_ns: int
    pid: int
    tgid: int
    is_gid: bool
    real: int
    effective: int


class SidEvent(NamedTuple):
    """PROC_EVENT_SID: the process started a new session (setsid)."""

    seq: int
    cpu: int
    timestamp_ns: int
    pid: int
    tgid: int


class PtraceEvent(NamedTuple):
    """PROC_EVENT_PTRACE: attach (tracer ids set) or detach (tracer ids 0)."""

    seq: int
    cpu: int
    timestamp_ns: int
    pid: int
    tgid: int
    tracer_pid: int
    tracer_tgid: int


class CommEvent(NamedTuple):
    """PROC_EVENT_COMM: a task renamed itself (prctl PR_SET_NAME, or a thread's name)."""

    seq: int
    cpu: int
    timestamp_ns: int
    pid: int
    tgid: int
    comm: str


class CoredumpEvent(NamedTuple):
    """PROC_EVENT_COREDUMP: a task started dumping core."""

    seq: int
    cpu: int
    timestamp_ns: int
    pid: int
    tgid: int
    parent_pid: int
    parent_tgid: int


class ExitEvent(NamedTuple):
    """PROC_EVENT_EXIT: a task ended; the process ended when pid == tgid (its leader)."""

    seq: int
    cpu: int
    timestamp_ns: int
    pid: int
    tgid: int
    exit_code: int  # the wait status: exit status << 8, or the killing signal
    exit_signal: int  # the signal the parent is sent (SIGCHLD = 17), -1 for threads
    parent_pid: int
    parent_tgid: int


class UnknownEvent(NamedTuple):
    """An event type this codec does not know (a newer kernel): its raw union bytes."""

    seq: int
    cpu: int
    timestamp_ns: int
    what: int
    data: bytes


ProcEvent = (AckEvent | ForkEvent | ExecEvent | IdEvent | SidEvent | PtraceEvent | CommEvent
             | CoredumpEvent | ExitEvent | UnknownEvent)


def encode_subscribe(op: McastOp = McastOp.LISTEN, seq: int = 0, ack: int = 0,
                     events: int | None = None) -> bytes:
    """The request that starts (LISTEN) or stops (IGNORE) event delivery to this socket.

    Without `events` the data is the bare 4-byte proc_cn_mcast_op every kernel accepts: all
    event types, and the kernel acknowledges with an AckEvent whose `ack` is ours + 1. With
    `events` (ProcEventType bits) it is a struct proc_input, which 6.6 and later use to filter
    what this socket receives; older kernels silently ignore that size, and no kernel delivers
    the acknowledgement through such a filter (PROC_EVENT_NONE matches no bit).
    """
    data = _MCAST_OP.pack(op) if events is None else PROC_INPUT.pack(op, events)
    message = CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, seq, ack, len(data), 0) + data
    return pack_message(NLMSG_DONE, 0, 0, message)


def decode_events(data: bytes | memoryview) -> list[ProcEvent]:
    """Every proc connector event of one datagram. Netlink messages of other types and
    connector messages for other callbacks are skipped; malformed lengths raise DecodeError."""
    events: list[ProcEvent] = []
    for header in split_messages(data):
        if header.msg_type != NLMSG_DONE:
            continue
        start, end = header.start, header.end
        if end - start < CN_MSG.size:
            raise DecodeError(start, f"truncated cn_msg: {end - start} bytes < {CN_MSG.size}",
                              header.msg_type)
        idx, val, seq, ack, length, _ = CN_MSG.unpack_from(data, start)
        body = start + CN_MSG.size
        if body + length > end:
            raise DecodeError(start, f"cn_msg length {length} exceeds the {end - body} bytes "
                              "left in its message", header.msg_type)
        if (idx, val) != (CN_IDX_PROC, CN_VAL_PROC):
            continue
        events.append(_decode_event(data, body, body + length, seq, ack))
    return events


def _decode_event(data: bytes | memoryview, start: int, end: int, seq: int,
                  ack: int) -> ProcEvent:
    """One struct proc_event in data[start:end]."""
    if end - start < PROC_EVENT_HEADER.size:
        raise DecodeError(start, f"truncated proc_event: {end - start} bytes < "
                          f"{PROC_EVENT_HEADER.size}")
    what, cpu, timestamp = PROC_EVENT_HEADER.unpack_from(data, start)
    at = start + PROC_EVENT_HEADER.size
    layout = _LAYOUTS.get(what)
    if layout is None:
        return UnknownEvent(seq, cpu, timestamp, what, bytes(data[at:end]))
    name, shape, build = layout
    if end - at < shape.size:
        raise DecodeError(at, f"{name} event data: {end - at} bytes < {shape.size}")
    return build(seq, cpu, timestamp, ack, shape.unpack_from(data, at))


def _id_event(seq: int, cpu: int, ts: int, _: int, f: tuple[Any, ...]) -> IdEvent:
    return IdEvent(seq, cpu, ts, f[0], f[1], False, f[2], f[3])


def _gid_event(seq: int, cpu: int, ts: int, _: int, f: tuple[Any, ...]) -> IdEvent:
    return IdEvent(seq, cpu, ts, f[0], f[1], True, f[2], f[3])


def _comm_event(seq: int, cpu: int, ts: int, _: int, f: tuple[Any, ...]) -> CommEvent:
    return CommEvent(seq, cpu, ts, f[0], f[1], f[2].split(b"\0", 1)[0].decode("utf-8",
                                                                              "replace"))


_Build = Callable[[int, int, int, int, tuple[Any, ...]], ProcEvent]
# what → (name for errors, layout of its union member, record builder)
_LAYOUTS: dict[int, tuple[str, struct.Struct, _Build]] = {
    ProcEventType.NONE: ("ack", _ACK, lambda s, c, t, a, f: AckEvent(s, c, t, a, *f)),
    ProcEventType.FORK: ("fork", _PIDS4, lambda s, c, t, _, f: ForkEvent(s, c, t, *f)),
    ProcEventType.EXEC: ("exec", _PIDS2, lambda s, c, t, _, f: ExecEvent(s, c, t, *f)),
    ProcEventType.UID: ("uid", _ID, _id_event),
    ProcEventType.GID: ("gid", _ID, _gid_event),
    ProcEventType.SID: ("sid", _PIDS2, lambda s, c, t, _, f: SidEvent(s, c, t, *f)),
    ProcEventType.PTRACE: ("ptrace", _PIDS4, lambda s, c, t, _, f: PtraceEvent(s, c, t, *f)),
    ProcEventType.COMM: ("comm", _COMM, _comm_event),
    ProcEventType.COREDUMP: ("coredump", _PIDS4,
                             lambda s, c, t, _, f: CoredumpEvent(s, c, t, *f)),
    ProcEventType.EXIT: ("exit", _EXIT, lambda s, c, t, _, f: ExitEvent(s, c, t, *f)),
}

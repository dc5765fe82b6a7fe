"""Processes: a table kept by the proc connector, /proc reads, and the cgroup-limited fd scan.

`ProcessTable` listens to the proc connector (NETLINK_CONNECTOR, CN_IDX_PROC): a fork copies
the parent's entry, an exec reads the new program from /proc at once (the kernel's event
carries only the pid, so what a process that is already gone held is lost; a zombie still
shows its comm, parent and start), an exit moves the entry to a grace list so a flow whose
process lived for a millisecond can still be described by pid. A pid the table has not seen
(it predates us) is read from /proc on first lookup. The connector is host-wide: pids are
those of the initial pid namespace, whatever network namespace the flow lives in.

`owner_of_socket` finds which process holds a socket by scanning the fds of the processes of
the socket's cgroup only: its cost follows that cgroup's size, never the host's.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import socket
import time
from collections import OrderedDict
from typing import NamedTuple

from conntrail.errors import DecodeError, KernelError
from conntrail.kernel import cgroups
from conntrail.netlink.cnproc import (
    CN_IDX_PROC,
    AckEvent,
    ExecEvent,
    ExitEvent,
    ForkEvent,
    McastOp,
    ProcEvent,
    ProcEventType,
    decode_events,
    encode_subscribe,
)

log = logging.getLogger(__name__)

NETLINK_CONNECTOR = 11  # linux/netlink.h
SO_RCVBUFFORCE = 33
# What the table needs; 6.6+ filters the rest out in the kernel (older kernels send all).
WANTED = ProcEventType.FORK | ProcEventType.EXEC | ProcEventType.EXIT
_RECV_SIZE = 1 << 16
_BATCH = 4096  # datagrams per read() at most: the pipeline thread has other sources too
_TICKS = os.sysconf("SC_CLK_TCK")
_NONCES = itertools.count()


class ProcessInfo(NamedTuple):
    """What is known of one process; any field may be None when it could not be read."""

    pid: int
    ppid: int | None
    comm: str | None
    exe: str | None
    argv: tuple[str, ...] | None
    uid: int | None  # effective ids: the owner of /proc/<pid> (root:root for a process
    # that is not dumpable, e.g. a setuid program)
    gid: int | None
    cgroup: str | None  # cgroup v2 path, e.g. /system.slice/nginx.service
    started_ns: int | None  # UTC epoch ns, clock-tick (10 ms) precision
    exec_ns: int | None = None  # UTC epoch ns of the exec event, when we saw it
    exited_ns: int | None = None  # UTC epoch ns of the exit event
    exit_code: int | None = None  # wait status: exit status << 8, or the killing signal
    source: str = "proc"  # "exec": read at exec; "fork": the parent's, copied; "proc": lazily

    @property
    def cmdline(self) -> str | None:
        """argv joined by spaces, as ps shows it."""
        return None if self.argv is None else " ".join(self.argv)


def _boot_epoch_ns() -> int:
    """UTC epoch of boot, for /proc/<pid>/stat start times (CLOCK_BOOTTIME ticks)."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def describe(pid: int) -> ProcessInfo | None:
    """Read a process from /proc now; None when nothing of it can be read. Fields that cannot
    be read are None and what was read is kept: the command line and executable are read
    first (they vanish first, when the exiting process drops its memory), a zombie still has
    its comm, parent and start, a kernel thread has no exe or argv."""
    base = f"/proc/{pid}"
    argv, exe = _argv(base), _exe(base)
    stat = _stat(base)
    try:
        owner: os.stat_result | None = os.stat(base)
    except OSError:
        owner = None
    if stat is None and argv is None and exe is None:
        return None
    comm, ppid, started = stat if stat is not None else (None, None, None)
    return ProcessInfo(pid, ppid, comm, exe, argv, owner.st_uid if owner else None,
                       owner.st_gid if owner else None, cgroups.cgroup_of_pid(pid), started)


def _stat(base: str) -> tuple[str, int, int] | None:
    """comm, ppid and start (UTC epoch ns) from /proc/<pid>/stat."""
    try:
        with open(f"{base}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    close = stat.rfind(b")")  # comm may itself hold ")"
    comm = stat[stat.find(b"(") + 1:close].decode("utf-8", "replace")
    fields = stat[close + 2:].split()  # fields[0] is the state (field 3 of proc(5))
    try:
        ppid, ticks = int(fields[1]), int(fields[19])  # fields 4 and 22: ppid, starttime
    except (IndexError, ValueError):
        return None
    return comm, ppid, _boot_epoch_ns() + ticks * 10**9 // _TICKS


def _exe(base: str) -> str | None:
    try:
        return os.readlink(f"{base}/exe")
    except OSError:
        return None


def _argv(base: str) -> tuple[str, ...] | None:
    try:
        with open(f"{base}/cmdline", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    if not raw:
        return None  # a zombie or a kernel thread
    return tuple(part.decode("utf-8", "replace") for part in raw.rstrip(b"\0").split(b"\0"))


def owner_of_socket(inode: int, cgroup_path: str, mount: str | None = None,
                    max_procs: int | None = None) -> int | None:
    """The pid of a process of cgroup `cgroup_path` holding the socket `inode`, or None.

    Only that cgroup's processes (its cgroup.procs) are scanned. The root cgroup holds every
    process not placed elsewhere, so it is never scanned (None: the caller reports the pid as
    unknown). When several processes share the socket (inherited over fork) the first found
    is returned. A socket whose creator moved to another cgroup, or passed the fd to a process
    elsewhere, is not found.
    """
    if inode <= 0:
        return None
    if cgroups.is_root(cgroup_path):
        log.debug("socket %d belongs to the root cgroup: not scanned, pid unknown", inode)
        return None
    target = f"socket:[{inode}]"
    # A budget: a cgroup of thousands of processes (a login session) would otherwise cost
    # milliseconds per flow on the pipeline thread.
    for pid in cgroups.procs(cgroup_path, mount)[:max_procs]:
        if _holds(pid, target):
            return pid
    return None


def _holds(pid: int, target: str) -> bool:
    """Whether one of pid's fds is the link `target` (fds read relative to an open dir)."""
    try:
        fd_dir = os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False  # gone
    try:
        for name in os.listdir(fd_dir):
            with contextlib.suppress(OSError):  # closed meanwhile
                if os.readlink(name, dir_fd=fd_dir) == target:
                    return True
    except OSError:
        return False
    finally:
        os.close(fd_dir)
    return False


class ProcessTable:
    """Live and recently exited processes, kept current by the proc connector."""

    def __init__(self, grace: float = 60.0, max_exited: int = 10_000,
                 buffer: int = 4 << 20) -> None:
        self.grace_ns = int(grace * 1e9)
        self.max_exited = max_exited
        self.buffer = buffer
        self.live: dict[int, ProcessInfo] = {}
        self.exited: OrderedDict[int, ProcessInfo] = OrderedDict()
        self.lost = 0  # ENOBUFS seen: events were dropped, the live table was cleared
        self.events = 0
        self._sock: socket.socket | None = None
        # CLOCK_MONOTONIC (the events' clock) → UTC epoch
        self._mono_offset = time.time_ns() - time.monotonic_ns()

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 2.0) -> None:
        """Subscribe; KernelError when the kernel refuses or never acknowledges (no
        CAP_NET_ADMIN, not in the initial pid and user namespaces, no CONFIG_PROC_EVENTS)."""
        if self._sock is not None:
            return
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                 NETLINK_CONNECTOR)
        except OSError as exc:
            raise KernelError(f"proc connector socket: {exc.strerror}") from exc
        try:
            with contextlib.suppress(OSError):  # without CAP_NET_ADMIN: the default size
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.buffer)
            sock.bind((0, 1 << (CN_IDX_PROC - 1)))
            self._subscribe(sock, timeout)
        except OSError as exc:
            sock.close()
            raise KernelError(f"proc connector: {exc.strerror}") from exc
        except KernelError:
            sock.close()
            raise
        sock.setblocking(False)
        self._sock = sock

    def _subscribe(self, sock: socket.socket, timeout: float) -> None:
        """LISTEN in the form every kernel accepts and acknowledges, then narrow it (6.6+)."""
        nonce = ((os.getpid() << 8) + next(_NONCES)) & 0x7FFFFFFF  # acks go to every listener
        sock.send(encode_subscribe(McastOp.LISTEN, ack=nonce))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise KernelError("proc connector: no acknowledgement (not in the initial pid "
                                  "and user namespaces, or no CONFIG_PROC_EVENTS?)")
            sock.settimeout(left)
            try:
                data = sock.recv(_RECV_SIZE)
            except TimeoutError:
                continue
            for event in decode_events(data):
                if isinstance(event, AckEvent) and event.ack == nonce + 1:
                    if event.err:
                        raise KernelError(f"proc connector refused: {os.strerror(event.err)}")
                    sock.send(encode_subscribe(McastOp.LISTEN, events=WANTED))
                    return
                self._apply(event)

    def stop(self) -> None:
        """Unsubscribe and close the socket; the tables stay readable."""
        if self._sock is None:
            return
        with contextlib.suppress(OSError):
            self._sock.send(encode_subscribe(McastOp.IGNORE))
        self._sock.close()
        self._sock = None

    def __enter__(self) -> ProcessTable:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def fileno(self) -> int:
        """The socket's fd, for select/poll; readable when events wait."""
        if self._sock is None:
            raise KernelError("process table not started")
        return self._sock.fileno()

    # --- events ------------------------------------------------------------------------------

    def read(self) -> list[ProcEvent]:
        """Drain waiting events (up to a batch), apply them, expire old exits; the events."""
        if self._sock is None:
            raise KernelError("process table not started")
        out: list[ProcEvent] = []
        for _ in range(_BATCH):
            try:
                data = self._sock.recv(_RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise KernelError(f"proc connector: {exc.strerror}") from exc
                self._overflowed()
                continue
            try:
                events = decode_events(data)
            except DecodeError as exc:
                log.warning("proc connector: undecodable datagram skipped: %s", exc)
                continue
            for event in events:
                self._apply(event)
            out.extend(events)
        self.events += len(out)
        self.expire()
        return out

    def _overflowed(self) -> None:
        """Events were dropped: entries may be stale (a pid reused unseen), so forget the
        live ones; lookups read /proc again."""
        self.lost += 1
        self.live.clear()
        log.error("proc connector: receive buffer overflowed, events lost; process table "
                  "reset (lookups fall back to /proc)")

    def _apply(self, event: ProcEvent) -> None:
        if isinstance(event, ForkEvent):
            if event.child_pid == event.child_tgid:
                self._forked(event)
        elif isinstance(event, ExecEvent):
            if event.pid == event.tgid:
                self._executed(event)
        elif isinstance(event, ExitEvent) and event.pid == event.tgid:
            self._exited(event)

    def _forked(self, event: ForkEvent) -> None:
        pid = event.child_tgid
        parent = self.live.get(event.parent_tgid)
        started = event.timestamp_ns + self._mono_offset
        if parent is None:
            self.live[pid] = ProcessInfo(pid, event.parent_tgid, None, None, None, None, None,
                                         None, started, source="fork")
        else:
            self.live[pid] = parent._replace(pid=pid, ppid=event.parent_tgid, started_ns=started,
                                             exec_ns=None, exited_ns=None, exit_code=None,
                                             source="fork")

    def _executed(self, event: ExecEvent) -> None:
        pid = event.pid
        when = event.timestamp_ns + self._mono_offset
        info = describe(pid) or ProcessInfo(pid, None, None, None, None, None, None, None, None)
        known = self.live.get(pid)
        if known is not None:  # exec keeps the parent, start, cgroup and (unless set-id) ids:
            # fill what /proc no longer showed from them, never the pre-exec program
            tracked = known.source in ("fork", "exec") and known.started_ns is not None
            info = info._replace(
                ppid=known.ppid if info.ppid is None else info.ppid,
                uid=known.uid if info.uid is None else info.uid,
                gid=known.gid if info.gid is None else info.gid,
                cgroup=known.cgroup if info.cgroup is None else info.cgroup,
                started_ns=known.started_ns if tracked else info.started_ns)  # fork's: exact
        self.live[pid] = info._replace(exec_ns=when, source="exec")

    def _exited(self, event: ExitEvent) -> None:
        pid = event.pid
        when = event.timestamp_ns + self._mono_offset
        info = self.live.pop(pid, None)
        if info is None:
            info = ProcessInfo(pid, None, None, None, None, None, None, None, None,
                               source="exit")
        if info.ppid is None:
            info = info._replace(ppid=event.parent_tgid)
        self.exited.pop(pid, None)
        self.exited[pid] = info._replace(exited_ns=when, exit_code=event.exit_code)
        if len(self.exited) > self.max_exited:
            self.exited.popitem(last=False)

    def expire(self, now_ns: int | None = None) -> None:
        """Drop exited processes older than the grace period."""
        limit = (time.time_ns() if now_ns is None else now_ns) - self.grace_ns
        while self.exited:
            pid, info = next(iter(self.exited.items()))
            if info.exited_ns is not None and info.exited_ns >= limit:
                break
            del self.exited[pid]

    # --- queries -----------------------------------------------------------------------------

    def lookup(self, pid: int) -> ProcessInfo | None:
        """The process `pid`: live, or exited within the grace period; a pid never seen is
        read from /proc (and remembered) when it is alive."""
        info = self.live.get(pid)
        if info is not None:
            if info.source == "fork" and info.comm is None:
                fresh = describe(pid)  # forked from a parent we never saw: read it once
                if fresh is not None:
                    info = self.live[pid] = fresh._replace(source="proc")
            return info
        info = self.exited.get(pid)
        if info is not None:
            return info
        info = describe(pid)
        if info is not None:
            self.live[pid] = info
        return info

"""The attribution stage: who opened each flow, read from the kernel, never racing /proc.

Layers, each named in `Attribution.method` when it contributed:
- `labels`: conntrail's `inet conntrail_attr` rules copied the socket's uid, gid and cgroup v2
  id into the conntrack labels at the first packet (kernel/attrlabels.py), so the NEW event
  carries them: exact, even for a process gone a microsecond later, even for one-shot UDP.
  The cgroup id becomes a path and a systemd unit or container (kernel/cgroups.py).
- `sockdiag`: while the flow's socket exists, sock_diag finds it by tuple (inode, uid,
  cgroup), and the processes of that one cgroup are searched for the inode: an exact pid.
  Never a whole-system /proc scan; a socket in the root cgroup is not searched.
- `proc`: the process table the proc connector keeps (fork/exec/exit) describes the pid,
  also after it exited: executable, command line, parent, start time.
- `kernel`: the labels say no user socket sent the first packet; `forwarded`: the flow has
  no local end (routed, NATed for others): no process to find, and not a miss.
"""

from __future__ import annotations

import logging
import select
import threading
from dataclasses import dataclass, field

from conntrail.kernel import cgroups
from conntrail.kernel.cgroups import CgroupMap
from conntrail.kernel.localview import LocalityCache, LocalView
from conntrail.kernel.netns import NetnsRef
from conntrail.kernel.procs import ProcessInfo, ProcessTable, describe, owner_of_socket
from conntrail.kernel.socklookup import SocketLookup, SocketOwner
from conntrail.model import Attribution, Confidence, EventKind, FlowEvent
from conntrail.netlink.nftables import decode_label, is_kernel_label

log = logging.getLogger(__name__)

FORWARDED = Attribution("forwarded", Confidence.NONE)
KERNEL = Attribution("kernel", Confidence.EXACT)
UNKNOWN = Attribution("none", Confidence.NONE)
_UNIT_CACHE_MAX = 65536


@dataclass
class AttributionOptions:
    """Which layers run."""

    sockdiag: bool = True  # look the socket up while it exists (NEW events of local flows)
    process_table: bool = True  # keep a proc-connector process table


@dataclass
class Attributor:
    """The enricher (a callable on the pipeline thread) and the services it reads."""

    locality: LocalityCache[LocalView]
    namespaces: dict[str, NetnsRef]
    options: AttributionOptions = field(default_factory=AttributionOptions)
    cgroup_map: CgroupMap | None = None
    processes: ProcessTable | None = None
    sockets: SocketLookup | None = None
    _units: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None
    lookups: int = 0
    lookup_failures: int = 0
    _until_refresh: int = 0

    def start(self) -> None:
        """Open what the layers need; a layer that cannot start is logged and skipped."""
        try:
            self.cgroup_map = CgroupMap()
        except Exception as exc:  # noqa: BLE001 - attribution degrades, never stops us
            log.warning("attribution: no cgroup v2 mount (%s): no cgroup paths or units", exc)
        if self.options.sockdiag:
            self.sockets = SocketLookup()
        if self.options.process_table:
            self._start_process_table()

    def _start_process_table(self) -> None:
        table = ProcessTable()
        try:
            table.start()
        except Exception as exc:  # noqa: BLE001 - see start()
            log.warning("attribution: no process table (proc connector: %s)", exc)
            return
        self.processes = table
        self._reader = threading.Thread(target=self._read_processes, name="proc-connector",
                                        daemon=True)
        self._reader.start()

    def _read_processes(self) -> None:
        """The proc connector must be drained while the network is idle too: fork/exec/exit
        never stop, and an overflow loses them."""
        table = self.processes
        assert table is not None
        while not self._stop.is_set():
            readable, _, _ = select.select([table.fileno()], [], [], 0.5)
            if readable:
                table.read()
            table.expire()

    def stop(self) -> None:
        """Stop the reader and release sockets (idempotent)."""
        self._stop.set()
        if self._reader is not None:
            self._reader.join(2.0)
            self._reader = None
        if self.processes is not None:
            self.processes.stop()
        if self.sockets is not None:
            self.sockets.close()
        if self.cgroup_map is not None:
            self.cgroup_map.close()

    def __call__(self, event: FlowEvent) -> FlowEvent:
        """The event with its attribution."""
        self._until_refresh -= 1
        if self._until_refresh < 0:  # namespaces' addresses change: re-read now and then
            self._until_refresh = 256
            self.locality.refresh_due()
        flow = event.flow
        label = decode_label(flow.labels)
        if label is not None:
            return event._replace(who=self._from_label(event, *label))
        if is_kernel_label(flow.labels):
            return event._replace(who=KERNEL)
        view = self.locality(event.netns)
        orig = flow.orig
        if view is not None and orig.src not in view.addresses and \
                not view.is_local_destination(orig.dst):
            return event._replace(who=FORWARDED)
        # A local flow without our label: older than our rules, or inbound to a local server.
        return event._replace(who=self._from_socket(event) or UNKNOWN)

    def _from_label(self, event: FlowEvent, uid: int, gid: int,
                    cgroup_id: int | None) -> Attribution:
        path, unit = self._cgroup(cgroup_id)
        methods = ["labels"]
        pid: int | None = None
        if event.kind is EventKind.NEW and path is not None:
            owner = self._lookup(event)
            if owner is not None:
                pid = owner_of_socket(owner.inode, path)
                if pid is not None:
                    methods.append("sockdiag")
        who = Attribution("labels", Confidence.UID_ONLY, uid=uid, gid=gid,
                          cgroup_id=cgroup_id, cgroup=path, unit=unit)
        return self._with_process(who, pid, methods)

    def _from_socket(self, event: FlowEvent) -> Attribution | None:
        """sock_diag alone (no label): the socket's owner while it exists."""
        if event.kind is not EventKind.NEW and event.kind is not EventKind.DUMP:
            return None
        owner = self._lookup(event)
        if owner is None:
            return None
        path, unit = self._cgroup(owner.cgroup_id)
        pid = owner_of_socket(owner.inode, path) if path is not None else None
        who = Attribution("sockdiag", Confidence.UID_ONLY, uid=owner.uid,
                          cgroup_id=owner.cgroup_id, cgroup=path, unit=unit)
        return self._with_process(who, pid, ["sockdiag"])

    def _with_process(self, who: Attribution, pid: int | None,
                      methods: list[str]) -> Attribution:
        """Describe the pid (exact: found holding the flow's socket)."""
        if pid is None:
            return who._replace(method="+".join(methods))
        info = self._describe(pid)
        if info is not None:
            methods.append("proc")
        return who._replace(
            method="+".join(methods), confidence=Confidence.EXACT, pid=pid,
            ppid=None if info is None else info.ppid, comm=None if info is None else info.comm,
            exe=None if info is None else info.exe,
            cmdline=None if info is None else info.cmdline,
            started_ns=None if info is None else info.started_ns,
            gid=who.gid if who.gid is not None or info is None else info.gid)

    def _describe(self, pid: int) -> ProcessInfo | None:
        if self.processes is not None:
            info = self.processes.lookup(pid)
            if info is not None:
                return info
        return describe(pid)

    def _lookup(self, event: FlowEvent) -> SocketOwner | None:
        """The flow's socket: its local end is the original source for a flow this host
        opened, the reply source (post-DNAT destination) for one it accepted."""
        if self.sockets is None:
            return None
        netns = self.namespaces.get(event.netns)
        flow = event.flow
        orig, reply = flow.orig, flow.reply
        if netns is None or orig.sport is None or orig.dport is None:
            return None
        view = self.locality(event.netns)
        outbound = view is None or orig.src in view.addresses or orig.src.startswith("127.")
        if outbound:
            local, lport, peer, pport = orig.src, orig.sport, orig.dst, orig.dport
        elif reply is not None and reply.sport is not None and reply.dport is not None:
            local, lport, peer, pport = reply.src, reply.sport, reply.dst, reply.dport
        else:
            return None
        self.lookups += 1
        try:
            return self.sockets.lookup(netns, orig.family, orig.proto, local, lport, peer,
                                       pport)
        except Exception:  # noqa: BLE001 - a failed lookup leaves the flow less attributed
            self.lookup_failures += 1
            return None

    def _cgroup(self, cgroup_id: int | None) -> tuple[str | None, str | None]:
        """(path, unit or container id) of a cgroup id, cached by path."""
        if cgroup_id is None or self.cgroup_map is None:
            return None, None
        path = self.cgroup_map.path_of(cgroup_id)
        if path is None:
            return None, None
        known = self._units.get(path)
        if known is None:
            container = cgroups.container_of(path)
            unit = container.id if container is not None else cgroups.unit_of(path)
            if len(self._units) >= _UNIT_CACHE_MAX:
                self._units.clear()
            known = self._units[path] = (path, unit)
        return known

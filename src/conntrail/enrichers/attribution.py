"""The attribution stage: who opened each flow, read from the kernel, never racing /proc.

Layers, each named in `Attribution.method` when it contributed:
- `labels`: conntrail's `inet conntrail_attr` rules copied the socket's uid, gid and cgroup v2
  id into the conntrack labels at the first packet (kernel/attrlabels.py), so the NEW event
  carries them: exact, even for a process gone a microsecond later, even for one-shot UDP.
  The cgroup id becomes a path and a systemd unit or container (kernel/cgroups.py).
- `sockdiag`: while the flow's socket exists, sock_diag finds it by tuple (inode, uid,
  cgroup), and the processes of that one cgroup are searched for the inode: an exact pid.
  Never a whole-system /proc scan; a socket in the root cgroup is not searched.
- `ebpf` (optional, kernel/bpf.py): a program on the cgroup v2 root reports, for each new
  flow's first packet, the sending task's pid, uid, gid, comm and cgroup, and every exec's
  argv: the only way to name a process that lived a millisecond. Exact only when the sender
  owns its socket (the program checks it).
- `proc`: the process table the proc connector keeps (fork/exec/exit) describes the pid,
  also after it exited: executable, command line, parent, start time.
- `kernel`: the labels say no user socket sent the first packet; `forwarded`: the flow has
  no local end (routed, NATed for others): no process to find, and not a miss.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from dataclasses import dataclass, field
from typing import Any

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
    ebpf: str = "auto"  # "auto": when the kernel and tools allow; "on": or fail; "off"
    identity: str = "labels"  # where uid/gid come from: "labels", or "nflog" (the fallback)


RECORD_TTL_NS = 60 * 1_000_000_000  # eBPF records wait this long for their conntrack event
RECORDS_MAX = 262_144  # and at most this many (oldest dropped first)


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
    bpf: Any = None  # kernel.bpf.BpfAttribution when the eBPF tier runs
    lookups: int = 0
    lookup_failures: int = 0
    _until_refresh: int = 0
    _flows: dict[tuple[int, tuple[object, ...]], Any] = field(default_factory=dict)
    _bpf_lock: threading.Lock = field(default_factory=threading.Lock)
    _execs: dict[int, Any] = field(default_factory=dict)
    _netns_ino: dict[str, int] = field(default_factory=dict)
    _nflog: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # netns: (source, ids)

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
        if self.options.ebpf != "off":
            self._start_bpf()
        if self.processes is not None or self.bpf is not None:
            self._reader = threading.Thread(target=self._background, name="attribution",
                                            daemon=True)
            self._reader.start()

    def _start_bpf(self) -> None:
        from conntrail.kernel import bpf

        try:
            self.bpf = bpf.BpfAttribution.open()
        except Exception as exc:
            if self.options.ebpf == "on":
                raise
            log.info("attribution: no eBPF tier (%s); pids come from sock_diag while the "
                     "socket lives", exc)
            return
        log.info("attribution: eBPF tier attached (%s)", self.bpf.support.describe())

    def _start_process_table(self) -> None:
        table = ProcessTable()
        try:
            table.start()
        except Exception as exc:  # noqa: BLE001 - see start()
            log.warning("attribution: no process table (proc connector: %s)", exc)
            return
        self.processes = table

    def add_namespace(self, netns: NetnsRef, labelled: bool, rules: bool = True) -> None:
        """A namespace whose NEW events will come; without labels there, the uid and gid of
        each new local flow's first packet come from NFLOG instead (which needs a rule of
        ours too: not when rules are refused)."""
        if not rules or (labelled and self.options.identity != "nflog"):
            return
        from conntrail.enrichers.nflog_ids import NflogIds
        from conntrail.kernel.nflogsrc import NflogSource

        source = NflogSource(netns)
        try:
            source.open()
        except Exception as exc:  # noqa: BLE001 - see start()
            log.warning("attribution in netns %s: no NFLOG fallback either (%s): no uid/gid "
                        "for new flows", netns.name or "current", exc)
            return
        self._nflog[netns.name] = (source, NflogIds())
        log.info("attribution in netns %s: uid and gid from NFLOG", netns.name or "current")

    def _background(self) -> None:
        """Drain the proc connector and the eBPF ring while the network is idle too: forks,
        execs and other namespaces' packets never stop, and an overflow loses them."""
        fds = [source.fileno() for source in (self.processes, self.bpf) if source is not None]
        while not self._stop.is_set():
            readable, _, _ = select.select(fds, [], [], 0.5)
            if self.processes is not None:
                if self.processes.fileno() in readable:
                    self.processes.read()
                self.processes.expire()
            if self.bpf is not None and self.bpf.fileno() in readable:
                self._drain_bpf()

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
        if self.bpf is not None:
            self.bpf.close()
            self.bpf = None
        for source, _ in self._nflog.values():
            source.close()
        self._nflog.clear()

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
        if event.kind is EventKind.NEW and event.netns in self._nflog:
            ids = self._nflog_ids(event)
            if ids is not None:
                if ids.uid is None and ids.gid is None:
                    return event._replace(who=KERNEL)
                return event._replace(who=self._from_ids(event, ids.uid, ids.gid))
        # A local flow without our label: older than our rules, or inbound to a local server.
        return event._replace(who=self._from_socket(event) or UNKNOWN)

    def _nflog_ids(self, event: FlowEvent) -> Any:
        """The NFLOG record of this flow's first packet (logged before the NEW event is
        sent, so one drain after a miss finds it)."""
        source, ids = self._nflog[event.netns]
        found = ids.take(event.flow.orig)
        if found is None:
            for packet in source.read():
                ids.add(packet)
            found = ids.take(event.flow.orig)
        return found

    def _from_ids(self, event: FlowEvent, uid: int | None, gid: int | None) -> Attribution:
        """NFLOG's uid and gid (no cgroup in them: sock_diag or eBPF may add it)."""
        who = Attribution("nflog", Confidence.UID_ONLY, uid=uid, gid=gid)
        sender = self._sender(event)
        if sender is not None:
            path, unit = self._cgroup(sender.cgroup_id)
            return self._from_sender(who._replace(cgroup_id=sender.cgroup_id, cgroup=path,
                                                  unit=unit), sender, ["nflog", "ebpf"])
        owner = self._lookup(event)
        if owner is None:
            return who
        path, unit = self._cgroup(owner.cgroup_id)
        who = who._replace(cgroup_id=owner.cgroup_id, cgroup=path, unit=unit)
        pid = owner_of_socket(owner.inode, path) if path is not None else None
        return self._with_process(who, pid, ["nflog", "sockdiag"] if pid else ["nflog"])

    def _from_label(self, event: FlowEvent, uid: int, gid: int,
                    cgroup_id: int | None) -> Attribution:
        path, unit = self._cgroup(cgroup_id)
        methods = ["labels"]
        who = Attribution("labels", Confidence.UID_ONLY, uid=uid, gid=gid,
                          cgroup_id=cgroup_id, cgroup=path, unit=unit)
        if event.kind is not EventKind.NEW:
            return who
        sender = self._sender(event)
        if sender is not None:
            methods.append("ebpf")
            return self._from_sender(who, sender, methods)
        pid: int | None = None
        if path is not None:
            owner = self._lookup(event)
            if owner is not None:
                pid = owner_of_socket(owner.inode, path)
                if pid is not None:
                    methods.append("sockdiag")
        return self._with_process(who, pid, methods)

    def _sender(self, event: FlowEvent) -> Any:
        """The eBPF record of this flow's first packet, if the tier runs and sent one."""
        if self.bpf is None or event.flow.reply is None:
            return None
        from conntrail.kernel.bpf import flow_key

        key = flow_key(event.flow.reply, reverse=True)
        if key is None:
            return None
        ident = (self._namespace_inode(event.netns), key)
        with self._bpf_lock:
            record = self._flows.pop(ident, None)
        if record is None:
            self._drain_bpf()
            with self._bpf_lock:
                record = self._flows.pop(ident, None)
        return record

    def _drain_bpf(self) -> None:
        from conntrail.kernel.bpf import ExecRecord, FlowRecord

        with self._bpf_lock:  # the background thread and a lookup miss both drain
            self._file(self.bpf.read(), FlowRecord, ExecRecord)

    def _file(self, records: list[Any], flow_type: type[Any], exec_type: type[Any]) -> None:
        for record in records:
            if isinstance(record, flow_type):
                if len(self._flows) >= RECORDS_MAX:
                    del self._flows[next(iter(self._flows))]
                self._flows[(record.netns_ino, record.key)] = record
            elif isinstance(record, exec_type):
                if len(self._execs) >= RECORDS_MAX:
                    del self._execs[next(iter(self._execs))]
                self._execs[record.pid] = record

    def _namespace_inode(self, netns: str) -> int:
        ino = self._netns_ino.get(netns)
        if ino is None:
            ref = self.namespaces.get(netns)
            try:
                ino = os.stat(ref.path if ref is not None and ref.path else
                              "/proc/self/ns/net").st_ino
            except OSError:
                ino = 0
            self._netns_ino[netns] = ino
        return ino

    def _from_sender(self, who: Attribution, record: Any, methods: list[str]) -> Attribution:
        """The eBPF record's task, described by its exec record, the table or /proc."""
        info = self._describe(record.tgid)
        if info is not None and info.comm is not None and info.comm != record.comm:
            info = None  # the pid was reused since: not our process
        with self._bpf_lock:
            exec_record = self._execs.get(record.tgid)
        # /proc's argv is whole; the exec record's may be cut at 256 bytes, but it outlives
        # the process.
        cmdline = info.cmdline if info is not None and info.cmdline else \
            None if exec_record is None else exec_record.cmdline
        if info is not None:
            methods.append("proc")
        return who._replace(
            method="+".join(methods),
            confidence=Confidence.EXACT if record.exact else Confidence.INFERRED,
            pid=record.tgid, comm=record.comm, cmdline=cmdline,
            ppid=exec_record.ppid if exec_record is not None else
            None if info is None else info.ppid,
            exe=None if info is None else info.exe,
            started_ns=None if info is None else info.started_ns)

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

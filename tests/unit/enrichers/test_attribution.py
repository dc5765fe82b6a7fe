"""The attribution stage's decisions, with the kernel replaced by small fakes."""

from __future__ import annotations

from typing import Any, cast

from conntrail.enrichers.attribution import FORWARDED, KERNEL, Attributor
from conntrail.kernel.localview import LocalityCache, LocalView
from conntrail.kernel.netns import NetnsRef
from conntrail.kernel.procs import ProcessInfo
from conntrail.kernel.socklookup import SocketOwner
from conntrail.model import (
    AF_INET,
    Confidence,
    EventKind,
    Flow,
    FlowEvent,
    FlowTuple,
)
from conntrail.netlink.nftables import KERNEL_LABEL, encode_label


class FakeView:
    addresses = frozenset({"198.18.1.2"})

    def is_local_destination(self, address: str) -> bool:
        return address in self.addresses


class FakeCgroups:
    def path_of(self, cgroup_id: int) -> str | None:
        return {77: "/system.slice/nginx.service",
                78: "/system.slice/docker-" + "ab" * 32 + ".scope"}.get(cgroup_id)

    def close(self) -> None:
        pass


class FakeSockets:
    def __init__(self, owner: SocketOwner | None) -> None:
        self.owner = owner
        self.asked: list[tuple[Any, ...]] = []

    def lookup(self, *args: Any) -> SocketOwner | None:
        self.asked.append(args)
        return self.owner

    def close(self) -> None:
        pass


def event(src: str, dst: str, labels: int | None, kind: EventKind = EventKind.NEW
          ) -> FlowEvent:
    orig = FlowTuple(AF_INET, 6, src, dst, 40000, 443)
    reply = FlowTuple(AF_INET, 6, dst, src, 443, 40000)
    return FlowEvent(kind, Flow(orig=orig, reply=reply, labels=labels), "ns", 0)


def attributor(owner: SocketOwner | None = None) -> Attributor:
    locality = LocalityCache(lambda _ns: cast(LocalView, FakeView()))
    stage = Attributor(locality, {"ns": NetnsRef("ns", "/run/netns/ns")})
    stage.cgroup_map = cast(Any, FakeCgroups())
    stage.sockets = cast(Any, FakeSockets(owner))
    return stage


def test_labels_give_uid_gid_cgroup_and_unit() -> None:
    who = attributor()(event("198.18.1.2", "198.18.9.9", encode_label(1000, 1001, 77))).who
    assert who is not None
    assert (who.uid, who.gid, who.cgroup, who.unit) == (
        1000, 1001, "/system.slice/nginx.service", "nginx.service")
    assert (who.method, who.confidence, who.pid) == ("labels", Confidence.UID_ONLY, None)


def test_a_container_cgroup_names_the_container() -> None:
    who = attributor()(event("198.18.1.2", "198.18.9.9", encode_label(0, 0, 78))).who
    assert who is not None and who.unit == "ab" * 32


def test_kernel_and_forwarded_flows() -> None:
    stage = attributor()
    assert stage(event("198.18.1.2", "198.18.9.9", KERNEL_LABEL)).who == KERNEL
    assert stage(event("198.18.5.5", "198.18.9.9", None)).who == FORWARDED


def test_a_pid_is_exact_only_when_found_holding_the_socket(monkeypatch: Any) -> None:
    from conntrail.enrichers import attribution

    owner = SocketOwner(4711, 1000, 77, 1, "exact", cast(Any, None))
    info = ProcessInfo(321, 1, "curl", "/usr/bin/curl", ("curl", "-s", "x"), 1000, 1001,
                       "/system.slice/nginx.service", 5)
    monkeypatch.setattr(attribution, "owner_of_socket",
                        lambda inode, path, max_procs=None: 321 if (inode, path) == (
                            4711, "/system.slice/nginx.service") else None)
    monkeypatch.setattr(attribution, "describe", lambda pid: info if pid == 321 else None)
    stage = attributor(owner)
    who = stage(event("198.18.1.2", "198.18.9.9", encode_label(1000, 1001, 77))).who
    assert who is not None
    assert (who.pid, who.exe, who.cmdline, who.confidence, who.method) == (
        321, "/usr/bin/curl", "curl -s x", Confidence.EXACT, "labels+sockdiag+proc")
    sockets = cast(FakeSockets, stage.sockets)
    assert sockets.asked[0][1:] == (AF_INET, 6, "198.18.1.2", 40000, "198.18.9.9", 443)
    # Not a NEW event: no lookup, the labels alone.
    updated = stage(event("198.18.1.2", "198.18.9.9", encode_label(1000, 1001, 77),
                          EventKind.DESTROY)).who
    assert updated is not None and updated.pid is None and len(sockets.asked) == 1


def test_an_inbound_flow_is_looked_up_by_its_local_end() -> None:
    owner = SocketOwner(5, 33, None, 1, "exact", cast(Any, None))
    stage = attributor(owner)
    who = stage(event("198.18.7.7", "198.18.1.2", None)).who
    assert who is not None and (who.method, who.uid) == ("sockdiag", 33)
    sockets = cast(FakeSockets, stage.sockets)
    assert sockets.asked[0][3:] == ("198.18.1.2", 443, "198.18.7.7", 40000)


# ---- the eBPF records ------------------------------------------------------------------

class FakeBpf:
    """A ring buffer that hands out the records queued in it."""

    def __init__(self) -> None:
        self.queue: list[Any] = []

    def read(self) -> list[Any]:
        records, self.queue = self.queue, []
        return records

    def poll(self, _timeout_ms: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bpf_stage(monkeypatch: Any) -> tuple[Attributor, FakeBpf]:
    from conntrail.enrichers import attribution

    stage = attributor()
    stage.sockets = None
    fake = FakeBpf()
    stage.bpf = fake
    stage._netns_ino["ns"] = 4026531999
    stage._watched_inodes.add(4026531999)
    monkeypatch.setattr(attribution, "describe", lambda pid: None)
    return stage, fake


def _flow_record(pid: int, uid: int, ktime: int, netns_ino: int = 4026531999) -> Any:
    from conntrail.kernel.bpf import FlowRecord

    return FlowRecord(AF_INET, 6, "198.18.1.2", "198.18.9.9", 40000, 443, pid, pid, uid, 0,
                      "curl", 77, 77, ktime, 1, 1, netns_ino, 0, 0, 0)


def _now() -> int:
    import time

    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def test_a_record_is_the_senders_only_when_it_agrees_with_the_labels(monkeypatch: Any) -> None:
    stage, ring = _bpf_stage(monkeypatch)
    labelled = event("198.18.1.2", "198.18.9.9", encode_label(1000, 1001, 77))
    ring.queue = [_flow_record(500, 1000, _now())]
    who = stage(labelled).who
    assert who is not None and (who.pid, who.method) == (500, "labels+ebpf")
    ring.queue = [_flow_record(501, 0, _now())]  # another user's flow on the same tuple
    who = stage(labelled).who
    assert who is not None and who.pid is None and who.method == "labels"


def test_stale_records_and_other_namespaces_are_never_used(monkeypatch: Any) -> None:
    stage, ring = _bpf_stage(monkeypatch)
    labelled = event("198.18.1.2", "198.18.9.9", encode_label(1000, 1001, 77))
    ring.queue = [_flow_record(500, 1000, _now() - 60 * 10**9)]  # a minute old
    assert stage(labelled).who.pid is None  # type: ignore[union-attr]
    ring.queue = [_flow_record(502, 1000, _now(), netns_ino=12345)]  # not watched
    assert stage(labelled).who.pid is None  # type: ignore[union-attr]
    assert not stage._flows


def test_a_forked_child_runs_its_parents_program_not_an_older_pid_owners(
        monkeypatch: Any) -> None:
    from conntrail.kernel.bpf import ExecRecord, ForkRecord

    stage, ring = _bpf_stage(monkeypatch)
    now = _now()
    ring.queue = [
        ExecRecord(700, 700, 1, 0, 0, "ssh", "/usr/bin/ssh", ("ssh", "root@secret"), False,
                   77, now - 30),
        ExecRecord(600, 600, 1, 1000, 1001, "curl", "/usr/bin/curl", ("curl", "-s", "x"),
                   False, 77, now - 20),
        ForkRecord(700, 600, "curl", now - 10),  # pid 700 reused: a child of curl
        _flow_record(700, 1000, now),
    ]
    who = stage(event("198.18.1.2", "198.18.9.9", encode_label(1000, 1001, 77))).who
    assert who is not None and who.pid == 700
    assert who.cmdline == "curl -s x" and who.ppid == 600  # the parent's program, not ssh

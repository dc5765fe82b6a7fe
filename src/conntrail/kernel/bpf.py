"""The eBPF tier of process attribution: build, probe, load and attach, and read the records.

`conntrail/bpf/attribution.bpf.c` is compiled at first use with clang against the running
kernel's BTF (vmlinux.h from bpftool) and cached per kernel release and source hash under
/var/cache/conntrail/bpf/<release>/ (or $CONNTRAIL_BPF_CACHE/<release>/). It is loaded through
libbpf (`libbpf.so.1`) via ctypes: no Python BPF library. Records arrive in a BPF ring buffer:

- `FlowRecord` for the first packet of each new locally generated flow (cgroup_skb/egress on
  the cgroup v2 root): the tuple as the packet leaves, the sending task's pid/tgid, uid/gid,
  comm and cgroup v2 id, the socket's cookie, cgroup and network namespace.
- `ExecRecord` at every exec (tp_btf/sched_process_exec): pid, ppid, uid/gid, comm, filename
  and up to 256 bytes of argv.
- `ForkRecord` for every new process (not thread), so a child that never execs can be
  described by its parent's exec.

Matching conntrack: the record's tuple is the packet after OUTPUT and POSTROUTING (after any
NAT), so `record.key == flow_key(flow.reply, reverse=True)` for the flow it opened, with or
without NAT. A local server's first datagram back to a client gives `flow_key(flow.reply)`.

Which helpers a program type may call differs between kernels: `probe()` loads one tiny
program per question and says what works and, when not, the verifier's refusal. (bpftool 7.1's
own `feature probe` lists every helper as available for every program type on 6.18: it looks
for "unknown func" while this verifier says "program of this type cannot use helper".) The
tier is optional: without clang, bpftool, libbpf or root, `probe()` says why and conntrail runs
without it.

`decode_record` is pure and needs neither root nor libbpf.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import enum
import errno
import functools
import hashlib
import importlib.resources
import ipaddress
import logging
import os
import platform
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from conntrail.errors import DecodeError, KernelError
from conntrail.kernel import cgroups
from conntrail.model import AF_INET, AF_INET6, ICMP_PROTOCOLS, FlowTuple

log = logging.getLogger(__name__)

# --- records: the layouts of attribution.bpf.c (little-endian host order) --------------------

REC_FLOW = 1
REC_EXEC = 2
REC_FORK = 3

# struct flow_rec (128 bytes)
_FLOW = struct.Struct("<4BB3xII5Q4I2H4x16s16s16s")
# struct exec_rec (448 bytes)
_EXEC = struct.Struct("<B3x5IQQIHH16s128s256s")
# struct fork_rec (40 bytes)
_FORK = struct.Struct("<B3xII4xQ16s")
assert (_FLOW.size, _EXEC.size, _FORK.size) == (128, 448, 40)


class FlowSource(enum.IntEnum):
    """Where a FlowRecord's identity comes from (flow_rec.source)."""

    NONE = 0  # nothing known: see the flags
    EGRESS_TASK = 1  # the task sending the packet, read at egress
    SOCK_HOOK = 2  # the socket's owner record, kept by sock_create/connect/sendmsg hooks


class OwnerHook(enum.IntEnum):
    """The process-context hook that last wrote the socket's owner record."""

    NONE = 0
    SOCK_CREATE = 1
    CONNECT = 2
    SENDMSG = 3


class FlowFlag(enum.IntFlag):
    """flow_rec.flags."""

    KTHREAD = 0x1  # the sending task is a kernel thread: a kernel socket's flow
    NO_OWNER = 0x2  # the socket has no owner record: kernel socket, or older than the attach
    OWNER_DIFFERS = 0x4  # the socket was created/connected by another process than the sender


_NOT_EXACT = FlowFlag.KTHREAD | FlowFlag.NO_OWNER | FlowFlag.OWNER_DIFFERS
_EXACT_HOOKS = (OwnerHook.CONNECT, OwnerHook.SENDMSG)

FlowKey = tuple[int, int, str, str, int, int]


class FlowRecord(NamedTuple):
    """The first packet of a new locally generated flow, and who sent it.

    `src`/`dst`/`sport`/`dport` are the packet as it left (after NAT); for ICMP echo requests
    `sport` is the echo id and `dport` is type << 8 | code. `pid` is the thread, `tgid` the
    process (both as seen from the initial pid namespace). `ktime_ns` is CLOCK_BOOTTIME.
    """

    family: int
    proto: int
    src: str
    dst: str
    sport: int
    dport: int
    pid: int
    tgid: int
    uid: int
    gid: int
    comm: str
    cgroup_id: int  # the sending task's cgroup v2 id
    sk_cgroup_id: int  # the socket's cgroup v2 id (where it was created)
    ktime_ns: int
    sock_cookie: int
    netns_cookie: int  # SO_NETNS_COOKIE of the socket's namespace
    netns_ino: int  # inode of the socket's namespace at creation (0: unknown)
    source: int  # FlowSource
    owner_hook: int  # OwnerHook
    flags: int  # FlowFlag

    @property
    def key(self) -> FlowKey:
        """The flow's identity to compare with `flow_key(...)` of a conntrack tuple."""
        if self.proto in ICMP_PROTOCOLS:
            return (self.family, self.proto, self.src, self.dst, self.sport, 0)
        return (self.family, self.proto, self.src, self.dst, self.sport, self.dport)

    @property
    def exact(self) -> bool:
        """The identity is certainly the sender's.

        From the sending task: when the socket's owner record (written by connect/sendmsg/
        socket() in the caller's own system call) names the same process, so the packet was
        not sent from softirq or a timer on behalf of someone else, and it is no kernel thread.
        From the owner record alone: when connect or sendmsg wrote it (socket() names only the
        creator). A connected UDP socket used by a forked child carries the right task but is
        flagged OWNER_DIFFERS, so it is not called exact.
        """
        if self.source == FlowSource.EGRESS_TASK:
            return not self.flags & _NOT_EXACT
        return self.source == FlowSource.SOCK_HOOK and self.owner_hook in _EXACT_HOOKS

    @property
    def icmp_type(self) -> int | None:
        """ICMP type of an echo request record."""
        return self.dport >> 8 if self.proto in ICMP_PROTOCOLS else None

    @property
    def icmp_code(self) -> int | None:
        """ICMP code of an echo request record."""
        return self.dport & 0xFF if self.proto in ICMP_PROTOCOLS else None


class ExecRecord(NamedTuple):
    """A process image replaced by exec: the new image's identity and arguments."""

    pid: int  # tgid
    tid: int
    ppid: int  # the real parent's tgid
    uid: int
    gid: int
    comm: str
    filename: str  # the path given to execve (as the kernel resolved it for scripts)
    argv: tuple[str, ...]
    args_truncated: bool  # the argument area was longer than what was captured
    cgroup_id: int
    ktime_ns: int

    @property
    def cmdline(self) -> str:
        """argv joined by spaces, as `ps` shows it."""
        return " ".join(self.argv)


class ForkRecord(NamedTuple):
    """A new process (fork/clone without CLONE_THREAD)."""

    pid: int
    ppid: int
    comm: str
    ktime_ns: int


BpfRecord = FlowRecord | ExecRecord | ForkRecord

_V4_NAMES: dict[bytes, str] = {}
_V6_NAMES: dict[bytes, str] = {}
_NAME_CACHE_SIZE = 65536


def _address(family: int, raw: bytes) -> str:
    """Text of an address, in the codec's spelling (dotted quad; RFC 5952 compressed)."""
    if family == AF_INET:
        key = raw[:4]
        name = _V4_NAMES.get(key)
        if name is None:
            if len(_V4_NAMES) >= _NAME_CACHE_SIZE:
                _V4_NAMES.clear()
            name = _V4_NAMES[key] = f"{key[0]}.{key[1]}.{key[2]}.{key[3]}"
        return name
    name = _V6_NAMES.get(raw)
    if name is None:
        if len(_V6_NAMES) >= _NAME_CACHE_SIZE:
            _V6_NAMES.clear()
        name = _V6_NAMES[raw] = ipaddress.IPv6Address(raw).compressed
    return name


_new_tuple = tuple.__new__


def _cstr(raw: bytes) -> str:
    """A NUL-terminated kernel string (comm, filename) as text."""
    end = raw.find(b"\0")
    return (raw if end < 0 else raw[:end]).decode("utf-8", "replace")


_COMMS: dict[bytes, str] = {}


def _comm(raw: bytes) -> str:
    """A task's comm as text, cached: a host runs few distinct names."""
    name = _COMMS.get(raw)
    if name is None:
        if len(_COMMS) >= _NAME_CACHE_SIZE:
            _COMMS.clear()
        name = _COMMS[raw] = _cstr(raw)
    return name


def _decode_flow(data: bytes) -> FlowRecord:
    (_, family, proto, source, owner_hook, flags, netns_ino, ktime, cookie, netns_cookie,
     cgroup_id, sk_cgroup_id, pid, tgid, uid, gid, sport, dport, saddr, daddr,
     comm) = _FLOW.unpack_from(data)
    if family not in (AF_INET, AF_INET6):
        raise DecodeError(1, f"flow record of unknown family {family}")
    # tuple.__new__ skips NamedTuple's argument handling (0.2 µs of a 0.9 µs decode, measured)
    return _new_tuple(FlowRecord, (
        family, proto, _address(family, saddr), _address(family, daddr), sport, dport, pid,
        tgid, uid, gid, _comm(comm), cgroup_id, sk_cgroup_id, ktime, cookie, netns_cookie,
        netns_ino, source, owner_hook, flags))


def _decode_exec(data: bytes) -> ExecRecord:
    (_, pid, tid, ppid, uid, gid, ktime, cgroup_id, args_size, argv_len, filename_len, comm,
     filename, argv_raw) = _EXEC.unpack_from(data)
    if argv_len > len(argv_raw) or filename_len > len(filename):
        raise DecodeError(40, f"exec record lengths out of range ({argv_len}, {filename_len})")
    raw = argv_raw[:argv_len]
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    argv = tuple(part.decode("utf-8", "replace") for part in raw.split(b"\0")) if raw else ()
    return ExecRecord(pid, tid, ppid, uid, gid, _cstr(comm),
                      filename[:filename_len].decode("utf-8", "replace"), argv,
                      args_size > argv_len, cgroup_id, ktime)


def _decode_fork(data: bytes) -> ForkRecord:
    _, pid, ppid, ktime, comm = _FORK.unpack_from(data)
    return ForkRecord(pid, ppid, _cstr(comm), ktime)


_DECODERS: dict[int, tuple[int, Callable[[bytes], BpfRecord]]] = {
    REC_FLOW: (_FLOW.size, _decode_flow), REC_EXEC: (_EXEC.size, _decode_exec),
    REC_FORK: (_FORK.size, _decode_fork)}


def decode_record(data: bytes) -> BpfRecord:
    """Decode one ring buffer sample; DecodeError when it is short or of an unknown type."""
    if not data:
        raise DecodeError(0, "empty BPF record")
    entry = _DECODERS.get(data[0])
    if entry is None:
        raise DecodeError(0, f"unknown BPF record type {data[0]}")
    size, decoder = entry
    if len(data) < size:
        raise DecodeError(len(data), f"BPF record of type {data[0]} needs {size} bytes")
    return decoder(data)


def flow_key(flow_tuple: FlowTuple, *, reverse: bool = False) -> FlowKey | None:
    """A conntrack tuple as a `FlowRecord.key`; `reverse` swaps the ends (use on the reply
    tuple: a record is the reply reversed). None for protocols records never carry."""
    proto = flow_tuple.proto
    if proto in ICMP_PROTOCOLS:
        ident = flow_tuple.icmp_id
        if ident is None:
            return None
        ends = (flow_tuple.dst, flow_tuple.src) if reverse else (flow_tuple.src, flow_tuple.dst)
        return (flow_tuple.family, proto, *ends, ident, 0)
    if flow_tuple.sport is None or flow_tuple.dport is None:
        return None
    if reverse:
        return (flow_tuple.family, proto, flow_tuple.dst, flow_tuple.src, flow_tuple.dport,
                flow_tuple.sport)
    return (flow_tuple.family, proto, flow_tuple.src, flow_tuple.dst, flow_tuple.sport,
            flow_tuple.dport)


def boot_to_epoch_offset_ns() -> int:
    """Add to a record's `ktime_ns` (CLOCK_BOOTTIME) to get UTC epoch nanoseconds."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


SO_NETNS_COOKIE = 71  # include/uapi/asm-generic/socket.h


def netns_cookie(sock_fd: int) -> int:
    """The network namespace cookie of the namespace `sock_fd`'s socket lives in (5.14+): the
    value FlowRecord.netns_cookie holds, to tell conntrack sources apart."""
    with socket.socket(fileno=os.dup(sock_fd)) as sock:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    return int.from_bytes(raw, "little")


# --- libbpf through ctypes ---------------------------------------------------------------------

LIBBPF = "libbpf.so.1"
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_LIBBPF_WARN = 0  # enum libbpf_print_level: WARN, INFO, DEBUG
_LIBBPF_INFO = 1


class _Insn(ctypes.Structure):
    """struct bpf_insn."""

    _fields_ = (("code", ctypes.c_uint8), ("regs", ctypes.c_uint8), ("off", ctypes.c_int16),
                ("imm", ctypes.c_int32))


class _ProgLoadOpts(ctypes.Structure):
    """struct bpf_prog_load_opts (libbpf bpf.h; `sz` makes it forward compatible)."""

    _fields_ = (("sz", ctypes.c_size_t), ("attempts", ctypes.c_int),
                ("expected_attach_type", ctypes.c_int), ("prog_btf_fd", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("prog_ifindex", ctypes.c_uint32),
                ("kern_version", ctypes.c_uint32), ("attach_btf_id", ctypes.c_uint32),
                ("attach_prog_fd", ctypes.c_uint32), ("attach_btf_obj_fd", ctypes.c_uint32),
                ("fd_array", ctypes.c_void_p), ("func_info", ctypes.c_void_p),
                ("func_info_cnt", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32),
                ("line_info", ctypes.c_void_p), ("line_info_cnt", ctypes.c_uint32),
                ("line_info_rec_size", ctypes.c_uint32), ("log_level", ctypes.c_uint32),
                ("log_size", ctypes.c_uint32), ("log_buf", ctypes.c_void_p))


_P = ctypes.c_void_p
_SIGNATURES: dict[str, tuple[type | None, list[type]]] = {
    "libbpf_set_print": (_P, [_PRINT_FN]),
    "libbpf_find_vmlinux_btf_id": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_int]),
    "libbpf_num_possible_cpus": (ctypes.c_int, []),
    "bpf_prog_load": (ctypes.c_int, [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, _P,
                                     ctypes.c_size_t, ctypes.POINTER(_ProgLoadOpts)]),
    "bpf_map_create": (ctypes.c_int, [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32,
                                      ctypes.c_uint32, ctypes.c_uint32, _P]),
    "bpf_map_lookup_elem": (ctypes.c_int, [ctypes.c_int, _P, _P]),
    "bpf_map_update_elem": (ctypes.c_int, [ctypes.c_int, _P, _P, ctypes.c_uint64]),
    "bpf_object__open_file": (_P, [ctypes.c_char_p, _P]),
    "bpf_object__load": (ctypes.c_int, [_P]),
    "bpf_object__close": (None, [_P]),
    "bpf_object__next_program": (_P, [_P, _P]),
    "bpf_object__find_map_by_name": (_P, [_P, ctypes.c_char_p]),
    "bpf_program__name": (ctypes.c_char_p, [_P]),
    "bpf_program__set_autoload": (ctypes.c_int, [_P, ctypes.c_bool]),
    "bpf_program__attach": (_P, [_P]),
    "bpf_program__attach_cgroup": (_P, [_P, ctypes.c_int]),
    "bpf_link__destroy": (ctypes.c_int, [_P]),
    "bpf_map__fd": (ctypes.c_int, [_P]),
    "ring_buffer__new": (_P, [ctypes.c_int, _SAMPLE_FN, _P, _P]),
    "ring_buffer__free": (None, [_P]),
    "ring_buffer__poll": (ctypes.c_int, [_P, ctypes.c_int]),
    "ring_buffer__consume": (ctypes.c_int, [_P]),
    "ring_buffer__epoll_fd": (ctypes.c_int, [_P]),
}

# libbpf's messages (verifier logs included) since the last `_libbpf_log_take()`
_LIBBPF_LOG: collections.deque[str] = collections.deque(maxlen=400)


@functools.cache
def _libbpf() -> ctypes.CDLL:
    """libbpf.so.1 with the prototypes we use, its messages routed to `_LIBBPF_LOG`."""
    try:
        lib = ctypes.CDLL(LIBBPF, use_errno=True)
    except OSError as exc:
        raise KernelError(f"{LIBBPF} not found ({exc}): install Debian package libbpf1") from exc
    for name, (restype, argtypes) in _SIGNATURES.items():
        func = getattr(lib, name)
        func.restype = restype
        func.argtypes = argtypes
    lib.libbpf_set_print(_print_callback)
    return lib


@functools.cache
def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                              ctypes.c_void_p]
    lib.vsnprintf.restype = ctypes.c_int
    return lib


def _print(level: int, fmt: bytes | None, args: int | None) -> int:
    """libbpf's print callback: format with vsnprintf (va_list passes through as a pointer)."""
    if level > _LIBBPF_INFO or fmt is None:
        return 0
    buf = ctypes.create_string_buffer(1024)
    _libc().vsnprintf(buf, len(buf), fmt, args)
    for line in buf.value.decode("utf-8", "replace").splitlines():
        if line.strip():
            _LIBBPF_LOG.append(line)
    return 0


_print_callback = _PRINT_FN(_print)


def _libbpf_log_take(last: int = 25) -> str:
    """libbpf's latest messages (the verifier's verdict is at the end), and forget them all."""
    lines = list(_LIBBPF_LOG)[-last:]
    _LIBBPF_LOG.clear()
    return "\n".join(lines)


def _errno_text(code: int) -> str:
    code = abs(code)
    return f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)})"


# --- probing what the kernel allows ------------------------------------------------------------

# include/uapi/linux/bpf.h
_PROG_CGROUP_SKB, _PROG_CGROUP_SOCK, _PROG_CGROUP_SOCK_ADDR, _PROG_TRACING = 8, 9, 18, 26
_ATTACH_EGRESS, _ATTACH_SOCK_CREATE, _ATTACH_CONNECT4, _ATTACH_TRACE_RAW_TP = 1, 2, 10, 23
_HELPERS = {
    "bpf_ktime_get_boot_ns": 125, "bpf_get_current_pid_tgid": 14,
    "bpf_get_current_uid_gid": 15, "bpf_get_current_comm": 16,
    "bpf_get_current_cgroup_id": 80, "bpf_get_current_task_btf": 158,
    "bpf_get_socket_cookie": 46, "bpf_get_netns_cookie": 122, "bpf_skb_cgroup_id": 79,
    "bpf_sk_fullsock": 95, "bpf_sk_storage_get": 107, "bpf_ringbuf_reserve": 131,
    "bpf_probe_read_kernel": 113, "bpf_probe_read_user": 112,
    "bpf_probe_read_kernel_str": 115,
}
_TASK_HELPERS = ("bpf_get_current_pid_tgid", "bpf_get_current_uid_gid", "bpf_get_current_comm",
                 "bpf_get_current_cgroup_id", "bpf_get_current_task_btf")
_EGRESS_HELPERS = ("bpf_ktime_get_boot_ns", "bpf_get_socket_cookie", "bpf_get_netns_cookie",
                   "bpf_skb_cgroup_id", "bpf_sk_fullsock", "bpf_sk_storage_get",
                   "bpf_ringbuf_reserve")
_SOCK_HOOK_HELPERS = ("bpf_sk_storage_get", "bpf_probe_read_kernel", *_TASK_HELPERS)
_TRACE_HELPERS = ("bpf_ringbuf_reserve", "bpf_ktime_get_boot_ns", "bpf_get_current_uid_gid",
                  "bpf_get_current_comm", "bpf_get_current_cgroup_id", "bpf_probe_read_kernel",
                  "bpf_probe_read_user", "bpf_probe_read_kernel_str")
_REFUSALS = ("cannot use helper", "unknown func", "invalid func")


class _Target(NamedTuple):
    name: str
    prog_type: int
    attach_type: int
    ret: int
    btf_name: str | None = None


_TARGETS = {
    "cgroup_skb/egress": _Target("cgroup_skb/egress", _PROG_CGROUP_SKB, _ATTACH_EGRESS, 1),
    "cgroup/sock_create": _Target("cgroup/sock_create", _PROG_CGROUP_SOCK, _ATTACH_SOCK_CREATE,
                                  1),
    "cgroup/connect4": _Target("cgroup/connect4", _PROG_CGROUP_SOCK_ADDR, _ATTACH_CONNECT4, 1),
    "tp_btf/sched_process_exec": _Target("tp_btf/sched_process_exec", _PROG_TRACING,
                                         _ATTACH_TRACE_RAW_TP, 0, "sched_process_exec"),
    "tp_btf/sched_process_fork": _Target("tp_btf/sched_process_fork", _PROG_TRACING,
                                         _ATTACH_TRACE_RAW_TP, 0, "sched_process_fork"),
}


def _load_insns(target: _Target, insns: list[tuple[int, int, int, int]]) -> tuple[int, str]:
    """Load a raw program for `target`: (0, '') when accepted, else (errno, verifier's line)."""
    lib = _libbpf()
    btf_id = 0
    if target.btf_name is not None:
        btf_id = int(lib.libbpf_find_vmlinux_btf_id(target.btf_name.encode(),
                                                     target.attach_type))
        if btf_id < 0:
            return -btf_id, f"no BTF for tracepoint {target.btf_name}"
    code = (_Insn * len(insns))(*(_Insn(*insn) for insn in insns))
    log_buf = ctypes.create_string_buffer(16384)
    opts = _ProgLoadOpts(sz=ctypes.sizeof(_ProgLoadOpts), expected_attach_type=target.attach_type,
                         attach_btf_id=btf_id, log_level=1, log_size=len(log_buf),
                         log_buf=ctypes.cast(log_buf, ctypes.c_void_p))
    fd = int(lib.bpf_prog_load(target.prog_type, b"ct_probe", b"GPL", ctypes.addressof(code),
                               len(insns), ctypes.byref(opts)))
    _LIBBPF_LOG.clear()
    if fd >= 0:
        os.close(fd)
        return 0, ""
    lines = [line for line in log_buf.value.decode("utf-8", "replace").splitlines()
             if line.strip() and not line.startswith("processed ")]
    return -fd, (lines[-1] if lines else _errno_text(fd))


def _probe_program(target: _Target) -> tuple[bool, str]:
    err, why = _load_insns(target, [(0xB7, 0, 0, target.ret), (0x95, 0, 0, 0)])
    return (True, "yes") if err == 0 else (False, f"no: {why or _errno_text(err)}")


def _probe_helper(target: _Target, helper: str) -> tuple[bool, str]:
    """Can `target` call `helper`? A call with dummy arguments: the verifier first looks the
    helper up for the program type (refusal: 'cannot use helper'/'unknown func'), only then
    checks the arguments, so an argument complaint still means the helper is allowed."""
    insns = [(0x85, 0, 0, _HELPERS[helper]), (0xB7, 0, 0, target.ret), (0x95, 0, 0, 0)]
    err, why = _load_insns(target, insns)
    if err == 0:
        return True, "yes"
    if err == errno.EPERM or any(refusal in why for refusal in _REFUSALS):
        return False, f"no: {why}"
    return True, "yes"


@dataclass(frozen=True, slots=True)
class BpfSupport:
    """What the eBPF tier can do here, and why not when it cannot.

    `egress` is 'task' (cgroup_skb may call bpf_get_current_pid_tgid & co and reads the
    sending task itself, as on 6.18; older kernels refuse those helpers there), 'socket'
    (identity from the socket's owner record kept by the cgroup sock hooks) or None.
    `features` lists every question asked, e.g. ('cgroup_skb/egress: bpf_get_current_pid_tgid',
    'yes') or ('…', 'no: program of this type cannot use helper …').
    """

    usable: bool
    egress: str | None
    sock_hooks: bool
    exec_hook: bool
    fork_hook: bool
    can_build: bool
    cached_object: str | None
    cgroup_root: str | None
    problems: tuple[str, ...]
    features: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        """One paragraph for logs and `conntrail check`."""
        if self.usable:
            head = (f"eBPF attribution available: egress identity from the "
                    f"{'sending task' if self.egress == 'task' else 'socket owner record'}"
                    f"{', exec' if self.exec_hook else ''}{', fork' if self.fork_hook else ''}")
        else:
            head = "eBPF attribution unavailable"
        return head + "".join(f"; {problem}" for problem in self.problems)


def cgroup2_root(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or …/unified on hybrid hosts)."""
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as handle:
            return cgroups.parse_mountinfo(handle.read())
    except OSError:
        return None


def probe(*, cache_dir: str | os.PathLike[str] | None = None) -> BpfSupport:
    """Find out what works on this kernel (one tiny program load per question, ~ms in all)."""
    problems: list[str] = []
    features: list[tuple[str, str]] = []
    cached = _cached_object(cache_dir)
    can_build, build_problems = _build_tools()
    if cached is None and not can_build:
        problems.extend(build_problems)
    root = cgroup2_root()
    if root is None:
        problems.append("no cgroup v2 hierarchy mounted (needed for cgroup_skb/egress)")
    if not os.path.exists(VMLINUX_BTF):
        problems.append(f"{VMLINUX_BTF} missing: the kernel has no BTF (CONFIG_DEBUG_INFO_BTF)")
    try:
        _libbpf()
    except KernelError as exc:
        problems.append(str(exc))
        return BpfSupport(False, None, False, False, False, can_build, cached, root,
                          tuple(problems), tuple(features))

    def ask(target: str, helpers: tuple[str, ...]) -> bool:
        ok, answer = _probe_program(_TARGETS[target])
        features.append((target, answer))
        if not ok:
            return False
        good = True
        for helper in helpers:
            allowed, answer = _probe_helper(_TARGETS[target], helper)
            features.append((f"{target}: {helper}", answer))
            good = good and allowed
        return good

    task_ok = ask("cgroup_skb/egress", (*_EGRESS_HELPERS, *_TASK_HELPERS))
    answers = dict(features)
    base_ok = all(answers.get(f"cgroup_skb/egress: {h}") == "yes" for h in _EGRESS_HELPERS)
    sock_hooks = ask("cgroup/sock_create", _SOCK_HOOK_HELPERS) and ask(
        "cgroup/connect4", _SOCK_HOOK_HELPERS)
    exec_hook = ask("tp_btf/sched_process_exec", _TRACE_HELPERS)
    fork_hook = ask("tp_btf/sched_process_fork", ())
    egress = "task" if task_ok else ("socket" if base_ok and sock_hooks else None)
    if egress is None:
        refused = [f"{name} {answer}" for name, answer in features
                   if name.startswith("cgroup_skb") and answer != "yes"]
        problems.append("flow attribution impossible: " + "; ".join(refused[:3]))
    if any(answer.startswith("no: ") and "EPERM" in answer for _, answer in features) or (
            os.geteuid() != 0 and egress is None):
        problems.append("loading BPF programs needs root (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN)")
    usable = egress is not None and root is not None and (cached is not None or can_build)
    return BpfSupport(usable, egress, sock_hooks, exec_hook, fork_hook, can_build, cached, root,
                      tuple(problems), tuple(features))


# --- building the object -----------------------------------------------------------------------

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
DEFAULT_CACHE = "/var/cache/conntrail/bpf"
LIBBPF_HEADER = "/usr/include/bpf/bpf_helpers.h"
_SOURCE_NAME = "attribution.bpf.c"
_ARCH = {"x86_64": "x86", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "powerpc",
         "s390x": "s390", "riscv64": "riscv", "loongarch64": "loongarch"}


def _source() -> bytes:
    return importlib.resources.files("conntrail.bpf").joinpath(_SOURCE_NAME).read_bytes()


def cache_directory(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """<cache>/<kernel release>: argument, else $CONNTRAIL_BPF_CACHE, else /var/cache/…."""
    base = cache_dir or os.environ.get("CONNTRAIL_BPF_CACHE") or DEFAULT_CACHE
    return Path(base) / os.uname().release


def object_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the object for this kernel release and this source is (or will be) cached."""
    digest = hashlib.sha256(_source()).hexdigest()[:16]
    return cache_directory(cache_dir) / f"attribution-{digest}.bpf.o"


def _cached_object(cache_dir: str | os.PathLike[str] | None) -> str | None:
    path = object_path(cache_dir)
    return str(path) if path.is_file() else None


def _build_tools() -> tuple[bool, list[str]]:
    missing = [f"{tool} not found (Debian package {package})"
               for tool, package in (("clang", "clang"), ("bpftool", "bpftool"))
               if shutil.which(tool) is None]
    if not os.path.exists(LIBBPF_HEADER):
        missing.append(f"{LIBBPF_HEADER} not found (Debian package libbpf-dev)")
    return not missing, missing


def _run(args: list[str], what: str, stdout: int | None = None) -> bytes:
    try:
        proc = subprocess.run(args, stdout=stdout or subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelError(f"{what}: {exc}") from exc
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-15:]
        raise KernelError(f"{what} failed ({proc.returncode}):\n" + "\n".join(tail))
    return proc.stdout or b""


def build_object(*, cache_dir: str | os.PathLike[str] | None = None,
                 force: bool = False) -> Path:
    """The compiled object for the running kernel: from the cache, else built (clang, bpftool)
    and cached atomically. KernelError names the missing tool or shows the compiler's error."""
    target = object_path(cache_dir)
    if target.is_file() and not force:
        return target
    ok, missing = _build_tools()
    if not ok:
        raise KernelError("cannot build the eBPF attribution program: " + "; ".join(missing))
    if not os.path.exists(VMLINUX_BTF):
        raise KernelError(f"cannot build the eBPF attribution program: {VMLINUX_BTF} missing")
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    except OSError as exc:
        raise KernelError(f"BPF cache {target.parent}: {exc.strerror}") from exc
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".build-", dir=target.parent) as tmp:
        header = Path(tmp, "vmlinux.h")
        with open(header, "wb") as out:
            _run(["bpftool", "btf", "dump", "file", VMLINUX_BTF, "format", "c"],
                 "bpftool btf dump", stdout=out.fileno())
        source = Path(tmp, _SOURCE_NAME)
        source.write_bytes(_source())
        built = Path(tmp, "out.o")
        args = ["clang", "-g", "-O2", "-target", "bpf", "-I", tmp, "-c", str(source),
                "-o", str(built)]
        arch = _ARCH.get(platform.machine())
        if arch:
            args.insert(1, f"-D__TARGET_ARCH_{arch}")
        _run(args, "clang (compiling attribution.bpf.c)")
        os.chmod(built, 0o644)
        os.replace(built, target)
    for stale in target.parent.glob("attribution-*.bpf.o"):
        if stale != target:
            with contextlib.suppress(OSError):
                stale.unlink()
    log.info("built %s in %.2f s", target, time.monotonic() - started)
    return target


# --- loading, attaching, reading ---------------------------------------------------------------

_DROP_SLOTS = 4
_CFG_IDLE_NS = 0
_CGROUP_PROGRAMS = ("ct_sock_create", "ct_connect4", "ct_connect6", "ct_sendmsg4",
                    "ct_sendmsg6")


class BpfDrops(NamedTuple):
    """Records the programs could not queue because the ring buffer was full."""

    flow: int
    exec: int
    fork: int


class BpfAttribution:
    """The loaded, attached programs and their ring buffer.

    Select on `fileno()` (an epoll fd, readable when records wait) and call `read()`, or call
    `poll(timeout_ms)`. `close()` detaches everything; closing the process does too (links are
    not pinned). Use `open()` rather than the constructor.
    """

    def __init__(self) -> None:
        self._lib = _libbpf()
        self._obj: int | None = None
        self._links: list[tuple[str, int]] = []
        self._ring: int | None = None
        self._pending: list[BpfRecord] = []
        self._malformed = 0
        self._drops_fd = -1
        self._ncpus = max(1, int(self._lib.libbpf_num_possible_cpus()))
        self._callback = _SAMPLE_FN(self._on_sample)
        self.support: BpfSupport | None = None
        self.object_file = ""
        self.attached: tuple[str, ...] = ()

    @classmethod
    def open(cls, *, support: BpfSupport | None = None,
             cache_dir: str | os.PathLike[str] | None = None,
             idle_s: float = 30.0) -> BpfAttribution:
        """Build (or take from the cache), load and attach; KernelError says what failed.

        `idle_s`: a datagram flow silent that long is reported again when it resumes (its
        conntrack entry may have expired and been created anew); 30 s is the kernel's
        nf_conntrack_udp_timeout.
        """
        support = support if support is not None else probe(cache_dir=cache_dir)
        if not support.usable or support.cgroup_root is None:
            raise KernelError(support.describe())
        self = cls()
        self.support = support
        try:
            self.object_file = str(build_object(cache_dir=cache_dir))
            self._load(support, idle_s)
            self._attach(support.cgroup_root)
            self._open_ring()
        except BaseException:
            self.close()
            raise
        return self

    # -- setup

    def _load(self, support: BpfSupport, idle_s: float) -> None:
        lib = self._lib
        _LIBBPF_LOG.clear()
        obj = lib.bpf_object__open_file(self.object_file.encode(), None)
        if not obj:
            raise KernelError(f"libbpf cannot open {self.object_file}: "
                              f"{_errno_text(ctypes.get_errno())}\n{_libbpf_log_take()}")
        self._obj = int(obj)
        wanted = {"ct_egress": support.egress == "task",
                  "ct_egress_sk": support.egress == "socket",
                  "ct_exec": support.exec_hook, "ct_fork": support.fork_hook,
                  **dict.fromkeys(_CGROUP_PROGRAMS, support.sock_hooks)}
        for name, prog in self._programs():
            lib.bpf_program__set_autoload(prog, wanted.get(name, False))
        err = int(lib.bpf_object__load(self._obj))
        if err:
            raise KernelError(f"the kernel refused the eBPF attribution programs: "
                              f"{_errno_text(err)}\n{_libbpf_log_take(40)}")
        self._drops_fd = self._map_fd("ct_drops")
        key = ctypes.c_uint32(_CFG_IDLE_NS)
        value = ctypes.c_uint64(int(idle_s * 1e9))
        if lib.bpf_map_update_elem(self._map_fd("ct_config"), ctypes.byref(key),
                                   ctypes.byref(value), 0):
            raise KernelError(f"BPF config map: {_errno_text(ctypes.get_errno())}")
        self.attached = tuple(name for name, on in wanted.items() if on)

    def _programs(self) -> Iterator[tuple[str, int]]:
        prog = self._lib.bpf_object__next_program(self._obj, None)
        while prog:
            yield (self._lib.bpf_program__name(prog) or b"").decode(), int(prog)
            prog = self._lib.bpf_object__next_program(self._obj, prog)

    def _map_fd(self, name: str) -> int:
        bpf_map = self._lib.bpf_object__find_map_by_name(self._obj, name.encode())
        fd = int(self._lib.bpf_map__fd(bpf_map)) if bpf_map else -1
        if fd < 0:
            raise KernelError(f"BPF map {name} missing from {self.object_file}")
        return fd

    def _attach(self, cgroup_root: str) -> None:
        try:
            cgroup_fd = os.open(cgroup_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise KernelError(f"cgroup v2 root {cgroup_root}: {exc.strerror}") from exc
        try:
            programs = dict(self._programs())
            for name in self.attached:
                prog = programs[name]
                if name in ("ct_exec", "ct_fork"):
                    link = self._lib.bpf_program__attach(prog)
                else:
                    link = self._lib.bpf_program__attach_cgroup(prog, cgroup_fd)
                if not link:
                    raise KernelError(f"attaching {name}: {_errno_text(ctypes.get_errno())}\n"
                                      f"{_libbpf_log_take()}")
                self._links.append((name, int(link)))
        finally:
            os.close(cgroup_fd)

    def _open_ring(self) -> None:
        ring = self._lib.ring_buffer__new(self._map_fd("ct_events"), self._callback, None, None)
        if not ring:
            raise KernelError(f"BPF ring buffer: {_errno_text(ctypes.get_errno())}")
        self._ring = int(ring)

    # -- reading

    def _on_sample(self, _ctx: int | None, data: int | None, size: int) -> int:
        try:
            self._pending.append(decode_record(ctypes.string_at(data or 0, size)))
        except DecodeError:
            self._malformed += 1
        return 0

    def fileno(self) -> int:
        """An fd that selects readable when records wait (libbpf's epoll fd)."""
        if self._ring is None:
            raise KernelError("BPF attribution is closed")
        return int(self._lib.ring_buffer__epoll_fd(self._ring))

    def read(self) -> list[BpfRecord]:
        """Every record waiting now, oldest first; never blocks."""
        if self._ring is None:
            raise KernelError("BPF attribution is closed")
        err = int(self._lib.ring_buffer__consume(self._ring))
        return self._take(err)

    def poll(self, timeout_ms: int = 0) -> list[BpfRecord]:
        """Wait up to `timeout_ms` for records, then return every one waiting."""
        if self._ring is None:
            raise KernelError("BPF attribution is closed")
        err = int(self._lib.ring_buffer__poll(self._ring, timeout_ms))
        if err == -errno.EINTR:
            err = 0
        return self._take(err)

    def _take(self, err: int) -> list[BpfRecord]:
        records, self._pending = self._pending, []
        if err < 0:
            raise KernelError(f"BPF ring buffer: {_errno_text(err)}")
        return records

    @property
    def malformed(self) -> int:
        """Samples that did not decode (a source/loader mismatch; should stay 0)."""
        return self._malformed

    def drops(self) -> BpfDrops:
        """Records lost in the kernel because the ring buffer was full, per kind, since load."""
        counts = [0] * _DROP_SLOTS
        values = (ctypes.c_uint64 * self._ncpus)()
        for slot in range(3):
            key = ctypes.c_uint32(slot)
            if self._drops_fd >= 0 and self._lib.bpf_map_lookup_elem(
                    self._drops_fd, ctypes.byref(key), values) == 0:
                counts[slot] = sum(values)
        return BpfDrops(counts[0], counts[1], counts[2])

    # -- teardown

    def close(self) -> None:
        """Detach every program and free the object; safe to call twice."""
        lib = self._lib
        if self._ring is not None:
            lib.ring_buffer__free(self._ring)
            self._ring = None
        while self._links:
            name, link = self._links.pop()
            if lib.bpf_link__destroy(link):
                log.warning("detaching %s failed", name)
        if self._obj is not None:
            lib.bpf_object__close(self._obj)
            self._obj = None
        self._drops_fd = -1
        self._pending = []

    def __enter__(self) -> BpfAttribution:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

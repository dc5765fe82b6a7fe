"""cgroup v2: find the mount, map a cgroup id to its path, a path to its unit or container.

A cgroup v2 id (what sock_diag's INET_DIAG_CGROUP_ID, `socket cgroupv2` and bpf report) is the
kernfs node id of the cgroup's directory, which is also the directory's inode number on 64-bit
kernels. `CgroupMap.path_of` turns an id into a path below the mount in one system call when
it may (open_by_handle_at with a kernfs file handle, CAP_DAC_READ_SEARCH), otherwise from a
cache filled by walking the mount (readdir's d_ino is the id, so the walk needs no stat),
refreshed on a miss at most once per `walk_interval`. Paths are relative to the cgroup2 mount
and start with "/" ("/" is the root cgroup). Works on pure v2 (/sys/fs/cgroup) and hybrid
hosts (/sys/fs/cgroup/unified): the mount is found in /proc/self/mountinfo.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import time
from typing import NamedTuple

from conntrail.errors import KernelError
from conntrail.kernel.netns import _libc

MOUNTINFO = "/proc/self/mountinfo"
FILEID_KERNFS = 0xFE  # include/linux/exportfs.h, enum fid_type: u64 kernfs node id
_HANDLE_BYTES = 8
# open_by_handle_at answers these when the id names no live cgroup (removed, or never was)
_GONE = frozenset({2, 116})  # ENOENT, ESTALE
_UNIT_SUFFIXES = (".service", ".scope")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# systemd scope names of container runtimes: <prefix><id>.scope
_SCOPE_RUNTIMES = (("docker-", "docker"), ("cri-containerd-", "containerd"),
                   ("crio-", "cri-o"), ("libpod-", "podman"))


class Container(NamedTuple):
    """A container found in a cgroup path: its runtime and id."""

    runtime: str  # docker, containerd, cri-o, podman, or kubepods (cgroupfs driver)
    id: str


def parse_mountinfo(text: str) -> str | None:
    """The mount point of the first cgroup2 file system mounted from its root, or None."""
    for line in text.splitlines():
        fields, sep, rest = line.partition(" - ")
        if not sep:
            continue
        parts = fields.split()
        if len(parts) >= 5 and rest.split(" ", 1)[0] == "cgroup2" and parts[3] == "/":
            return _unescape(parts[4])
    return None


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


@functools.cache
def find_mount(mountinfo: str = MOUNTINFO) -> str:
    """The cgroup2 mount point (cached); KernelError when there is none."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as handle:
            mount = parse_mountinfo(handle.read())
    except OSError as exc:
        raise KernelError(f"{mountinfo}: {exc.strerror}") from exc
    if mount is None:
        raise KernelError("no cgroup2 file system is mounted (see /proc/self/mountinfo)")
    return mount


def is_root(path: str) -> bool:
    """True for the root cgroup, which holds every process not placed elsewhere."""
    return path in ("", "/")


def unit_of(path: str) -> str | None:
    """The systemd unit a cgroup belongs to: its last `*.service` or `*.scope` component
    (/user.slice/user-1000.slice/session-3.scope → session-3.scope)."""
    for part in reversed(path.split("/")):
        stem, dot, suffix = part.rpartition(".")
        if stem and f"{dot}{suffix}" in _UNIT_SUFFIXES:
            return part
    return None


def container_of(path: str) -> Container | None:
    """The container a cgroup belongs to, from the names runtimes give their cgroups:
    docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope, libpod-<id>.scope (systemd
    driver), /docker/<id> and /kubepods…/<64 hex> (cgroupfs driver). The innermost wins;
    conmon's libpod-conmon-<id>.scope is not the container."""
    parts = path.split("/")
    for index in range(len(parts) - 1, -1, -1):
        part = parts[index]
        if part.endswith(".scope"):
            name = part[:-len(".scope")]
            for prefix, runtime in _SCOPE_RUNTIMES:
                if name.startswith(prefix) and not name.startswith("libpod-conmon-"):
                    ident = name[len(prefix):]
                    if ident:
                        return Container(runtime, ident)
        elif index > 0 and parts[index - 1] == "docker" and _HEX64.fullmatch(part):
            return Container("docker", part)
        elif _HEX64.fullmatch(part) and any(p.startswith("kubepods") for p in parts[:index]):
            return Container("kubepods", part)
    return None


def procs(path: str, mount: str | None = None) -> list[int]:
    """The pids in one cgroup (its cgroup.procs, not its children's); [] when it is gone."""
    base = mount if mount is not None else find_mount()
    try:
        with open(f"{base}{'' if is_root(path) else path}/cgroup.procs", "rb") as handle:
            return [int(line) for line in handle.read().split()]
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return []
    except OSError as exc:
        raise KernelError(f"cgroup {path}: {exc.strerror}") from exc


def cgroup_of_pid(pid: int) -> str | None:
    """A process's cgroup v2 path (the `0::` line of /proc/<pid>/cgroup); None if gone."""
    try:
        with open(f"/proc/{pid}/cgroup", "rb") as handle:
            for line in handle:
                if line.startswith(b"0::"):
                    return line[3:].rstrip(b"\n").decode("utf-8", "surrogateescape")
    except OSError:
        return None
    return None


class _FileHandle(ctypes.Structure):
    """struct file_handle with room for a kernfs id (linux/fcntl.h, open_by_handle_at(2))."""

    _fields_ = (("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * _HANDLE_BYTES))


class CgroupMap:
    """cgroup id ⇄ path below the cgroup2 mount, cached; open/close around its mount fd."""

    def __init__(self, mount: str | None = None, *, walk_interval: float = 1.0,
                 max_entries: int = 1 << 16, use_handles: bool = True) -> None:
        self.mount = mount if mount is not None else find_mount()
        self.walk_interval = walk_interval
        self.max_entries = max_entries
        self.root_id = os.stat(self.mount).st_ino
        self._paths: dict[int, str] = {self.root_id: "/"}
        self._last_walk = -float("inf")
        self._mount_fd: int | None = None
        self.handles = use_handles  # open_by_handle_at usable (cleared on EPERM/EOPNOTSUPP)
        self.walks = 0  # how many times the mount was walked
        self.resolved = 0  # ids answered by open_by_handle_at
        self.misses = 0  # ids we could not map

    def close(self) -> None:
        """Release the mount fd (the map stays usable: the next handle lookup reopens it)."""
        if self._mount_fd is not None:
            os.close(self._mount_fd)
            self._mount_fd = None

    def __enter__(self) -> CgroupMap:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def is_root_id(self, cgroup_id: int) -> bool:
        """True for the root cgroup's id."""
        return cgroup_id == self.root_id

    def id_of(self, path: str) -> int:
        """The id of the cgroup at `path` (its directory's inode number)."""
        return os.stat(self.directory(path)).st_ino

    def directory(self, path: str) -> str:
        """The absolute directory of a cgroup path."""
        return self.mount if is_root(path) else f"{self.mount}{path}"

    def procs(self, path: str) -> list[int]:
        """The pids in the cgroup at `path` (not its children)."""
        return procs(path, self.mount)

    def path_of(self, cgroup_id: int) -> str | None:
        """The path of cgroup `cgroup_id`, or None when no live cgroup has it (or the walk
        that might find it ran less than `walk_interval` ago)."""
        path = self._paths.get(cgroup_id)
        if path is not None:
            return path
        if self.handles:
            path = self._by_handle(cgroup_id)
            if self.handles:  # the kernel answered, found or not: a walk would agree
                if path is None:
                    self.misses += 1
                else:
                    self.resolved += 1
                    self._remember(cgroup_id, path)
                return path
        now = time.monotonic()
        if now - self._last_walk >= self.walk_interval:
            self._last_walk = now
            self._walk()
            path = self._paths.get(cgroup_id)
        if path is None:
            self.misses += 1
        return path

    def _remember(self, cgroup_id: int, path: str) -> None:
        if len(self._paths) >= self.max_entries:
            self._paths = {self.root_id: "/"}
        self._paths[cgroup_id] = path

    def _by_handle(self, cgroup_id: int) -> str | None:
        """open_by_handle_at(mount, {FILEID_KERNFS, id}); clears self.handles when the kernel
        or our privileges refuse it."""
        if self._mount_fd is None:
            self._mount_fd = os.open(self.mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        handle = _FileHandle(_HANDLE_BYTES, FILEID_KERNFS,
                             (ctypes.c_ubyte * _HANDLE_BYTES)(*cgroup_id.to_bytes(8, "little")))
        fd = _libc().open_by_handle_at(self._mount_fd, ctypes.byref(handle),
                                       os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            if err not in _GONE:
                self.handles = False  # EPERM (no CAP_DAC_READ_SEARCH), EOPNOTSUPP, EINVAL…
            return None
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        if target == self.mount:
            return "/"
        if not target.startswith(self.mount + "/") or target.endswith(" (deleted)"):
            return None  # mounted elsewhere too, or removed meanwhile
        return target[len(self.mount):]

    def _walk(self) -> None:
        """Add every cgroup below the mount to the cache (d_ino is the id: no stat)."""
        self.walks += 1
        found: dict[int, str] = {}
        stack = [("", self.mount)]
        while stack:
            rel, directory = stack.pop()
            try:
                with os.scandir(directory) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            path = f"{rel}/{entry.name}"
                            found[entry.inode()] = path
                            stack.append((path, entry.path))
            except OSError:
                continue  # removed while we walked
        if len(self._paths) + len(found) > self.max_entries:
            self._paths = {self.root_id: "/"}
        self._paths.update(found)

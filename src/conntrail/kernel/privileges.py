"""Dropping root: switch to an unprivileged user and keep only the capabilities named.

Order matters, and the caller owns it: open every netlink socket and privileged resource
first, then call `drop_to` while the process has ONE thread. Capabilities are per thread:
threads started afterwards inherit the kept set, threads started before would keep root's.
"""

from __future__ import annotations

import ctypes
import enum
import grp
import os
import pwd
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from conntrail.errors import ConfigError, KernelError

_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_CAP_VERSION_3 = 0x20080522  # _LINUX_CAPABILITY_VERSION_3 (linux/capability.h)
_CAP_LAST = 40  # CAP_CHECKPOINT_RESTORE on 6.x; higher numbers are refused with EINVAL


class Cap(enum.IntEnum):
    """The capabilities conntrail may keep (numbers from linux/capability.h)."""

    DAC_READ_SEARCH = 2  # open_by_handle_at: a cgroup id back to its path
    SETPCAP = 8
    NET_ADMIN = 12  # conntrack/nftables netlink, sysctls, resync dumps
    SYS_PTRACE = 19  # /proc/PID/exe and fd links of other users' processes
    SYS_ADMIN = 21  # setns into named network namespaces
    PERFMON = 38  # eBPF programs (loading happens before the drop)
    BPF = 39


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32))


@dataclass(frozen=True, slots=True)
class Identity:
    """Who to become."""

    user: str
    uid: int
    gid: int


def resolve(user: str, group: str | None, key: str = "daemon.user") -> Identity:
    """Look the user (and group) up now, so a typo is a config error before we start."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(key, f"no such user {user!r}") from None
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError("daemon.group", f"no such group {group!r}") from None
    return Identity(user, entry.pw_uid, gid)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg2: int, arg3: int = 0) -> int:
    """prctl(2); the errno when it fails, else 0."""
    if _libc().prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), 0, 0) != 0:
        return ctypes.get_errno()
    return 0


def _prctl_or_raise(option: int, arg2: int, arg3: int = 0) -> None:
    err = _prctl(option, arg2, arg3)
    if err:
        raise KernelError(f"prctl({option}, {arg2}, {arg3}): {os.strerror(err)}")


def _capset(caps: frozenset[Cap]) -> None:
    low = sum(1 << cap for cap in caps if cap < 32)
    high = sum(1 << (cap - 32) for cap in caps if cap >= 32)
    header = _CapHeader(_CAP_VERSION_3, 0)
    # Inheritable too: the ambient set (below) may only hold inheritable capabilities.
    data = (_CapData * 2)(_CapData(low, low, low), _CapData(high, high, high))
    if _libc().capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise KernelError(f"capset: {os.strerror(err)}")


def drop_to(identity: Identity, keep: frozenset[Cap]) -> None:
    """Become `identity` with only `keep` in the permitted, effective and bounding sets."""
    if os.geteuid() == identity.uid:
        return  # already that user (a systemd unit's User=): its ambient set applies
    if threading.active_count() != 1:
        # Capabilities are per thread: a thread started earlier would stay root.
        raise KernelError("privileges must be dropped before any thread starts")
    for cap in range(_CAP_LAST + 1):
        if cap not in keep:
            _drop_bounding(cap)
    _prctl_or_raise(_PR_SET_KEEPCAPS, 1)
    os.initgroups(identity.user, identity.gid)
    os.setgid(identity.gid)
    os.setuid(identity.uid)  # permitted survive thanks to KEEPCAPS; effective are cleared
    _capset(keep)
    for cap in keep:
        # Ambient: the helpers we run (nft, to remove our tables at exit) keep them too.
        _prctl_or_raise(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap)
    _prctl_or_raise(_PR_SET_KEEPCAPS, 0)
    _prctl_or_raise(_PR_SET_NO_NEW_PRIVS, 1)  # no setuid binary can give anything back


def _drop_bounding(cap: int) -> None:
    err = _prctl(_PR_CAPBSET_DROP, cap)
    if err and err != 22:  # EINVAL: this kernel has no such capability
        raise KernelError(f"dropping capability {cap} from the bounding set: "
                          f"{os.strerror(err)}")


# Never handed to the daemon's user (named, not used as temporary directories).
SHARED_DIRECTORIES = frozenset(map(Path, (
    "/", "/etc", "/usr", "/var", "/var/lib", "/var/log", "/var/cache", "/tmp",  # noqa: S108
    "/var/tmp", "/home", "/root", "/run", "/srv", "/opt")))  # noqa: S108


def give_tree(path: Path, identity: Identity) -> None:
    """Make `path` (created 0750 if missing) and what is in it the user's, before dropping:
    files an earlier root run left there must stay writable.

    Runs as root in a directory the user owned last time: symlinks are never followed (a
    link to /etc/shadow must not be handed over), and only regular files and directories
    change owner. A shared system directory is refused outright.
    """
    path = Path(os.path.abspath(path))
    if path in SHARED_DIRECTORIES:
        raise ConfigError("daemon.state_dir/log_dir", f"{path} is a shared system directory; "
                          "use one of conntrail's own (e.g. /var/lib/conntrail)")
    path.mkdir(mode=0o750, parents=True, exist_ok=True)
    for directory, _dirs, files, dir_fd in os.fwalk(path, follow_symlinks=False):
        os.chown(directory, identity.uid, identity.gid, follow_symlinks=False)
        for name in files:
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            if stat.S_ISREG(mode):
                os.chown(name, identity.uid, identity.gid, dir_fd=dir_fd,
                         follow_symlinks=False)


def effective_caps(pid: int | str = "self") -> int:
    """CapEff of a process, as a bit mask (for status and tests)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def apply_priority(nice: int | None, realtime: int | None,
                   where: str = "--realtime/--nice") -> None:
    """Raise our scheduling priority so a busy CPU does not starve the socket reader."""
    try:
        if realtime is not None:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(realtime))
        if nice is not None:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    except (OSError, ValueError) as exc:
        raise ConfigError(where, f"cannot set priority: {exc}") from exc

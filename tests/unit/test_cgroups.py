"""cgroup paths: mount discovery, unit and container names, the id → path walk and its cache.

The walk and procs() run on a directory tree in tmp_path standing in for the cgroup2 mount
(readdir's d_ino is the inode there too), so these need no root; the real mount and
open_by_handle_at are exercised by tests/integration/test_procs.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conntrail.kernel.cgroups import (
    CgroupMap,
    Container,
    container_of,
    is_root,
    parse_mountinfo,
    procs,
    unit_of,
)

HEX = "3f4e2a1b" * 8  # 64 hex digits

# --- systemd units -----------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "unit"), [
    ("/system.slice/nginx.service", "nginx.service"),
    ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope"),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service", "foo.service"),
    ("/user.slice/user-1000.slice/user@1000.service/init.scope", "init.scope"),
    ("/system.slice/containerd.service/kubepods-burstable.slice", "containerd.service"),
    (f"/system.slice/docker-{HEX}.scope", f"docker-{HEX}.scope"),
    ("/system.slice/systemd-journald.service", "systemd-journald.service"),
    ("/system.slice/getty@tty1.service", "getty@tty1.service"),
    ("/system.slice/sys-fs-fuse-connections.mount", None),
    ("/system.slice", None),
    ("/user.slice/user-1000.slice", None),
    ("/", None),
    ("", None),
    ("/.service", None),
    ("/my.service/payload", "my.service"),
])
def test_unit_of(path: str, unit: str | None) -> None:
    assert unit_of(path) == unit


# --- containers --------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "container"), [
    (f"/system.slice/docker-{HEX}.scope", Container("docker", HEX)),
    (f"/docker/{HEX}", Container("docker", HEX)),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234.slice/"
     f"cri-containerd-{HEX}.scope", Container("containerd", HEX)),
    (f"/kubepods.slice/kubepods-pod1.slice/crio-{HEX}.scope", Container("cri-o", HEX)),
    (f"/machine.slice/libpod-{HEX}.scope", Container("podman", HEX)),
    (f"/machine.slice/libpod-{HEX}.scope/container", Container("podman", HEX)),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{HEX}.scope",
     Container("podman", HEX)),
    (f"/kubepods/besteffort/pod5f2b/{HEX}", Container("kubepods", HEX)),
    (f"/machine.slice/libpod-conmon-{HEX}.scope", None),
    ("/system.slice/docker.service", None),
    ("/docker", None),
    ("/docker/not-hex", None),
    (f"/system.slice/{HEX}", None),
    ("/system.slice/docker-.scope", None),
    ("/", None),
])
def test_container_of(path: str, container: Container | None) -> None:
    assert container_of(path) == container


def test_the_innermost_container_wins() -> None:
    inner = "ab" * 32
    path = f"/docker/{HEX}/system.slice/docker-{inner}.scope"
    assert container_of(path) == Container("docker", inner)


def test_root() -> None:
    assert is_root("/") and is_root("")
    assert not is_root("/system.slice")


# --- mountinfo ---------------------------------------------------------------------------------

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PURE_V2 = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"


@pytest.mark.parametrize(("text", "mount"), [
    (HYBRID, "/sys/fs/cgroup/unified"),
    (PURE_V2, "/sys/fs/cgroup"),
    # a container's bind mount of a sub-cgroup first: the real root is preferred
    ("50 1 0:30 /kubepods/x /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n" + PURE_V2,
     "/sys/fs/cgroup"),
    ("60 1 0:30 / /mnt/my\\040cgroups rw - cgroup2 none rw\n", "/mnt/my cgroups"),
    ("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n", None),
    ("garbage without separator\n", None),
    ("", None),
])
def test_parse_mountinfo(text: str, mount: str | None) -> None:
    assert parse_mountinfo(text) == mount


# --- the walk and procs() on a stand-in tree -------------------------------------------------

def make_tree(root: Path) -> dict[str, int]:
    """cgroup-like directories; their inode numbers by path."""
    paths = ["/system.slice", "/system.slice/nginx.service", "/user.slice",
             "/user.slice/user-1000.slice", "/user.slice/user-1000.slice/session-3.scope"]
    for path in paths:
        (root / path.lstrip("/")).mkdir()
    (root / "cgroup.procs").write_text("1\n2\n")
    (root / "system.slice/nginx.service/cgroup.procs").write_text("812\n813\n")
    return {path: os.stat(root / path.lstrip("/")).st_ino for path in paths}


def test_walk_maps_ids_to_paths(tmp_path: Path) -> None:
    ids = make_tree(tmp_path)
    with CgroupMap(str(tmp_path), use_handles=False) as cgroups:
        assert cgroups.path_of(cgroups.root_id) == "/"
        for path, ident in ids.items():
            assert cgroups.path_of(ident) == path
            assert cgroups.id_of(path) == ident
        assert cgroups.walks == 1  # one walk filled the cache for every id


def test_a_miss_walks_again_at_most_once_per_interval(tmp_path: Path) -> None:
    make_tree(tmp_path)
    with CgroupMap(str(tmp_path), use_handles=False, walk_interval=3600) as cgroups:
        assert cgroups.path_of(2**60) is None
        (tmp_path / "late.scope").mkdir()
        late = os.stat(tmp_path / "late.scope").st_ino
        assert cgroups.path_of(late) is None  # rate-limited: no second walk yet
        assert (cgroups.walks, cgroups.misses) == (1, 2)
        cgroups.walk_interval = 0
        assert cgroups.path_of(late) == "/late.scope"
        assert cgroups.walks == 2


def test_the_cache_is_bounded(tmp_path: Path) -> None:
    ids = make_tree(tmp_path)
    with CgroupMap(str(tmp_path), use_handles=False, max_entries=3) as cgroups:
        for path, ident in ids.items():
            assert cgroups.path_of(ident) == path
        assert len(cgroups._paths) <= len(ids) + 1


def test_procs(tmp_path: Path) -> None:
    make_tree(tmp_path)
    assert procs("/system.slice/nginx.service", str(tmp_path)) == [812, 813]
    assert procs("/", str(tmp_path)) == [1, 2]
    assert procs("/gone.scope", str(tmp_path)) == []

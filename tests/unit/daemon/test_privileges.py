"""Handing directories to the daemon's user: never through a symlink, never a shared one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conntrail.errors import ConfigError
from conntrail.kernel.privileges import Identity, give_tree

NOBODY = Identity("nobody", 65534, 65534)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_give_tree_never_follows_symlinks(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("root's")
    state = tmp_path / "state"
    (state / "spill").mkdir(parents=True)
    (state / "history.sqlite").write_text("")
    (state / "link").symlink_to(victim)
    (state / "dirlink").symlink_to(tmp_path)
    give_tree(state, NOBODY)
    assert (state / "history.sqlite").stat().st_uid == 65534
    assert (state / "spill").stat().st_uid == 65534
    assert victim.stat().st_uid == 0 and tmp_path.stat().st_uid == 0
    assert (state / "link").lstat().st_uid == 0


@pytest.mark.parametrize("shared", ["/", "/var/lib", "/var/log", "/tmp", "/etc/"])
def test_shared_directories_are_refused(shared: str) -> None:
    with pytest.raises(ConfigError, match="shared system directory"):
        give_tree(Path(shared), NOBODY)

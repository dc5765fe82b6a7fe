"""sd_notify: silent without systemd, one datagram per call with it, the watchdog interval."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from conntrail.daemon.notify import Notifier


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_s is None
    notifier.ready("x")  # no error, no socket
    notifier.close()


def test_messages_arrive_as_assignments(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"})
        notifier.ready("running")
        notifier.watchdog()
        notifier.close()
        first = server.recv(4096).decode().splitlines()
        second = server.recv(4096).decode()
    assert first == ["READY=1", "STATUS=running", f"MAINPID={os.getpid()}"]
    assert second == "WATCHDOG=1" and notifier.watchdog_s == 2.0


def test_abstract_socket_and_foreign_watchdog() -> None:
    name = f"ctt-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000",
                             "WATCHDOG_PID": "1"})
        notifier.status("hello")
        notifier.close()
        assert server.recv(4096) == b"STATUS=hello"
    assert notifier.watchdog_s is None  # meant for another process


def test_a_vanished_socket_is_counted_not_raised(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    notifier.stopping()
    notifier.close()
    assert notifier.failures == 1

"""sd_notify: READY, STATUS, WATCHDOG, RELOADING and STOPPING for a Type=notify unit.

The protocol is one datagram of newline-separated assignments to the unix socket named by
$NOTIFY_SOCKET (a leading '@' means the abstract namespace). Without the variable (not
under systemd) every call does nothing. No libsystemd: the protocol is a few lines.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    """Sends state changes to systemd, and knows the watchdog interval it asked for."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_s = _watchdog_seconds(env)
        self._socket: socket.socket | None = None
        self.failures = 0

    @property
    def enabled(self) -> bool:
        """Whether systemd (or a test) listens."""
        return self._address is not None

    def open(self) -> None:
        """Open the socket now (before privileges are dropped: the path may be root's)."""
        if self._address is not None and self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(self, **fields: str | int) -> None:
        """One message, e.g. send(READY=1, STATUS="listening")."""
        if self._address is None:
            return
        self.open()
        assert self._socket is not None
        text = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._socket.sendto(text.encode(), self._address)
        except OSError as exc:  # systemd gone or restarting: not worth stopping for
            self.failures += 1
            log.debug("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        """Start-up finished: systemd considers the unit started."""
        self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def reloading(self) -> None:
        """A reload began (systemd ≥ 253 needs MONOTONIC_USEC with it)."""
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                  // 1000)

    def status(self, text: str) -> None:
        """The one-line status `systemctl status` shows."""
        self.send(STATUS=text)

    def watchdog(self) -> None:
        """Alive (sent only while every pipeline's loop turns)."""
        self.send(WATCHDOG=1)

    def stopping(self) -> None:
        """Shutdown began."""
        self.send(STOPPING=1, STATUS="draining queues")

    def close(self) -> None:
        """Release the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _address(value: str) -> str | None:
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    return value


def _watchdog_seconds(env: dict[str, str] | os._Environ[str]) -> float | None:
    """WATCHDOG_USEC, when meant for us (WATCHDOG_PID absent or ours)."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6
    except ValueError:
        return None

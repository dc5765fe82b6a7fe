"""A `conntrail run` process under test: config file, stderr collected, signals, sd_notify."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.netenv import SRC


@dataclass
class NotifyListener:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

    path: Path
    messages: list[dict[str, str]] = field(default_factory=list)
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and collect messages in a thread."""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        assert self._sock is not None
        while self._sock.fileno() >= 0:
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines()
                          if "=" in line)
            self.messages.append(fields)

    def assignments(self) -> list[str]:
        """Every assignment seen, as KEY=VALUE strings."""
        return [f"{key}={value}" for message in list(self.messages)
                for key, value in message.items()]

    def close(self) -> None:
        """Stop collecting."""
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self._thread.join(2)


@dataclass
class DaemonProc:
    """A running daemon."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        """Everything it logged so far."""
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 15.0) -> None:
        """Until `text` appears in the log (or fail showing the log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log:
                return
            if self.proc.poll() is not None:
                time.sleep(0.2)
                break
            time.sleep(0.05)
        raise AssertionError(f"daemon never logged {text!r}:\n{self.log}")

    def signal(self, signum: int) -> None:
        """Send a signal."""
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            time.sleep(0.1)

    def metrics_url(self) -> str:
        """The Prometheus endpoint it announced."""
        self.wait_for("metrics: serving ")
        line = next(line for line in self.lines if "metrics: serving " in line)
        return line.split("metrics: serving ", 1)[1].strip()

    def scrape(self) -> str:
        """One scrape of /metrics."""
        with urllib.request.urlopen(self.metrics_url(), timeout=5) as answer:
            return str(answer.read().decode())


@contextlib.contextmanager
def running_daemon(config: Path, env: dict[str, str] | None = None,
                   ready: str = "running pipelines",
                   prefix: tuple[str, ...] = ()) -> Iterator[DaemonProc]:
    """`python -m conntrail -v run -c CONFIG` (after `prefix`, e.g. setpriv), ready when it
    logs `ready`; always killed."""
    full_env = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "conntrail", "-v", "run", "-c",
                             str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=full_env)
    daemon = DaemonProc(proc)
    reader = threading.Thread(target=daemon._read, daemon=True)
    reader.start()
    try:
        daemon.wait_for(ready)
        yield daemon
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        reader.join(5)
        if proc.stderr is not None:
            proc.stderr.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll a condition (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or predicate}")

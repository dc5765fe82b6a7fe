"""A throwaway PostgreSQL cluster for tests: initdb in a temp dir, unix socket only, removed
at the end whatever happens (the system cluster is never touched)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
OWNER = "postgres"  # the server refuses to run as root: every pg binary runs as this user


def _as_owner(*args: str, timeout: float = 60.0) -> str:
    """Run a PostgreSQL binary as the postgres user; a failure shows its output."""
    command = ["runuser", "-u", OWNER, "--", str(PG_BIN / args[0]), *args[1:]]
    proc = subprocess.run(command, capture_output=True, text=True, check=False,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}{proc.stderr}")
    return proc.stdout


def free_port() -> int:
    """A TCP port nobody listens on now (only names the unix socket, but stays distinct)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PgCluster:
    """One private cluster: data and socket directories under one temp dir."""

    root: Path
    port: int = field(default_factory=free_port)
    # Off for suites that make many databases: a shutdown checkpoint then fsyncs for seconds.
    fsync: bool = True
    running: bool = False

    @property
    def data(self) -> Path:
        """The data directory."""
        return self.root / "data"

    @property
    def sockdir(self) -> Path:
        """The unix socket directory (the server listens on nothing else)."""
        return self.root / "sock"

    def dsn(self, dbname: str = "postgres") -> str:
        """A URL DSN for `dbname` over the unix socket."""
        return f"postgresql:///{dbname}?host={self.sockdir}&port={self.port}&user={OWNER}"

    def init(self) -> None:
        """initdb (trust auth: nothing listens beyond a socket in our private dir)."""
        self.sockdir.mkdir()
        shutil.chown(self.root, OWNER)
        shutil.chown(self.sockdir, OWNER)
        _as_owner("initdb", "-D", str(self.data), "-A", "trust", "-U", OWNER, "-E", "UTF8",
                  "--locale=C", "--no-sync")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (f"-k {self.sockdir} -p {self.port} -c listen_addresses='' "
                   f"-c fsync={'on' if self.fsync else 'off'}")
        _as_owner("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"),
                  "-o", options, "-w", "-t", "60", "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (fast: clients are disconnected, nothing committed is lost)."""
        if self.running:
            _as_owner("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
            self.running = False

    def restart(self) -> None:
        """Stop, then start again."""
        self.stop()
        self.start()

    def create_database(self, name: str) -> str:
        """A new empty database; its DSN."""
        _as_owner("createdb", "-h", str(self.sockdir), "-p", str(self.port), "-U", OWNER, name)
        return self.dsn(name)

    def log(self) -> str:
        """The server log so far (for failure messages)."""
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def destroy(self) -> None:
        """Stop (immediately if a clean stop fails) and remove every file."""
        try:
            self.stop()
        except (AssertionError, subprocess.TimeoutExpired):
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                self.stop("immediate")
        finally:
            if self.running:
                self._kill_postmaster()
            shutil.rmtree(self.root, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        """Last resort when pg_ctl cannot stop it: SIGKILL the server we started."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
        self.running = False


@contextlib.contextmanager
def pg_cluster(*, fsync: bool = True) -> Iterator[PgCluster]:
    """A started cluster, stopped and deleted on exit, pass or fail."""
    cluster = PgCluster(Path(tempfile.mkdtemp(prefix="conntrail-pg-")), fsync=fsync)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()

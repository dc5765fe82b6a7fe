"""A private rsyslogd for tests: its own config, work directory, socket and free loopback
ports, stopped and deleted at the end whatever happens (the system's /dev/log and any
system rsyslog are never touched).

It listens on a unix datagram socket (imuxsock), UDP and TCP, TLS (gtls, anonymous
clients) and TLS requiring a client certificate, with a CA and certificates made by
openssl. It parses every message (RFC 5424 parser, then mmpstrucdata for the SD params) and
writes one line per message with the fields it parsed, so a test proves rsyslog *parsed* the
header and structured data, not merely stored bytes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RSYSLOGD = "/usr/sbin/rsyslogd"
SEP = "\x1f"  # between the fields of a received line: not in any message we send
_FIELDS = ("msgid", "app_name", "hostname", "procid", "time", "facility", "severity",
           "sd", "params", "msg")

_CONF = """\
global(workDirectory="{root}/work" maxMessageSize="64k"
       defaultNetstreamDriverCAFile="{root}/ca.pem"
       defaultNetstreamDriverCertFile="{root}/server.pem"
       defaultNetstreamDriverKeyFile="{root}/server.key")
module(load="imuxsock" SysSock.Use="off")
module(load="imudp")
module(load="imtcp")
module(load="mmpstrucdata")
input(type="imuxsock" Socket="{root}/log.sock" UseSpecialParser="off" ParseHostname="on"
      IgnoreTimestamp="off" RateLimit.Interval="0")
input(type="imudp" address="127.0.0.1" port="{udp_port}")
input(type="imtcp" address="127.0.0.1" port="{tcp_port}")
input(type="imtcp" address="127.0.0.1" port="{tls_port}" streamDriver.name="gtls"
      streamDriver.mode="1" streamDriver.authMode="anon")
input(type="imtcp" address="127.0.0.1" port="{mtls_port}" streamDriver.name="gtls"
      streamDriver.mode="1" streamDriver.authMode="x509/certvalid")
template(name="ctt" type="string" string="%msgid%{sep}%app-name%{sep}%hostname%{sep}\
%procid%{sep}%timereported:::date-rfc3339%{sep}%syslogfacility%{sep}%syslogseverity%{sep}\
%structured-data%{sep}%$!rfc5424-sd%{sep}%msg%\\n")
action(type="mmpstrucdata" sd_name.lowercase="off")
action(type="omfile" file="{root}/received.log" template="ctt")
"""


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A loopback port nobody uses now (of the given kind)."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False,
                          timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed: {proc.stderr}")


def make_ca(directory: Path, name: str) -> None:
    """A self-signed CA: NAME.pem and NAME.key."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(directory / f"{name}.key"),
             "-out", str(directory / f"{name}.pem"), "-days", "2", "-subj", f"/CN=ctt-{name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def make_cert(directory: Path, name: str, ca: str, usage: str) -> None:
    """A certificate for 127.0.0.1/localhost signed by `ca`: NAME.pem and NAME.key."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(directory / f"{name}.key"),
             "-out", str(directory / f"{name}.pem"), "-days", "2", "-subj", "/CN=localhost",
             "-CA", str(directory / f"{ca}.pem"), "-CAkey", str(directory / f"{ca}.key"),
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
             "-addext", "basicConstraints=CA:FALSE", "-addext", f"extendedKeyUsage={usage}")


@dataclass(frozen=True)
class Received:
    """One message as rsyslog parsed it."""

    msgid: str
    app_name: str
    hostname: str
    procid: str
    time: str
    facility: str
    severity: str
    sd: str  # the STRUCTURED-DATA text as received
    params: dict[str, Any]  # mmpstrucdata's parse: {sd_id: {name: value}}
    msg: str


@dataclass
class Rsyslogd:
    """One private rsyslogd; `start`/`stop` may repeat (same ports, same output file)."""

    root: Path
    udp_port: int = field(default_factory=lambda: free_port(socket.SOCK_DGRAM))
    tcp_port: int = field(default_factory=free_port)
    tls_port: int = field(default_factory=free_port)
    mtls_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        """The imuxsock datagram socket."""
        return self.root / "log.sock"

    @property
    def output(self) -> Path:
        """Where every received message is written, one parsed line each."""
        return self.root / "received.log"

    def file(self, name: str) -> str:
        """A file in the private directory (ca.pem, client.key, other-ca.pem …)."""
        return str(self.root / name)

    def prepare(self) -> None:
        """Certificates and the configuration file."""
        (self.root / "work").mkdir()
        make_ca(self.root, "ca")
        make_ca(self.root, "other-ca")
        make_cert(self.root, "server", "ca", "serverAuth")
        make_cert(self.root, "client", "ca", "clientAuth")
        (self.root / "rsyslog.conf").write_text(_CONF.format(
            root=self.root, sep=SEP, udp_port=self.udp_port, tcp_port=self.tcp_port,
            tls_port=self.tls_port, mtls_port=self.mtls_port))
        check = subprocess.run([RSYSLOGD, "-N1", "-f", self.file("rsyslog.conf")],
                               capture_output=True, text=True, check=False, timeout=60)
        if check.returncode != 0:
            raise AssertionError(f"rsyslogd refuses the test config:\n{check.stderr}")

    def start(self, timeout: float = 15.0) -> None:
        """Start rsyslogd in the foreground and wait until every listener is up."""
        assert self.proc is None, "already running"
        with open(self.root / "rsyslogd.out", "ab") as out:
            self.proc = subprocess.Popen(
                [RSYSLOGD, "-n", "-f", self.file("rsyslog.conf"), "-i", self.file("pid")],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"rsyslogd did not start:\n{self.log()}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        # Listening sockets are looked up in /proc: a probe connection to the TLS ports
        # would make rsyslogd log failed handshakes.
        return (self.socket_path.exists() and _bound("udp", self.udp_port, "07")
                and all(_bound("tcp", port, "0A")
                        for port in (self.tcp_port, self.tls_port, self.mtls_port)))

    def stop(self) -> None:
        """SIGTERM and wait for the exit (SIGKILL after 10 s)."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def received(self, app_name: str) -> list[Received]:
        """Every message from `app_name` written so far, in arrival order."""
        if not self.output.exists():
            return []
        found = []
        for line in self.output.read_text(errors="replace").splitlines():
            values = line.split(SEP, len(_FIELDS) - 1)
            if len(values) == len(_FIELDS) and values[1] == app_name:
                row: dict[str, Any] = dict(zip(_FIELDS, values, strict=True))
                row["params"] = json.loads(row["params"]) if row["params"] else {}
                found.append(Received(**row))
        return found

    def wait_for(self, app_name: str, count: int, timeout: float = 10.0) -> list[Received]:
        """The messages from `app_name` once there are `count` (or the deadline passes),
        then a short grace period, so that extra (duplicate) messages show too."""
        deadline = time.monotonic() + timeout
        while len(self.received(app_name)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        return self.received(app_name)

    def log(self) -> str:
        """rsyslogd's own output (for failure messages)."""
        path = self.root / "rsyslogd.out"
        return path.read_text(errors="replace") if path.exists() else ""


def _bound(proto: str, port: int, state: str) -> bool:
    """Whether a socket on 127.0.0.1:port is in `state` (07: UDP bound, 0A: TCP listening)
    in /proc/net/PROTO."""
    wanted = f"0100007F:{port:04X}"
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            columns = line.split()
            if columns[1] == wanted and columns[3] == state:
                return True
    return False


@contextlib.contextmanager
def rsyslogd() -> Iterator[Rsyslogd]:
    """A started private rsyslogd, stopped and its directory removed on exit."""
    server = Rsyslogd(Path(tempfile.mkdtemp(prefix="conntrail-rsyslog-")))
    try:
        server.prepare()
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(server.root, ignore_errors=True)


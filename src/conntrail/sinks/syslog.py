"""The syslog sink: RFC 5424 messages to a unix socket, UDP, TCP or TLS (RFC 5426/6587/5425).

`encode` (pipeline thread) builds and frames every message; `write` (worker thread)
connects lazily and sends. A failed write closes the connection and raises; the runner
retries the same payload object, and the sink resumes after the last message the kernel
accepted, so a retry never sends a message twice on a stream.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from conntrail.config import Table
from conntrail.errors import ConntrailError
from conntrail.formats.choose import formatter_from
from conntrail.formats.rfc5424 import (
    APP_NAME_MAX,
    DEFAULT_SD_ID,
    FACILITIES,
    HOSTNAME_MAX,
    SD_NAME_MAX,
    SEVERITIES,
    Rfc5424Format,
    fit,
    header_problem,
    sd_id_problem,
)
from conntrail.model import Record
from conntrail.pipeline.stages import SinkContext

log = logging.getLogger(__name__)

TRANSPORTS = ("unix", "udp", "tcp", "tls")
STREAMS = ("tcp", "tls")
FRAMINGS = ("octet-counting", "lf")
DEFAULT_PORTS = {"udp": 514, "tcp": 514, "tls": 6514}
# UDP: RFC 5426 §3.2 says receivers should take 2048 bytes. Elsewhere 8 KiB, rsyslog's
# default maxMessageSize: a longer message it would cut (or, with LF framing, split).
DEFAULT_MAX_MESSAGE = {"udp": 2048, "unix": 8192, "tcp": 8192, "tls": 8192}
MIN_MESSAGE = 480  # RFC 5424 §6.1: every receiver must accept this much
MAX_UDP_MESSAGE = 65507  # an IPv4 datagram's largest payload
SEND_CHUNK = 64 * 1024  # a stream write gathers messages up to this size
TLS_KEYS = ("ca_file", "cert_file", "key_file", "server_name", "verify")


@dataclass(frozen=True, slots=True)
class Destination:
    """Where messages go: a unix datagram socket path, or host and port over a transport."""

    transport: str
    host: str  # the socket path for "unix"
    port: int = 0
    framing: str = "octet-counting"  # streams only
    timeout: float = 10.0
    tls: ssl.SSLContext | None = None
    server_name: str | None = None  # the name the TLS certificate must carry

    @property
    def stream(self) -> bool:
        """TCP or TLS: messages need framing and a connection can die unnoticed."""
        return self.transport in STREAMS

    def __str__(self) -> str:
        if self.transport == "unix":
            return f"unix {self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport} {host}:{self.port}"


def parse_address(text: str, default_port: int) -> tuple[str, int]:
    """"host", "host:port", "[v6]" or "[v6]:port" → (host, port); ValueError says why not."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError('an IPv6 address is written "[2001:db8::1]:514"')
        port_text = rest[1:]
    elif text.count(":") > 1:
        raise ValueError('write an IPv6 address in brackets, e.g. "[2001:db8::1]:514"')
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError("no host name or address")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port {port_text!r} is not a number from 1 to 65535")
    return host, int(port_text)


def connect(dest: Destination) -> socket.socket:
    """A connected socket (TLS handshake done); ConntrailError naming the cause if not."""
    try:
        if dest.transport == "unix":
            return _connected(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM), dest.host,
                              dest.timeout)
        if dest.transport == "udp":
            return _connect_udp(dest)
        sock = socket.create_connection((dest.host, dest.port), dest.timeout)
        if dest.tls is None:
            return sock
        try:
            return dest.tls.wrap_socket(sock, server_hostname=dest.server_name or dest.host)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        raise ConntrailError(f"{dest}: cannot connect: {describe_error(exc)}") from exc


def _connected(sock: socket.socket, address: str | tuple[Any, ...],
               timeout: float) -> socket.socket:
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _connect_udp(dest: Destination) -> socket.socket:
    """Connected, so the kernel reports ICMP port-unreachable as ECONNREFUSED on a send."""
    error: OSError = OSError(errno.EADDRNOTAVAIL, "no address")
    for family, kind, proto, _, address in socket.getaddrinfo(
            dest.host, dest.port, type=socket.SOCK_DGRAM):
        try:
            return _connected(socket.socket(family, kind, proto), address, dest.timeout)
        except OSError as exc:
            error = exc
    raise error


def describe_error(exc: OSError) -> str:
    """A short lowercase reason: the certificate problem, the errno text, or 'timed out'."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = str(exc.verify_message).rstrip(".")
        return f"certificate verify failed: {reason[:1].lower()}{reason[1:]}"
    if isinstance(exc, ssl.SSLError):
        return f"tls: {exc.reason or exc}".lower()
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve: {exc.strerror}".lower()
    return (exc.strerror or str(exc)).lower()


def peer_closed(sock: socket.socket) -> bool:
    """Whether a stream's peer has closed (or reset) the connection.

    A syslog receiver never sends data, so a readable socket means EOF or an error. Found
    before sending, it saves the batch: the first send after the peer went away succeeds
    locally and is lost (the peer answers with a reset), and only the next one fails.
    """
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        if isinstance(sock, ssl.SSLSocket):
            return _tls_peer_closed(sock)
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _tls_peer_closed(sock: ssl.SSLSocket) -> bool:
    """TLS may have sent records we must read (TLS 1.3 session tickets): read them."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(4096) == b""  # close_notify, or data we never asked for: drop it
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return False
    finally:
        sock.settimeout(timeout)


class SyslogSink:
    """Sends each record as one RFC 5424 message; reconnects lazily after a failure."""

    def __init__(self, name: str, dest: Destination, formatter: Rfc5424Format,
                 max_message: int | None = None) -> None:
        self.name = name
        self.dest = dest
        self.formatter = formatter
        self.max_message = max_message or DEFAULT_MAX_MESSAGE[dest.transport]
        self._sock: socket.socket | None = None
        self._pending: list[bytes] | None = None  # the payload a failed write left
        self._done = 0  # messages of `_pending` the kernel has taken
        self._connected_once = False
        self._counters = {"sent": 0, "reconnects": 0, "truncated": 0, "oversize": 0}

    def open(self) -> None:
        """Nothing yet: the first write connects, so a receiver down at start delays only
        this sink (the runner retries) instead of failing the daemon's start."""

    def encode(self, batch: Sequence[Record]) -> list[bytes]:
        """One framed message per record (none for table snapshots)."""
        frames: list[bytes] = []
        for record in batch:
            parts = self.formatter.parts(record)
            if parts is None:
                continue
            message, cut = fit(*parts, limit=self.max_message)
            if cut:
                self._counters["truncated"] += 1
            frames.append(self._frame(message))
        return frames

    def _frame(self, message: bytes) -> bytes:
        if not self.dest.stream:
            return message  # one datagram, one message
        if self.dest.framing == "lf":
            # A newline inside would end the message early: LF framing cannot carry it.
            return message.replace(b"\n", b" ") + b"\n"
        return b"%d %b" % (len(message), message)  # RFC 6587 §3.4.1, RFC 5425 §4.3

    def write(self, payload: list[bytes]) -> None:
        """Send every message not sent yet; on failure drop the connection and raise."""
        if payload is not self._pending:
            self._pending, self._done = payload, 0
        if self._done < len(payload):
            sock = self._connection()
            try:
                if self.dest.stream:
                    self._send_stream(sock, payload)
                else:
                    self._send_datagrams(sock, payload)
            except OSError as exc:
                self._drop()
                # Not the OSError itself: the runner takes a BrokenPipeError for a reader
                # gone for good, and a syslog receiver usually comes back.
                raise ConntrailError(f"{self.dest}: send failed: {describe_error(exc)}; "
                                     f"{len(payload) - self._done} messages to retry") \
                    from exc
        self._pending = None

    def _connection(self) -> socket.socket:
        if self._sock is not None and self.dest.stream and peer_closed(self._sock):
            log.info("sink %s: %s closed the connection", self.name, self.dest)
            self._drop()
        if self._sock is None:
            self._sock = connect(self.dest)
            if self._connected_once:
                self._counters["reconnects"] += 1
                log.info("sink %s: connected again to %s", self.name, self.dest)
            self._connected_once = True
        return self._sock

    def _send_datagrams(self, sock: socket.socket, frames: list[bytes]) -> None:
        for index in range(self._done, len(frames)):
            try:
                sock.send(frames[index])
                self._counters["sent"] += 1
            except OSError as exc:
                if exc.errno != errno.EMSGSIZE:
                    raise
                # Retrying would fail forever and hold up every later message.
                self._counters["oversize"] += 1
                log.error("sink %s: a %d-byte message is too big for %s; dropped (lower "
                          "max_message)", self.name, len(frames[index]), self.dest)
            self._done = index + 1

    def _send_stream(self, sock: socket.socket, frames: list[bytes]) -> None:
        """Gather messages into chunks; count a message sent once all its bytes are."""
        while self._done < len(frames):
            end, size = self._done, 0
            while end < len(frames) and (end == self._done
                                         or size + len(frames[end]) <= SEND_CHUNK):
                size += len(frames[end])
                end += 1
            self._send_chunk(sock, frames, end)

    def _send_chunk(self, sock: socket.socket, frames: list[bytes], end: int) -> None:
        view = memoryview(b"".join(frames[self._done:end]))
        offset, boundary = 0, len(frames[self._done])
        while offset < len(view):
            offset += sock.send(view[offset:])
            while self._done < end and offset >= boundary:
                self._done += 1
                self._counters["sent"] += 1
                if self._done < end:
                    boundary += len(frames[self._done])

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def check(self) -> str:
        """Connect (and handshake) once, then hang up; ConntrailError says what failed."""
        sock = connect(self.dest)
        try:
            detail = _connection_detail(sock, self.dest)
        finally:
            sock.close()
        return f"syslog {self.dest}: {detail}"

    def reopen(self) -> None:
        """Hang up; the next write connects afresh (and resolves the name again)."""
        self._drop()

    def stats(self) -> dict[str, int]:
        """Messages sent, reconnects, messages truncated to max_message, oversize drops."""
        return dict(self._counters)

    def to_spool(self, payload: list[bytes]) -> bytes:
        """The framed messages, each behind a 4-byte length."""
        return b"".join([len(frame).to_bytes(4, "big") + frame for frame in payload])

    def from_spool(self, data: bytes) -> list[bytes]:
        """The messages to_spool wrote; ConntrailError if the bytes are cut short."""
        frames: list[bytes] = []
        offset = 0
        while offset < len(data):
            size = int.from_bytes(data[offset:offset + 4], "big")
            frame = data[offset + 4:offset + 4 + size]
            if offset + 4 > len(data) or len(frame) != size:
                raise ConntrailError(f"sink {self.name}: spooled batch cut short")
            frames.append(frame)
            offset += 4 + size
        return frames

    def close(self) -> None:
        """Hang up (a TLS session says close_notify first); idempotent."""
        if isinstance(self._sock, ssl.SSLSocket):
            with contextlib.suppress(OSError, ValueError):
                self._sock.settimeout(1.0)  # a peer that never answers must not hold us
                self._sock = self._sock.unwrap()
        self._drop()


def _connection_detail(sock: socket.socket, dest: Destination) -> str:
    if dest.transport == "udp":
        return "address resolved (UDP cannot tell whether anyone listens)"
    if not isinstance(sock, ssl.SSLSocket):
        return "connected"
    checked = "verified" if dest.tls and dest.tls.verify_mode == ssl.CERT_REQUIRED \
        else "NOT verified (verify = false)"
    return f"connected, {sock.version()}, server certificate {checked}"


def from_config(table: Table, context: SinkContext) -> SyslogSink:
    """A SyslogSink from its table; every problem is a ConfigError naming the key."""
    transport = table.text("transport", "unix", choices=TRANSPORTS)
    dest = _destination(table, transport)
    max_message = _max_message(table, transport)
    formatter = Rfc5424Format(
        hostname=_header_key(table, "hostname", socket.gethostname(), HOSTNAME_MAX),
        app_name=_header_key(table, "app_name", "conntrail", APP_NAME_MAX),
        procid=str(os.getpid()),
        facility=FACILITIES[table.text("facility", "local0", choices=tuple(FACILITIES))],
        severity=SEVERITIES[table.text("severity", "info", choices=tuple(SEVERITIES))],
        sd_id=_header_key(table, "sd_id", DEFAULT_SD_ID, SD_NAME_MAX),
        bom=table.boolean("bom", False),
        message=formatter_from(table, default="text"))
    table.done()
    return SyslogSink(context.name, dest, formatter, max_message)


def _destination(table: Table, transport: str) -> Destination:
    if transport == "unix":
        path = table.text("address", "/dev/log")
        if not path:
            raise table.error("address", "must be a socket path, e.g. \"/dev/log\"")
        host, port = path, 0
    else:
        text = table.text("address", None)
        if text is None:
            raise table.error("address", f'is required for transport = "{transport}" '
                              '(e.g. "logs.example.net:514")')
        try:
            host, port = parse_address(text, DEFAULT_PORTS[transport])
        except ValueError as exc:
            raise table.error("address", str(exc)) from None
    if transport not in STREAMS and table.has("framing"):
        raise table.error("framing", f'only applies to transport = "tcp" or "tls", not '
                          f'"{transport}"')
    framing = table.text("framing", "octet-counting", choices=FRAMINGS)
    tls, server_name = _tls(table, transport)
    timeout = table.duration("timeout", 10.0)
    if timeout <= 0:
        raise table.error("timeout", "must be more than 0s")
    return Destination(transport, host, port, framing, timeout, tls, server_name)


def _max_message(table: Table, transport: str) -> int:
    ceiling = MAX_UDP_MESSAGE if transport == "udp" else 1 << 24
    value: int = table.size("max_message", DEFAULT_MAX_MESSAGE[transport], maximum=ceiling)
    if value < MIN_MESSAGE:
        raise table.error("max_message", f"must be at least {MIN_MESSAGE} bytes (RFC 5424 "
                          f"§6.1), not {value}")
    return value


def _header_key(table: Table, key: str, default: str, limit: int) -> str:
    value: str = table.text(key, default)
    problem = sd_id_problem(value) if key == "sd_id" else header_problem(value, limit)
    if problem is not None:
        hint = "" if table.has(key) else " (it is the default here: set it)"
        raise table.error(key, f"{value!r} {problem}{hint}")
    return value


def _tls(table: Table, transport: str) -> tuple[ssl.SSLContext | None, str | None]:
    """The client TLS context, built (and its files read) now so errors show at check."""
    if transport != "tls":
        for key in TLS_KEYS:
            if table.has(key):
                raise table.error(key, f'only applies to transport = "tls", not '
                                  f'"{transport}"')
        return None, None
    verify = table.boolean("verify", True)
    ca_file = table.text("ca_file", None)
    cert_file = table.text("cert_file", None)
    key_file = table.text("key_file", None)
    server_name = table.text("server_name", None)
    if key_file is not None and cert_file is None:
        raise table.error("key_file", "needs cert_file too")
    context = _tls_context(table, verify, ca_file)
    if cert_file is not None:
        def refuse_encrypted() -> str:  # else OpenSSL would prompt on the terminal
            raise table.error("key_file" if key_file else "cert_file",
                              "the private key is encrypted; give an unencrypted one "
                              "(readable only by the daemon's user)")

        try:
            context.load_cert_chain(cert_file, key_file, password=refuse_encrypted)
        except (OSError, ssl.SSLError) as exc:
            raise table.error("cert_file", f"cannot load the client certificate and key: "
                              f"{describe_error(exc)}") from None
    return context, server_name


def _tls_context(table: Table, verify: bool, ca_file: str | None) -> ssl.SSLContext:
    if not verify:
        log.warning("%s: TLS without certificate verification: a man in the middle can "
                    "read and alter the messages", table.key_path("verify"))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            # With ca_file, only that CA is trusted; without it, the system's CAs.
            context = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise table.error("ca_file", f"cannot load: {describe_error(exc)}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 9662 updates RFC 5425 to 1.2+
    return context

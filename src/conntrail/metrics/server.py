"""The Prometheus scrape endpoint: a small HTTP server on its own daemon thread.

`GET /metrics` answers `render(collector())`; `GET /` a page linking it. The collector runs
on the request's thread, so a scrape reads the daemon's counters at that moment.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from conntrail.errors import ConfigError, ConntrailError
from conntrail.metrics.exposition import CONTENT_TYPE, render
from conntrail.metrics.model import Collector

log = logging.getLogger(__name__)

# Loopback unless the configuration says otherwise: the counters reveal traffic volumes and
# which sinks exist, which should not be readable from the network by default.
DEFAULT_HOST = "127.0.0.1"
_INDEX = (b"<html><head><title>conntrail</title></head><body>"
          b'<h1>conntrail</h1><p><a href="/metrics">/metrics</a></p></body></html>\n')
_ALLOWED = "GET, HEAD"
_STOP_TIMEOUT_S = 5.0


def parse_listen(text: str, key: str) -> tuple[str, int]:
    """"127.0.0.1:9477", "[::1]:9477" or ":9477" (loopback) → (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or text.endswith("]"):
        raise ConfigError(key, f"{text!r} is not HOST:PORT; write e.g. \"127.0.0.1:9477\"")
    return _parse_host(host, text, key), _parse_port(port_text, text, key)


def _parse_host(host: str, text: str, key: str) -> str:
    if not host:
        return DEFAULT_HOST
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        address = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        raise ConfigError(key, f"{host!r} in {text!r} is not an IP address; write e.g. "
                               "\"127.0.0.1:9477\" or \"[::1]:9477\"") from None
    if address.version == 6 and not bracketed:
        raise ConfigError(key, f"put an IPv6 address in brackets: \"[{host}]:PORT\"")
    if address.version == 4 and bracketed:
        raise ConfigError(key, f"only IPv6 addresses go in brackets: {host[1:-1]!r}")
    return str(address)


def _parse_port(port_text: str, text: str, key: str) -> int:
    if not port_text.isdigit() or not port_text.isascii() or int(port_text) > 65535:
        raise ConfigError(key, f"port {port_text!r} in {text!r} is not a number 0-65535")
    return int(port_text)


class MetricsServer:
    """Serves the collector's samples to Prometheus until stopped."""

    def __init__(self, address: tuple[str, int], collector: Collector) -> None:
        self.address = address
        self._collector = collector
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the kernel's choice when started with port 0)."""
        if self._httpd is None:
            return self.address[1]
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        """Bind now (so a taken port fails here, not later) and serve on a daemon thread."""
        if self._httpd is not None:
            return
        try:
            httpd = _Server(self.address, self._collector)
        except OSError as exc:
            raise ConntrailError(f"metrics: cannot listen on {_where(self.address)}: "
                                 f"{exc.strerror or exc}") from exc
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="conntrail-metrics", daemon=True)
        self._thread.start()
        log.info("metrics: serving http://%s/metrics", _where((self.address[0], self.port)))

    def stop(self) -> None:
        """Stop accepting and close the socket (idempotent; a scrape in flight may finish)."""
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None or thread is None:
            return
        # shutdown() waits for serve_forever's loop, which checks every poll_interval.
        httpd.shutdown()
        httpd.server_close()
        thread.join(_STOP_TIMEOUT_S)


def _where(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Server(ThreadingHTTPServer):
    """The HTTP server, holding the collector its handlers call."""

    daemon_threads = True  # a stuck scrape must never hold the daemon's exit

    def __init__(self, address: tuple[str, int], collector: Collector) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.collector = collector
        self.failing = False
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the host (it can stall start-up)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client gone mid-answer is its business: log it quietly, not on stderr."""
        log.debug("metrics: error answering %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    """Answers GET (and HEAD) for / and /metrics; 404 elsewhere, 405 for other methods."""

    server: _Server
    server_version = "conntrail"
    sys_version = ""  # do not advertise the Python version
    timeout = 10.0  # a client that sends nothing does not keep a thread forever

    def do_GET(self) -> None:
        """The page or the metrics."""
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        """As GET, headers only."""
        self._answer(with_body=False)

    def __getattr__(self, name: str) -> Callable[[], None]:
        # http.server looks up do_<METHOD>; every method but GET/HEAD gets 405, not 501.
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def log_message(self, format: str, *args: Any) -> None:  # named as in the base class
        """Requests go to the debug log, never to stderr."""
        log.debug("metrics: %s " + format, self.address_string(), *args)

    def _answer(self, with_body: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            body = self._scrape()
            if body is None:
                self._send(500, b"collector failed; see the daemon's log\n", with_body)
            else:
                self._send(200, body, with_body, CONTENT_TYPE)
        elif path == "/":
            self._send(200, _INDEX, with_body, "text/html; charset=utf-8")
        else:
            self._send(404, b"not found; metrics are at /metrics\n", with_body)

    def _scrape(self) -> bytes | None:
        try:
            body = render(self.server.collector())
        except Exception:
            # Any collector bug must cost one scrape, never the server.
            # Log the traceback once per failing streak, not on every scrape.
            level = logging.DEBUG if self.server.failing else logging.ERROR
            log.log(level, "metrics: collecting samples failed", exc_info=True)
            self.server.failing = True
            return None
        if self.server.failing:
            log.info("metrics: collecting samples works again")
            self.server.failing = False
        return body

    def _not_allowed(self) -> None:
        self._send(405, b"method not allowed; use GET\n", self.command != "HEAD",
                   extra={"Allow": _ALLOWED})

    def _send(self, status: int, body: bytes, with_body: bool,
              content_type: str = "text/plain; charset=utf-8",
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

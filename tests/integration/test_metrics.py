"""Metrics exporters under load on loopback: concurrent scrapes, hostile clients, statsd over time.

Nothing here needs root (loopback only); the folder's conftest marks every test `root`.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conntrail.metrics.model import Sample
from conntrail.metrics.server import MetricsServer
from conntrail.metrics.statsd import StatsdPusher

TIMEOUT = 5.0


class Ticker:
    """A counter a background thread increments, as the daemon's pipeline would."""

    def __init__(self) -> None:
        self.value = 0
        self.series = 1
        self.padding = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for _ in range(200_000):  # bounded even if stop() is never called
            if self._stop.wait(0.0005):
                return
            self.value += 1

    def collect(self) -> Iterable[Sample]:
        """The counter plus `series` gauges, `padding` in their labels (for large pages)."""
        yield Sample("conntrail_events_received_total", "counter", "events", self.value)
        for n in range(self.series):
            labels = (("sink", f"s{n}{self.padding}"),)
            yield Sample("conntrail_queue_depth", "gauge", "depth", n, labels)

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop counting (idempotent)."""
        self._stop.set()
        self._thread.join(TIMEOUT)


@pytest.fixture
def ticker() -> Iterator[Ticker]:
    with Ticker() as running:
        yield running


@pytest.fixture
def server(ticker: Ticker) -> Iterator[MetricsServer]:
    started = MetricsServer(("127.0.0.1", 0), ticker.collect)
    started.start()
    try:
        yield started
    finally:
        started.stop()


def _scrape(server: MetricsServer) -> float:
    url = f"http://127.0.0.1:{server.port}/metrics"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as answer:
        page = answer.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(page)}
    return families["conntrail_events_received"].samples[0].value


def _scraper(server: MetricsServer) -> list[float]:
    return [_scrape(server) for _ in range(25)]


def test_concurrent_scrapes_all_parse_and_counters_only_grow(server: MetricsServer) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        runs = list(pool.map(_scraper, [server] * 8, timeout=60))
    for values in runs:
        assert values == sorted(values)
    assert max(max(values) for values in runs) > 0


def _connect(server: MetricsServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)


def test_silent_clients_do_not_hold_up_a_scrape(server: MetricsServer) -> None:
    silent = [_connect(server) for _ in range(3)]
    try:
        silent[1].sendall(b"GET /metr")  # half a request line, then nothing
        began = time.monotonic()
        assert _scrape(server) >= 0
        assert time.monotonic() - began < 2.0
    finally:
        for sock in silent:
            sock.close()


def test_a_client_gone_mid_answer_is_logged_quietly(server: MetricsServer, ticker: Ticker,
                                                    capfd: pytest.CaptureFixture[str],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    # A 16 MB page to a client with a 4 kB receive buffer: more than the kernel's buffers
    # hold (the send buffer grows to 4 MB at most), so the server is still writing when the
    # client resets the connection.
    ticker.series, ticker.padding = 16, "x" * (1 << 20)
    with caplog.at_level(logging.DEBUG, logger="conntrail.metrics.server"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        sock.recv(1)
        # SO_LINGER with a zero timeout: close() sends a reset, not a graceful FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and not any(
                r.getMessage().startswith("metrics: error answering") for r in caplog.records):
            time.sleep(0.02)
    assert any(r.getMessage().startswith("metrics: error answering") for r in caplog.records)
    ticker.series, ticker.padding = 1, ""
    assert _scrape(server) >= 0  # still serving
    assert capfd.readouterr().err == ""


def test_stop_is_bounded_with_clients_connected(ticker: Ticker) -> None:
    server = MetricsServer(("127.0.0.1", 0), ticker.collect)
    server.start()
    idle = _connect(server)
    try:
        began = time.monotonic()
        server.stop()
        assert time.monotonic() - began < 2.0
    finally:
        idle.close()
        server.stop()


def _drain(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting, waiting at most 0.5 s for a late one."""
    sock.settimeout(0.5)
    received: list[bytes] = []
    for _ in range(100_000):
        try:
            received.append(sock.recv(65536))
        except TimeoutError:
            break
    return received


def test_statsd_deltas_over_time_add_up_to_the_counter() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        receiver.bind(("127.0.0.1", 0))
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        with Ticker() as ticker:
            pusher = StatsdPusher(receiver.getsockname(), ticker.collect, interval_s=0.05)
            pusher.start()
            try:
                deadline = time.monotonic() + TIMEOUT
                while pusher.stats()["pushes"] < 5 and time.monotonic() < deadline:
                    time.sleep(0.02)
            finally:
                ticker.stop()  # stop counting first: pusher.stop() then sends the final value
                pusher.stop()
        lines = [line for d in _drain(receiver) for line in d.split(b"\n")]
    finally:
        receiver.close()
    assert pusher.stats()["pushes"] >= 6  # five from the thread, one from stop()
    deltas = [int(line.split(b":")[1].split(b"|")[0]) for line in lines
              if line.startswith(b"conntrail.events_received_total:")]
    assert len(deltas) >= 3
    assert sum(deltas) == ticker.value > 0
    assert pusher.stats()["send_errors"] == 0

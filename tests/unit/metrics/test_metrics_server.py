"""MetricsServer on 127.0.0.1:0 (and ::1), scraped with urllib and http.client."""

from __future__ import annotations

import http.client
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator

import pytest

from conntrail.errors import ConntrailError
from conntrail.metrics.exposition import CONTENT_TYPE, render
from conntrail.metrics.model import Sample
from conntrail.metrics.server import MetricsServer

TIMEOUT = 5.0
SAMPLES = [Sample("conntrail_events_received_total", "counter", "events", 42),
           Sample("conntrail_queue_depth", "gauge", "depth", 3, (("sink", "db"),))]


class Switchable:
    """A collector whose answer a test changes: samples, or an exception to raise."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.error: Exception | None = None
        self.calls = 0
        self.reset()

    def reset(self) -> None:
        """Back to the standard samples, no error, no calls."""
        self.samples = list(SAMPLES)
        self.error = None
        self.calls = 0

    def __call__(self) -> Iterable[Sample]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.samples


@pytest.fixture(scope="module")
def shared() -> Switchable:
    return Switchable()


@pytest.fixture(scope="module")
def shared_server(shared: Switchable) -> Iterator[MetricsServer]:
    """One server for the module's tests: stopping one takes up to its 0.2 s poll interval."""
    started = MetricsServer(("127.0.0.1", 0), shared)
    started.start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def collector(shared: Switchable) -> Switchable:
    shared.reset()
    return shared


@pytest.fixture
def server(shared_server: MetricsServer, collector: Switchable) -> MetricsServer:
    return shared_server


def _get(server: MetricsServer, path: str, host: str = "127.0.0.1",
         ) -> tuple[int, dict[str, str], bytes]:
    where = f"[{host}]" if ":" in host else host
    url = f"http://{where}:{server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def _request(server: MetricsServer, method: str, path: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        conn.request(method, path)
        answer = conn.getresponse()
        answer.read()
        return answer
    finally:
        conn.close()


def test_metrics_answers_the_rendered_samples(server: MetricsServer) -> None:
    status, headers, body = _get(server, "/metrics")
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE
    assert body == render(SAMPLES)
    assert headers["Content-Length"] == str(len(body))


def test_each_scrape_collects_anew(server: MetricsServer, collector: Switchable) -> None:
    _get(server, "/metrics")
    collector.samples = [Sample("conntrail_events_received_total", "counter", "events", 43)]
    assert b"conntrail_events_received_total 43\n" in _get(server, "/metrics")[2]
    assert collector.calls == 2


def test_a_query_string_is_ignored(server: MetricsServer) -> None:
    assert _get(server, "/metrics?name[]=x")[0] == 200


def test_index_links_to_metrics(server: MetricsServer, collector: Switchable) -> None:
    status, headers, body = _get(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'href="/metrics"' in body
    assert collector.calls == 0


@pytest.mark.parametrize("path", ["/metrics/", "/favicon.ico", "/metricsx", "/../metrics"])
def test_other_paths_are_404(server: MetricsServer, path: str) -> None:
    status, _, body = _get(server, path)
    assert status == 404 and b"/metrics" in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "BREW"])
def test_other_methods_are_405_with_allow(server: MetricsServer, method: str) -> None:
    answer = _request(server, method, "/metrics")
    assert answer.status == 405
    assert answer.getheader("Allow") == "GET, HEAD"


def test_head_answers_headers_only(server: MetricsServer) -> None:
    answer = _request(server, "HEAD", "/metrics")
    assert answer.status == 200
    assert answer.getheader("Content-Length") == str(len(render(SAMPLES)))


def test_server_does_not_advertise_python(server: MetricsServer) -> None:
    assert _get(server, "/")[1]["Server"].strip() == "conntrail"


def test_a_failing_collector_is_500_and_the_server_keeps_serving(
        server: MetricsServer, collector: Switchable, caplog: pytest.LogCaptureFixture) -> None:
    collector.error = RuntimeError("counter object gone")
    with caplog.at_level(logging.DEBUG, logger="conntrail.metrics.server"):
        assert _get(server, "/metrics")[0] == 500
        assert _get(server, "/metrics")[0] == 500
        collector.error = None
        assert _get(server, "/metrics")[0] == 200
    failures = [r for r in caplog.records if r.getMessage() == "metrics: collecting samples failed"]
    # The traceback is logged at ERROR once per failing streak, then at DEBUG.
    assert [r.levelno for r in failures] == [logging.ERROR, logging.DEBUG]
    assert failures[0].exc_info is not None
    assert any(r.getMessage() == "metrics: collecting samples works again" for r in caplog.records)


def test_an_invalid_sample_is_500_not_a_dead_server(server: MetricsServer,
                                                   collector: Switchable) -> None:
    collector.samples = [Sample("bad name", "gauge", "h", 1)]
    assert _get(server, "/metrics")[0] == 500
    collector.samples = list(SAMPLES)
    assert _get(server, "/metrics")[0] == 200


def test_nothing_is_written_to_stderr(server: MetricsServer, collector: Switchable,
                                      capfd: pytest.CaptureFixture[str]) -> None:
    _get(server, "/metrics")
    _get(server, "/nope")
    _request(server, "POST", "/")
    collector.error = RuntimeError("boom")
    _get(server, "/metrics")
    assert capfd.readouterr().err == ""


def test_a_taken_port_fails_at_start_naming_the_address(server: MetricsServer,
                                                        collector: Switchable) -> None:
    second = MetricsServer(("127.0.0.1", server.port), collector)
    with pytest.raises(ConntrailError, match=f"cannot listen on 127.0.0.1:{server.port}: "):
        second.start()
    second.stop()  # nothing started: a no-op


def test_an_address_not_on_this_host_fails_at_start() -> None:
    server = MetricsServer(("192.0.2.1", 0), lambda: SAMPLES)  # TEST-NET-1: never local
    with pytest.raises(ConntrailError, match=r"192\.0\.2\.1:0: .*assign"):
        server.start()


def test_ipv6_loopback() -> None:
    server = MetricsServer(("::1", 0), lambda: SAMPLES)
    server.start()
    try:
        assert server.port != 0
        assert _get(server, "/metrics", host="::1")[2] == render(SAMPLES)
    finally:
        server.stop()


def test_port_before_start_is_the_configured_one() -> None:
    assert MetricsServer(("127.0.0.1", 9477), lambda: SAMPLES).port == 9477


def test_stop_is_bounded_idempotent_and_closes() -> None:
    server = MetricsServer(("127.0.0.1", 0), lambda: SAMPLES)
    server.start()
    server.start()  # already started: a no-op
    port = server.port
    began = time.monotonic()
    server.stop()
    server.stop()
    assert time.monotonic() - began < 2.0
    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT).connect()

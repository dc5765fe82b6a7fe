"""StatsdPusher: line format, packing, and pushes received on a local UDP socket."""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Iterable, Iterator

import pytest

from conntrail.errors import ConfigError, ConntrailError
from conntrail.metrics.model import Sample
from conntrail.metrics.statsd import (
    MAX_DATAGRAM,
    Line,
    StatsdPusher,
    metric_path,
    pack,
    parse_prefix,
    sample_line,
)

TIMEOUT = 5.0
HOUR = 3600.0  # an interval the tests never reach: they push with push_now()


def _counter(name: str, value: float, **labels: str) -> Sample:
    return Sample(name, "counter", "h", value, tuple(labels.items()))


def _gauge(name: str, value: float, **labels: str) -> Sample:
    return Sample(name, "gauge", "h", value, tuple(labels.items()))


# -- pure parts ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("prefix", "tags", "path"), [
    ("conntrail", False, "conntrail.sink_written_total.main.db"),
    ("gw1.conntrail", False, "gw1.conntrail.sink_written_total.main.db"),
    ("gw1", False, "gw1.conntrail_sink_written_total.main.db"),
    ("", False, "conntrail_sink_written_total.main.db"),
    ("conntrail", True, "conntrail.sink_written_total"),
])
def test_metric_path(prefix: str, tags: bool, path: str) -> None:
    sample = _counter("conntrail_sink_written_total", 1, pipeline="main", sink="db")
    assert metric_path(sample, prefix, tags) == path


def test_label_values_are_sanitized_into_segments() -> None:
    sample = _gauge("up", 1, addr="10.0.0.1", port="", odd="a:b|c@d\ne", ok="A-z_9")
    assert metric_path(sample, "p", False) == "p.up.10_0_0_1._.a_b_c_d_e.A-z_9"


def test_a_colon_in_the_name_cannot_end_the_statsd_name() -> None:
    assert metric_path(_gauge("job:rate", 1), "p", False) == "p.job_rate"


@pytest.mark.parametrize(("sample", "value", "line"), [
    (_counter("conntrail_events_total", 0), 5, b"conntrail.events_total:5|c"),
    (_counter("conntrail_events_total", 0), 0.5, b"conntrail.events_total:0.5|c"),
    (_gauge("conntrail_queue_depth", 0, sink="db"), 3.0, b"conntrail.queue_depth.db:3|g"),
    (_gauge("conntrail_skew", 0), -2, b"conntrail.skew:0|g\nconntrail.skew:-2|g"),
])
def test_sample_line(sample: Sample, value: float, line: bytes) -> None:
    assert sample_line(sample, value, "conntrail", False) == line


def test_tags_are_dogstatsd_tags() -> None:
    sample = _counter("conntrail_sink_written_total", 0, sink="db", addr="::1", bad="a,b|c#d e")
    assert sample_line(sample, 4, "conntrail", True) == (
        b"conntrail.sink_written_total:4|c|#sink:db,addr:::1,bad:a_b_c_d_e")


def test_a_negative_gauge_with_tags_tags_both_lines() -> None:
    assert sample_line(_gauge("g", -1, k="v"), -1, "p", True) == b"p.g:0|g|#k:v\np.g:-1|g|#k:v"


def _lines(*sizes: int) -> list[Line]:
    return [Line(b"x" * size) for size in sizes]


def test_pack_fills_datagrams_up_to_the_limit() -> None:
    # 700 + 1 + 731 = 1432 fits exactly; the next line starts a new datagram.
    packed = pack(_lines(700, 731, 10, 20))
    assert [[len(line.text) for line in datagram] for datagram in packed] == [[700, 731],
                                                                              [10, 20]]


def test_pack_one_byte_over_splits() -> None:
    assert [len(d) for d in pack(_lines(700, 732))] == [1, 1]


def test_pack_a_line_longer_than_the_limit_goes_alone() -> None:
    assert [len(d) for d in pack(_lines(5, 2000, 5))] == [1, 1, 1]


def test_pack_nothing() -> None:
    assert pack([]) == []


@pytest.mark.parametrize("prefix", ["conntrail", "gw-1.conntrail", "a_b.c", ""])
def test_valid_prefixes(prefix: str) -> None:
    assert parse_prefix(prefix, "metrics.statsd.prefix") == prefix


@pytest.mark.parametrize("prefix", [".conntrail", "conntrail.", "a..b", "a b", "a:b", "é"])
def test_invalid_prefixes_name_the_key(prefix: str) -> None:
    with pytest.raises(ConfigError, match=r"^metrics\.statsd\.prefix: .* is not a statsd prefix"):
        parse_prefix(prefix, "metrics.statsd.prefix")


# -- pushes over UDP -----------------------------------------------------------------------------

class Counters:
    """A collector over values a test sets."""

    def __init__(self, *samples: Sample) -> None:
        self.samples = list(samples)
        self.error: Exception | None = None

    def __call__(self) -> Iterable[Sample]:
        if self.error is not None:
            raise self.error
        return list(self.samples)


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(TIMEOUT)
        yield sock
    finally:
        sock.close()


def _pusher(receiver: socket.socket, collector: Counters, tags: bool = False) -> StatsdPusher:
    return StatsdPusher(receiver.getsockname(), collector, interval_s=HOUR, tags=tags)


@pytest.fixture
def started() -> Iterator[list[StatsdPusher]]:
    """Pushers a test starts; all stopped afterwards, pass or fail."""
    pushers: list[StatsdPusher] = []
    try:
        yield pushers
    finally:
        for pusher in pushers:
            pusher.stop()


def _start(started: list[StatsdPusher], pusher: StatsdPusher) -> StatsdPusher:
    pusher.start()
    started.append(pusher)
    return pusher


def _receive(receiver: socket.socket, count: int) -> list[bytes]:
    return [receiver.recv(65536) for _ in range(count)]


def _nothing_more(receiver: socket.socket) -> bool:
    receiver.setblocking(False)
    try:
        receiver.recv(65536)
    except BlockingIOError:
        return True
    finally:
        receiver.settimeout(TIMEOUT)
    return False


def test_counters_go_as_deltas_gauges_as_values(receiver: socket.socket,
                                                started: list[StatsdPusher]) -> None:
    collector = Counters(_counter("conntrail_events_total", 10), _gauge("conntrail_depth", 4))
    pusher = _start(started, _pusher(receiver, collector))
    assert pusher.push_now() == 1
    assert _receive(receiver, 1) == [b"conntrail.events_total:10|c\nconntrail.depth:4|g"]
    collector.samples = [_counter("conntrail_events_total", 25), _gauge("conntrail_depth", 4)]
    pusher.push_now()
    assert _receive(receiver, 1) == [b"conntrail.events_total:15|c\nconntrail.depth:4|g"]


def test_zero_deltas_are_skipped(receiver: socket.socket, started: list[StatsdPusher]) -> None:
    collector = Counters(_counter("a_total", 3), _counter("zero_total", 0))
    pusher = _start(started, _pusher(receiver, collector))
    pusher.push_now()
    assert _receive(receiver, 1) == [b"conntrail.a_total:3|c"]
    assert pusher.push_now() == 0  # nothing changed: nothing to send
    assert _nothing_more(receiver)


def test_a_counter_that_went_backwards_sends_its_new_value(receiver: socket.socket,
                                                          started: list[StatsdPusher]) -> None:
    collector = Counters(_counter("a_total", 100, sink="db"))
    pusher = _start(started, _pusher(receiver, collector))
    pusher.push_now()
    collector.samples = [_counter("a_total", 7, sink="db")]  # a reload reset it
    pusher.push_now()
    collector.samples = [_counter("a_total", 9, sink="db")]
    pusher.push_now()
    assert _receive(receiver, 3) == [b"conntrail.a_total.db:100|c", b"conntrail.a_total.db:7|c",
                                     b"conntrail.a_total.db:2|c"]


def test_series_are_told_apart_by_labels(receiver: socket.socket,
                                         started: list[StatsdPusher]) -> None:
    collector = Counters(_counter("w_total", 1, sink="a"), _counter("w_total", 1, sink="b"))
    pusher = _start(started, _pusher(receiver, collector))
    pusher.push_now()
    collector.samples = [_counter("w_total", 1, sink="a"), _counter("w_total", 5, sink="b")]
    pusher.push_now()
    assert _receive(receiver, 2) == [b"conntrail.w_total.a:1|c\nconntrail.w_total.b:1|c",
                                     b"conntrail.w_total.b:4|c"]


def test_tags_mode(receiver: socket.socket, started: list[StatsdPusher]) -> None:
    collector = Counters(_counter("w_total", 2, pipeline="main", sink="db"))
    pusher = _start(started, _pusher(receiver, collector, tags=True))
    pusher.push_now()
    assert _receive(receiver, 1) == [b"conntrail.w_total:2|c|#pipeline:main,sink:db"]


def test_many_series_are_packed_into_full_datagrams(receiver: socket.socket,
                                                    started: list[StatsdPusher]) -> None:
    collector = Counters(*[_gauge("conntrail_queue_depth", n, sink=f"sink{n:03}")
                           for n in range(300)])
    pusher = _start(started, _pusher(receiver, collector))
    sent = pusher.push_now()
    datagrams = _receive(receiver, sent)
    assert sent > 1 and all(len(d) <= MAX_DATAGRAM for d in datagrams)
    assert all(len(d) > MAX_DATAGRAM - 40 for d in datagrams[:-1])  # each one well filled
    lines = [line for d in datagrams for line in d.split(b"\n")]
    assert lines == [f"conntrail.queue_depth.sink{n:03}:{n}|g".encode() for n in range(300)]
    assert _nothing_more(receiver)
    assert pusher.stats()["datagrams"] == sent


def test_nan_and_infinite_values_are_skipped(receiver: socket.socket,
                                             started: list[StatsdPusher]) -> None:
    collector = Counters(_gauge("nan", math.nan), _gauge("inf", math.inf), _gauge("ok", 1))
    pusher = _start(started, _pusher(receiver, collector))
    pusher.push_now()
    assert _receive(receiver, 1) == [b"conntrail.ok:1|g"]


def test_a_failing_collector_is_counted_and_logged_once(
        receiver: socket.socket, started: list[StatsdPusher],
        caplog: pytest.LogCaptureFixture) -> None:
    collector = Counters(_counter("a_total", 1))
    collector.error = RuntimeError("gone")
    pusher = _start(started, _pusher(receiver, collector))
    with caplog.at_level(logging.DEBUG, logger="conntrail.metrics.statsd"):
        assert pusher.push_now() == 0
        assert pusher.push_now() == 0
    assert pusher.stats()["collect_errors"] == 2
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.DEBUG]
    collector.error = None
    pusher.push_now()
    assert _receive(receiver, 1) == [b"conntrail.a_total:1|c"]


def test_send_errors_are_counted_never_raised(started: list[StatsdPusher]) -> None:
    # Sending to the broadcast address without SO_BROADCAST fails with EACCES.
    pusher = StatsdPusher(("255.255.255.255", 8125), Counters(_gauge("g", 1)), interval_s=HOUR)
    _start(started, pusher)
    assert pusher.push_now() == 0
    assert pusher.push_now() == 0
    assert pusher.stats() == {"pushes": 2, "datagrams": 0, "send_errors": 2, "collect_errors": 0}


def test_a_failed_send_is_carried_by_the_next_push(receiver: socket.socket,
                                                   started: list[StatsdPusher],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    collector = Counters(_counter("a_total", 5))
    pusher = _start(started, _pusher(receiver, collector))
    # Point the socket at the broadcast address for one push (private: no public way to fail).
    monkeypatch.setattr(pusher, "_sockaddr", ("255.255.255.255", 8125))
    assert pusher.push_now() == 0
    monkeypatch.setattr(pusher, "_sockaddr", receiver.getsockname())
    collector.samples = [_counter("a_total", 8)]
    pusher.push_now()
    assert _receive(receiver, 1) == [b"conntrail.a_total:8|c"]  # 5 lost + 3 new


def test_stop_pushes_the_last_changes(receiver: socket.socket) -> None:
    collector = Counters(_counter("a_total", 5))
    pusher = _pusher(receiver, collector)
    pusher.start()
    try:
        pusher.push_now()
        collector.samples = [_counter("a_total", 6)]
    finally:
        pusher.stop()
    pusher.stop()  # idempotent
    assert _receive(receiver, 2) == [b"conntrail.a_total:5|c", b"conntrail.a_total:1|c"]


def test_push_before_start_is_a_programming_error(receiver: socket.socket) -> None:
    with pytest.raises(RuntimeError, match="not started"):
        _pusher(receiver, Counters()).push_now()


def test_an_unresolvable_address_fails_at_start() -> None:
    pusher = StatsdPusher(("no such host.invalid", 8125), Counters(), interval_s=HOUR)
    with pytest.raises(ConntrailError, match=r"statsd: cannot send to no such host\.invalid"):
        pusher.start()


def test_ipv6_target(started: list[StatsdPusher]) -> None:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.bind(("::1", 0))
        sock.settimeout(TIMEOUT)
        pusher = _start(started, StatsdPusher(sock.getsockname()[:2], Counters(_gauge("g", 2)),
                                              interval_s=HOUR))
        pusher.push_now()
        assert sock.recv(65536) == b"conntrail.g:2|g"
    finally:
        sock.close()


@pytest.mark.parametrize("interval", [0.0, -1.0, math.nan])
def test_interval_must_be_positive(interval: float) -> None:
    with pytest.raises(ValueError, match="interval_s must be positive"):
        StatsdPusher(("127.0.0.1", 8125), Counters(), interval_s=interval)

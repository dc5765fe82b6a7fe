"""The syslog sink without a syslog server: configuration, framing, truncation, and sends
that fail part-way and are retried (fake stream sockets; real unix datagram sockets)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.unit.formats.sample import ICMP, PLAIN_UDP6, SNAT_TCP, T0

from conntrail.config import Table
from conntrail.errors import ConfigError, ConntrailError
from conntrail.formats.rfc5424 import Rfc5424Format
from conntrail.formats.text import TextFormat
from conntrail.model import LossNotice, TableSnapshot
from conntrail.pipeline.queued import QueuedSink, RetryPolicy
from conntrail.pipeline.stages import SinkContext
from conntrail.sinks import syslog
from conntrail.sinks.syslog import Destination, SyslogSink, from_config, parse_address

KEY = "pipelines.main.sinks.log"


def build(**keys: Any) -> SyslogSink:
    return from_config(Table(dict(keys), KEY), SinkContext("log"))


def stream_sink(framing: str = "octet-counting", max_message: int | None = None) -> SyslogSink:
    formatter = Rfc5424Format(hostname="gw1", message=TextFormat(), procid="1")
    return SyslogSink("log", Destination("tcp", "192.0.2.1", 514, framing), formatter,
                      max_message)


class FakeStream:
    """A stream socket taking at most `per_call` bytes a send, failing after `capacity`."""

    def __init__(self, capacity: int | None = None, per_call: int = 1 << 30) -> None:
        self.capacity = capacity
        self.per_call = per_call
        self.data = bytearray()
        self.closed = False
        self.gone = False  # what peer_closed reports

    def send(self, data: Any) -> int:
        room = self.per_call
        if self.capacity is not None:
            room = min(room, self.capacity - len(self.data))
            if room <= 0:
                raise BrokenPipeError(32, "Broken pipe")
        taken = bytes(data[:room])
        self.data += taken
        return len(taken)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """What successive connects return (a FakeStream) or raise (an exception)."""
    queue: list[Any] = []

    def fake_connect(dest: Destination) -> Any:
        item = queue.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    monkeypatch.setattr(syslog, "connect", fake_connect)
    monkeypatch.setattr(syslog, "peer_closed", lambda sock: sock.gone)
    yield queue


# --- configuration -------------------------------------------------------------------

def test_defaults() -> None:
    sink = build()
    assert (sink.dest.transport, sink.dest.host, sink.max_message) == ("unix", "/dev/log", 8192)
    fmt = sink.formatter
    assert (fmt.hostname, fmt.app_name, fmt.facility, fmt.severity, fmt.sd_id, fmt.bom) == (
        socket.gethostname(), "conntrail", 16, 6, "conntrail@32473", False)
    assert fmt.message(PLAIN_UDP6).endswith(b":: new\n")  # the text format by default
    assert sink.name == "log"


@pytest.mark.parametrize(("transport", "address", "host", "port", "limit"), [
    ("udp", "logs.example.net", "logs.example.net", 514, 2048),
    ("tcp", "192.0.2.7:1514", "192.0.2.7", 1514, 8192),
    ("tls", "[2001:db8::5]", "2001:db8::5", 6514, 8192),
    ("udp", "[::1]:5514", "::1", 5514, 2048),
])
def test_network_destinations(transport: str, address: str, host: str, port: int,
                              limit: int) -> None:
    sink = build(transport=transport, address=address)
    assert (sink.dest.host, sink.dest.port, sink.max_message) == (host, port, limit)
    assert str(sink.dest).endswith(f"{port}")


def test_every_key() -> None:
    sink = build(transport="tcp", address="h:1", facility="daemon", severity="notice",
                 app_name="ct", hostname="gw9", sd_id="ct@99999", framing="lf",
                 max_message="4k", timeout="2s", bom=True, format="json")
    fmt = sink.formatter
    assert (fmt.facility, fmt.severity, fmt.app_name, fmt.hostname, fmt.sd_id, fmt.bom) == (
        3, 5, "ct", "gw9", "ct@99999", True)
    assert (sink.dest.framing, sink.dest.timeout, sink.max_message) == ("lf", 2.0, 4096)
    assert fmt.message(PLAIN_UDP6).startswith(b'{"@timestamp"')


def test_tls_without_verification() -> None:
    sink = build(transport="tls", address="h", verify=False, server_name="logs")
    assert sink.dest.tls is not None and not sink.dest.tls.check_hostname
    assert sink.dest.server_name == "logs"


@pytest.mark.parametrize(("keys", "message"), [
    ({"transport": "kafka"}, r"\.transport: unknown value 'kafka'; one of: unix, udp, tcp"),
    ({"transport": "tcp"}, r'\.address: is required for transport = "tcp"'),
    ({"transport": "udp", "address": "::1"}, r"\.address: write an IPv6 address in brackets"),
    ({"transport": "udp", "address": "h:0"}, r"\.address: port '0' is not a number from 1"),
    ({"transport": "udp", "address": "h:x"}, r"\.address: port 'x'"),
    ({"transport": "udp", "address": "[::1"}, r"\.address: an IPv6 address is written"),
    ({"transport": "udp", "address": ":514"}, r"\.address: no host"),
    ({"address": ""}, r"\.address: must be a socket path"),
    ({"transport": "udp", "address": "h", "framing": "lf"},
     r'\.framing: only applies to transport = "tcp" or "tls", not "udp"'),
    ({"transport": "tcp", "address": "h", "framing": "nul"}, r"\.framing: unknown value"),
    ({"transport": "tcp", "address": "h", "ca_file": "/x"},
     r'\.ca_file: only applies to transport = "tls", not "tcp"'),
    ({"transport": "tls", "address": "h", "key_file": "/k"}, r"\.key_file: needs cert_file"),
    ({"transport": "tls", "address": "h", "ca_file": "/nonexistent/ca.pem"},
     r"\.ca_file: cannot load: no such file or directory"),
    ({"transport": "tls", "address": "h", "cert_file": "/nonexistent/c.pem"},
     r"\.cert_file: cannot load the client certificate and key: no such file"),
    ({"transport": "udp", "address": "h", "max_message": 100},
     r"\.max_message: must be at least 480 bytes"),
    ({"transport": "udp", "address": "h", "max_message": "64k"},
     r"\.max_message: at most 65507 bytes"),
    ({"facility": "local9"}, r"\.facility: unknown value 'local9'"),
    ({"severity": "warn"}, r"\.severity: unknown value 'warn'"),
    ({"hostname": "my host"}, r"\.hostname: 'my host' must be printable ASCII"),
    ({"app_name": "a" * 49}, r"\.app_name: .* must be at most 48 characters"),
    ({"sd_id": "flow"}, r"\.sd_id: 'flow' must be NAME@ENTERPRISE-NUMBER"),
    ({"timeout": 0}, r"\.timeout: must be more than 0s"),
    ({"format": "json", "template": "{src}"}, r'\.template: only applies to format = "text"'),
    ({"adress": "/dev/log"}, r"\.adress: unknown key; did you mean 'address'\?"),
])
def test_config_errors_name_the_key(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re_key()}{message}"):
        build(**keys)


def re_key() -> str:
    return KEY.replace(".", r"\.")


def test_a_file_that_is_not_a_certificate(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"\.ca_file: cannot load: "):
        build(transport="tls", address="h", ca_file=str(bogus))


def test_a_bad_system_hostname_asks_for_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "bad host")
    with pytest.raises(ConfigError, match=r"\.hostname: .* \(it is the default here: set it"):
        build()


def test_parse_address() -> None:
    assert parse_address("h", 1) == ("h", 1)
    assert parse_address("[fe80::1%eth0]:2", 1) == ("fe80::1%eth0", 2)
    with pytest.raises(ValueError, match="brackets"):
        parse_address("2001:db8::1:514", 1)
    with pytest.raises(ValueError, match="IPv6 address is written"):
        parse_address("[::1]514", 1)


# --- encoding ------------------------------------------------------------------------

def test_octet_counting_frames() -> None:
    frames = stream_sink().encode([SNAT_TCP, TableSnapshot("", 1, T0), ICMP])
    assert len(frames) == 2
    for frame in frames:
        length, _, message = frame.partition(b" ")
        assert int(length) == len(message) and message.startswith(b"<134>1 ")


def test_lf_frames_cannot_hold_a_newline() -> None:
    sink = stream_sink("lf")
    sink.formatter.message = lambda record: b"two\nlines\n"
    [frame] = sink.encode([PLAIN_UDP6])
    assert frame.endswith(b"] two lines\n") and frame.count(b"\n") == 1


def test_datagrams_are_not_framed() -> None:
    sink = build(transport="udp", address="h")
    assert sink.encode([PLAIN_UDP6]) == [sink.formatter(PLAIN_UDP6)]


def test_truncation_is_counted_and_keeps_the_structured_data() -> None:
    sink = build(transport="udp", address="h", max_message=480, template="{src} " + "x" * 600)
    [message] = sink.encode([SNAT_TCP])
    assert len(message) == 480 and b'reply_packets="5"] 198.18.1.2 xxx' in message
    sink.encode([LossNotice("", "enobufs", 1, T0)])
    assert sink.stats() == {"sent": 0, "reconnects": 0, "truncated": 1, "oversize": 0}


def test_spool_round_trip() -> None:
    sink = stream_sink()
    payload = sink.encode([SNAT_TCP, PLAIN_UDP6, ICMP])
    assert sink.from_spool(sink.to_spool(payload)) == payload
    assert sink.from_spool(sink.to_spool([])) == []
    for cut in (3, 10, len(sink.to_spool(payload)) - 1):
        with pytest.raises(ConntrailError, match="spooled batch cut short"):
            sink.from_spool(sink.to_spool(payload)[:cut])


# --- writing over a stream -----------------------------------------------------------

def test_a_retry_resumes_after_the_last_whole_message(connections: list[Any]) -> None:
    sink = stream_sink()
    payload = sink.encode([SNAT_TCP, PLAIN_UDP6, ICMP])
    broken = FakeStream(capacity=len(payload[0]) + 10, per_call=50)  # dies inside message 2
    connections += [broken, FakeStream()]
    with pytest.raises(ConntrailError, match=r"^tcp 192\.0\.2\.1:514: send failed: broken "
                                             r"pipe; 2 messages to retry$") as raised:
        sink.write(payload)
    assert not isinstance(raised.value, OSError)  # BrokenPipeError would stop the sink
    assert broken.closed and bytes(broken.data) == payload[0] + payload[1][:10]
    sink.write(payload)  # the runner's retry: the same object
    assert bytes(connections_seen(sink)) == payload[1] + payload[2]
    assert sink.stats()["sent"] == 3 and sink.stats()["reconnects"] == 1


def connections_seen(sink: SyslogSink) -> bytearray:
    sock = sink._sock
    assert isinstance(sock, FakeStream)
    return sock.data


def test_another_payload_starts_from_its_first_message(connections: list[Any]) -> None:
    sink = stream_sink()
    first = sink.encode([SNAT_TCP, PLAIN_UDP6])
    connections += [FakeStream(capacity=len(first[0])), FakeStream()]
    with pytest.raises(ConntrailError):
        sink.write(first)
    second = sink.encode([SNAT_TCP, PLAIN_UDP6])  # equal bytes, another batch
    sink.write(second)
    assert bytes(connections_seen(sink)) == b"".join(second)


def test_a_written_payload_is_forgotten(connections: list[Any]) -> None:
    sink = stream_sink()
    payload = sink.encode([ICMP])
    connections.append(FakeStream())
    sink.write(payload)
    sink.write(payload)  # (the runner never does this; if it did, it is sent again)
    assert bytes(connections_seen(sink)) == payload[0] * 2


def test_connect_failure_then_success(connections: list[Any]) -> None:
    sink = stream_sink()
    payload = sink.encode([ICMP, ICMP])
    connections += [ConntrailError("tcp 192.0.2.1:514: cannot connect: connection refused"),
                    FakeStream()]
    with pytest.raises(ConntrailError, match="connection refused"):
        sink.write(payload)
    sink.write(payload)
    assert bytes(connections_seen(sink)) == b"".join(payload)
    assert sink.stats()["reconnects"] == 0  # the first connection, made late


def test_a_connection_the_peer_closed_is_replaced_before_sending(
        connections: list[Any]) -> None:
    sink = stream_sink()
    first, second = FakeStream(), FakeStream()
    connections += [first, second]
    sink.write(sink.encode([ICMP]))
    first.gone = True
    payload = sink.encode([PLAIN_UDP6])
    sink.write(payload)
    assert first.closed and bytes(second.data) == payload[0]
    assert sink.stats()["reconnects"] == 1


def test_large_batches_go_in_chunks(connections: list[Any]) -> None:
    sink = stream_sink()
    payload = sink.encode([SNAT_TCP] * 400)  # ~200 kB
    sock = FakeStream(per_call=7000)
    connections.append(sock)
    sink.write(payload)
    assert bytes(sock.data) == b"".join(payload) and sink.stats()["sent"] == 400


def test_reopen_and_close(connections: list[Any]) -> None:
    sink = stream_sink()
    first, second = FakeStream(), FakeStream()
    connections += [first, second]
    sink.write(sink.encode([ICMP]))
    sink.reopen()
    assert first.closed
    sink.write(sink.encode([ICMP]))
    sink.close()
    sink.close()
    assert second.closed


def test_the_queued_runner_retries_until_all_is_written_once(connections: list[Any]) -> None:
    sink = stream_sink()
    events = [SNAT_TCP._replace(flow=SNAT_TCP.flow._replace(ct_id=n)) for n in range(50)]
    sizes = [len(frame) for frame in sink.encode(events[:10])]
    refused = ConntrailError("cannot connect: connection refused")
    delivered = FakeStream()
    connections += [FakeStream(capacity=sum(sizes[:3]) + 5, per_call=100), refused, refused,
                    delivered]
    queued = QueuedSink(sink, retry=RetryPolicy(initial_s=0.01, max_s=0.02))
    queued.start()
    try:
        for start in range(0, 50, 10):
            queued.offer(events[start:start + 10])
    finally:
        queued.stop(time.monotonic() + 10)
    assert queued.counters.written == 50 and queued.counters.retries == 3
    ids = [int(part.split(b'"')[0]) for part in bytes(delivered.data).split(b'ct_id="')[1:]]
    assert ids == list(range(3, 50))


# --- real sockets --------------------------------------------------------------------

def test_peer_closed_on_a_socket_pair() -> None:
    ours, theirs = socket.socketpair()
    with ours:
        assert not syslog.peer_closed(ours)
        theirs.close()
        assert syslog.peer_closed(ours)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[Path, list[socket.socket]]]:
    """A unix datagram socket path and the receiving sockets bound to it (closed after)."""
    path = tmp_path / "log.sock"
    bound: list[socket.socket] = []
    try:
        yield path, bound
    finally:
        for sock in bound:
            sock.close()


def bind(path: Path, bound: list[socket.socket]) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    bound.append(sock)
    sock.bind(str(path))
    sock.settimeout(2)
    return sock


def test_unix_datagrams_survive_a_receiver_restart(
        receiver: tuple[Path, list[socket.socket]]) -> None:
    path, bound = receiver
    first = bind(path, bound)
    sink = build(address=str(path))
    try:
        assert sink.check() == f"syslog unix {path}: connected"
        payload = sink.encode([SNAT_TCP, ICMP])
        sink.write(payload)
        assert [first.recv(65536) for _ in payload] == payload
        first.close()
        path.unlink()
        retried = sink.encode([PLAIN_UDP6])
        with pytest.raises(ConntrailError, match=r"^unix .*: send failed: connection refused"):
            sink.write(retried)
        with pytest.raises(ConntrailError, match="cannot connect: no such file or directory"):
            sink.write(retried)
        second = bind(path, bound)
        sink.write(retried)
        assert second.recv(65536) == retried[0]
        assert sink.stats() == {"sent": 3, "reconnects": 1, "truncated": 0, "oversize": 0}
    finally:
        sink.close()


def test_an_oversize_datagram_is_dropped_and_counted(
        receiver: tuple[Path, list[socket.socket]]) -> None:
    path, bound = receiver
    sock = bind(path, bound)
    sink = build(address=str(path), max_message="1M")
    sink.formatter.message = lambda record: b"x" * 600_000 if record is ICMP else b"ok"
    try:
        sink.write(sink.encode([PLAIN_UDP6, ICMP, SNAT_TCP]))
        assert [sock.recv(65536).endswith(b"] ok") for _ in range(2)] == [True, True]
        assert sink.stats()["oversize"] == 1 and sink.stats()["sent"] == 2
    finally:
        sink.close()


def test_check_names_a_missing_socket(tmp_path: Path) -> None:
    sink = build(address=str(tmp_path / "nothing"))
    with pytest.raises(ConntrailError, match=r"^unix .*nothing: cannot connect: no such file"):
        sink.check()


def test_check_over_udp_cannot_promise_a_listener() -> None:
    sink = build(transport="udp", address="127.0.0.1:9")
    assert sink.check() == ("syslog udp 127.0.0.1:9: address resolved (UDP cannot tell "
                            "whether anyone listens)")

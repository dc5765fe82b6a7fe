"""The syslog sink against a real, private rsyslogd: every transport, TLS verification,
and a receiver that goes away and comes back (TCP/TLS: no loss, no duplicates)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from conntrail.config import Table
from conntrail.errors import ConfigError, ConntrailError
from conntrail.formats.rfc5424 import DEFAULT_SD_ID, flow_params
from conntrail.formats.text import TextFormat
from conntrail.formats.timefmt import iso_utc
from conntrail.model import (
    Attribution,
    Confidence,
    Counters,
    CtStatus,
    EventKind,
    Flow,
    FlowEvent,
    FlowTuple,
    LossNotice,
    TableSnapshot,
)
from conntrail.pipeline.stages import SinkContext
from conntrail.sinks.syslog import SyslogSink, from_config
from tests.integration.rsyslog import Received, Rsyslogd, rsyslogd
from tests.unit.formats.sample import T0

HOST = "ctt-host.example"
APP = "ctt-syslog"
# Characters RFC 5424 makes us escape in SD values, and one that is not ASCII.
ODD_EXE = '/opt/we"ird]dir\\bin/é-app'


@pytest.fixture
def server() -> Iterator[Rsyslogd]:
    with rsyslogd() as running:
        yield running


@pytest.fixture
def sinks() -> Iterator[list[SyslogSink]]:
    made: list[SyslogSink] = []
    try:
        yield made
    finally:
        for sink in made:
            sink.close()


def keys_for(server: Rsyslogd, transport: str) -> dict[str, Any]:
    """The table keys that reach `server` over `transport` (TLS verified with its CA)."""
    if transport == "unix":
        return {"transport": "unix", "address": str(server.socket_path)}
    port = {"udp": server.udp_port, "tcp": server.tcp_port, "tls": server.tls_port,
            "mtls": server.mtls_port}[transport]
    keys: dict[str, Any] = {"transport": "tls" if transport == "mtls" else transport,
                            "address": f"127.0.0.1:{port}"}
    if transport in ("tls", "mtls"):
        keys["ca_file"] = server.file("ca.pem")
    if transport == "mtls":
        keys |= {"cert_file": server.file("client.pem"), "key_file": server.file("client.key")}
    return keys


def make(sinks: list[SyslogSink], keys: dict[str, Any]) -> SyslogSink:
    table = Table({"hostname": HOST, "app_name": APP, "timeout": "5s", **keys},
                  "pipelines.main.sinks.log")
    sink = from_config(table, SinkContext("log"))
    sinks.append(sink)
    sink.open()
    return sink


def events(count: int, first: int = 0) -> list[FlowEvent]:
    """Distinct flows (ct_id = index), SNAT and attribution on every other one."""
    made = []
    for index in range(first, first + count):
        orig = FlowTuple(2, 6, "198.18.1.2", "198.18.2.2", 20000 + index, 443)
        nat = index % 2 == 0
        reply = FlowTuple(2, 6, "198.18.2.2", "198.18.2.1" if nat else "198.18.1.2", 443,
                          61000 + index if nat else 20000 + index)
        who = Attribution("ebpf", Confidence.EXACT, uid=1000, gid=1000, pid=4000 + index,
                          exe=ODD_EXE, unit="app.service") if nat else None
        flow = Flow(orig=orig, reply=reply, ct_id=index, mark=index, proto_state=3,
                    status=CtStatus.CONFIRMED | (CtStatus.SRC_NAT if nat else 0),
                    counters_orig=Counters(index, 100 * index), start_ns=T0 + index * 1000)
        made.append(FlowEvent(EventKind.NEW, flow, "ctt-ns", T0, who))
    return made


def expected_params(event: FlowEvent) -> dict[str, str]:
    return {name: str(value) for name, value in flow_params(event) if value is not None}


def assert_intact(received: list[Received], sent: list[FlowEvent]) -> None:
    """Exactly `sent`, in order, each parsed by rsyslog into the fields we meant."""
    assert [r.params[DEFAULT_SD_ID]["ct_id"] for r in received] == \
        [str(e.flow.ct_id) for e in sent]
    text = TextFormat()
    for got, event in zip(received, sent, strict=True):
        assert (got.msgid, got.app_name, got.hostname, got.procid) == \
            ("NEW", APP, HOST, str(os.getpid()))
        assert (got.facility, got.severity) == ("16", "6")  # local0.info
        assert got.time == iso_utc(event.time_ns)
        assert got.params == {DEFAULT_SD_ID: expected_params(event)}
        assert got.msg == text(event).decode().removesuffix("\n").replace("\n\t", " ")


def write_all(sink: SyslogSink, records: list[Any], per_batch: int = 25) -> None:
    for start in range(0, len(records), per_batch):
        sink.write(sink.encode(records[start:start + per_batch]))


@pytest.mark.parametrize("transport", ["unix", "udp", "tcp", "tls", "mtls"])
def test_every_transport_delivers_messages_intact(server: Rsyslogd, sinks: list[SyslogSink],
                                                  transport: str) -> None:
    sink = make(sinks, keys_for(server, transport))
    sent = events(100)
    write_all(sink, [*sent[:50], TableSnapshot("", 50, T0), *sent[50:]])
    received = server.wait_for(APP, len(sent))
    assert_intact(received, sent)
    assert sink.stats()["sent"] == len(sent)
    assert any(r.params[DEFAULT_SD_ID].get("exe") == ODD_EXE for r in received)


def test_lf_framing_over_tcp(server: Rsyslogd, sinks: list[SyslogSink]) -> None:
    sink = make(sinks, {**keys_for(server, "tcp"), "framing": "lf"})
    sent = events(20)
    write_all(sink, sent)
    assert_intact(server.wait_for(APP, len(sent)), sent)


def test_loss_notice_is_a_warning_with_msgid_lost(server: Rsyslogd,
                                                  sinks: list[SyslogSink]) -> None:
    sink = make(sinks, keys_for(server, "tcp"))
    sink.write(sink.encode([LossNotice("ctt-ns", "enobufs", 12, T0)]))
    [got] = server.wait_for(APP, 1)
    assert (got.msgid, got.severity) == ("LOST", "4")
    assert got.params == {DEFAULT_SD_ID: {"lost": "12", "reason": "enobufs",
                                          "netns": "ctt-ns"}}
    assert "lost 12 events in netns ctt-ns" in got.msg


def test_udp_truncates_the_msg_never_the_structured_data(server: Rsyslogd,
                                                         sinks: list[SyslogSink]) -> None:
    sink = make(sinks, {**keys_for(server, "udp"), "max_message": 600,
                        "template": "{event} " + "é" * 400})
    sent = events(10)
    write_all(sink, sent)
    received = server.wait_for(APP, len(sent))
    assert [r.params for r in received] == [{DEFAULT_SD_ID: expected_params(e)} for e in sent]
    for got in received:
        assert got.msg.startswith("new éé") and len(got.msg) < 400  # cut, whole characters
    assert sink.stats()["truncated"] == len(sent)


def test_tls_check_reports_a_verified_session(server: Rsyslogd,
                                              sinks: list[SyslogSink]) -> None:
    sink = make(sinks, keys_for(server, "tls"))
    description = sink.check()
    assert description.startswith(f"syslog tls 127.0.0.1:{server.tls_port}: connected, TLSv1")
    assert description.endswith("server certificate verified")


@pytest.mark.parametrize(("extra", "reason"), [
    ({"ca_file": "other-ca.pem"}, "certificate verify failed: unable to get local issuer"),
    ({"server_name": "wrong.example"}, "certificate verify failed: hostname mismatch"),
])
def test_tls_refuses_a_server_it_cannot_verify(server: Rsyslogd, sinks: list[SyslogSink],
                                               extra: dict[str, str], reason: str) -> None:
    keys = keys_for(server, "tls")
    if "ca_file" in extra:
        extra = {"ca_file": server.file(extra["ca_file"])}
    sink = make(sinks, {**keys, **extra})
    with pytest.raises(ConntrailError, match=rf"^tls 127\.0\.0\.1:\d+: cannot connect: {reason}"):
        sink.check()
    with pytest.raises(ConntrailError, match=reason):
        sink.write(sink.encode(events(1)))
    assert server.wait_for(APP, 1, timeout=1.0) == []


def test_check_names_a_refused_connection(server: Rsyslogd, sinks: list[SyslogSink]) -> None:
    sink = make(sinks, keys_for(server, "tcp"))
    server.stop()
    with pytest.raises(ConntrailError, match=r"^tcp 127\.0\.0\.1:\d+: cannot connect: "
                                             r"connection refused$"):
        sink.check()


def retry_until_written(sink: SyslogSink, payload: list[bytes], seconds: float = 10.0) -> int:
    """Write as the runner does (same payload object); how many attempts failed."""
    deadline = time.monotonic() + seconds
    failures = 0
    while True:
        try:
            sink.write(payload)
            return failures
        except ConntrailError:
            failures += 1
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize("transport", ["tcp", "tls", "unix"])
def test_receiver_restart_loses_nothing_and_duplicates_nothing(
        server: Rsyslogd, sinks: list[SyslogSink], transport: str) -> None:
    sink = make(sinks, keys_for(server, transport))
    first, second = events(30), events(30, first=30)
    sink.write(sink.encode(first))
    server.wait_for(APP, len(first))
    server.stop()
    payload = sink.encode(second)
    for _ in range(2):  # down: every attempt fails, and says why
        with pytest.raises(ConntrailError, match=r"cannot connect|send failed"):
            sink.write(payload)
    server.start()
    retry_until_written(sink, payload)
    assert_intact(server.wait_for(APP, len(first) + len(second)), first + second)
    assert sink.stats()["reconnects"] == 1


def test_udp_resumes_after_a_restart(server: Rsyslogd, sinks: list[SyslogSink]) -> None:
    """What is sent over UDP while the receiver is down is lost (UDP has no way to know):
    the sink only has to send again once it is back."""
    sink = make(sinks, keys_for(server, "udp"))
    first, lost, last = events(10), events(10, first=10), events(10, first=20)
    sink.write(sink.encode(first))
    server.wait_for(APP, len(first))
    server.stop()
    try:
        sink.write(sink.encode(lost))
    except ConntrailError as exc:  # only if an ICMP port-unreachable came back in time
        assert "connection refused" in str(exc)
    server.start()
    payload = sink.encode(last)
    retry_until_written(sink, payload)
    received = server.wait_for(APP, len(first) + len(last))
    ids = [r.params[DEFAULT_SD_ID]["ct_id"] for r in received]
    assert ids[:10] == [str(n) for n in range(10)]
    assert ids[-10:] == [str(n) for n in range(20, 30)]


def test_close_is_prompt_and_idempotent(server: Rsyslogd, sinks: list[SyslogSink]) -> None:
    sink = make(sinks, keys_for(server, "tls"))
    sink.write(sink.encode(events(1)))
    started = time.monotonic()
    sink.close()
    sink.close()
    assert time.monotonic() - started < 2.0
    assert len(server.wait_for(APP, 1)) == 1


def test_an_encrypted_client_key_is_refused_without_a_prompt(server: Rsyslogd,
                                                             sinks: list[SyslogSink]) -> None:
    encrypted = server.file("client-encrypted.key")
    subprocess.run(["openssl", "ec", "-in", server.file("client.key"), "-aes128", "-passout",
                    "pass:secret", "-out", encrypted], check=True, capture_output=True,
                   timeout=60)
    keys = {**keys_for(server, "mtls"), "key_file": encrypted}
    with pytest.raises(ConfigError, match=r"\.key_file: the private key is encrypted"):
        make(sinks, keys)

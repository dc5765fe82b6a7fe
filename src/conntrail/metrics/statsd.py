"""Pushes the daemon's samples to statsd over UDP: counters as deltas, gauges as values.

Statsd has no labels: by default label values become name segments
(`conntrail.sink_written_total.db`); with `tags=True` they are DogStatsD tags
(`|#sink:db`). Several lines share a datagram, up to 1432 bytes: the size etsy's statsd
documents for fast ethernet, so a datagram is never fragmented on a 1500-byte MTU path.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from conntrail.errors import ConfigError, ConntrailError
from conntrail.metrics.exposition import format_value
from conntrail.metrics.model import Collector, Sample

log = logging.getLogger(__name__)

MAX_DATAGRAM = 1432
_UNSAFE_SEGMENT = re.compile(r"[^A-Za-z0-9_-]")
_UNSAFE_TAG = re.compile(r"[^A-Za-z0-9_./:-]")
_PREFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\Z")
_STOP_TIMEOUT_S = 5.0

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True, slots=True)
class Line:
    """One statsd line (two for a negative gauge) and the counter value it reports."""

    text: bytes
    series: SeriesKey | None = None  # a counter's baseline, advanced once the line is sent
    value: float = 0.0


def parse_prefix(text: str, key: str) -> str:
    """A metric prefix: dot-separated words of letters, digits, "_" and "-" (or empty)."""
    if text and not _PREFIX.match(text):
        raise ConfigError(key, f"{text!r} is not a statsd prefix; use words of letters, "
                               "digits, '_' or '-' joined by dots, e.g. \"gw1.conntrail\"")
    return text


def metric_path(sample: Sample, prefix: str, tags: bool) -> str:
    """The statsd name: prefix, the name (without a repeated prefix word), label values."""
    name = _segment(sample.name)  # ':' would end a statsd name
    head = prefix.rpartition(".")[2]
    if head and name.startswith(head + "_"):
        name = name[len(head) + 1:]  # "conntrail.events_total", not "conntrail.conntrail_…"
    parts = [prefix] if prefix else []
    parts.append(name)
    if not tags:
        parts.extend(_segment(value) for _, value in sample.labels)
    return ".".join(parts)


def sample_line(sample: Sample, value: float, prefix: str, tags: bool) -> bytes:
    """`path:VALUE|c` or `|g` (with `|#k:v,…` tags); a negative gauge is reset to 0 first."""
    path = metric_path(sample, prefix, tags)
    suffix = _tags(sample.labels) if tags else ""
    kind = "c" if sample.kind == "counter" else "g"
    line = f"{path}:{format_value(value)}|{kind}{suffix}"
    if kind == "g" and value < 0:
        # A signed gauge value means "change by" in statsd; setting -5 takes 0 then -5.
        line = f"{path}:0|g{suffix}\n{line}"
    return line.encode()


def pack(lines: Iterable[Line], limit: int = MAX_DATAGRAM) -> list[list[Line]]:
    """Group lines into datagrams of at most `limit` bytes (a longer line goes alone)."""
    datagrams: list[list[Line]] = []
    size = limit + 1
    for line in lines:
        grown = size + 1 + len(line.text)
        if grown > limit:
            datagrams.append([line])
            size = len(line.text)
        else:
            datagrams[-1].append(line)
            size = grown
    return datagrams


def _segment(text: str) -> str:
    return _UNSAFE_SEGMENT.sub("_", text) or "_"


def _tags(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    pairs = (f"{_UNSAFE_TAG.sub('_', k.replace(':', '_'))}:{_UNSAFE_TAG.sub('_', v)}"
             for k, v in labels)
    return "|#" + ",".join(pairs)


class StatsdPusher:
    """Every `interval_s`, sends the collector's samples to a statsd server (a daemon thread).

    Counters go as the change since the last push (a counter that went backwards, after a
    reload reset it, sends its new value); a counter's baseline only advances when its
    datagram was sent, so a failed send is carried by the next push. Send errors are counted
    and logged, never raised. `stop()` pushes once more so the last changes are not lost.
    """

    def __init__(self, address: tuple[str, int], collector: Collector,
                 prefix: str = "conntrail", interval_s: float = 10.0,
                 tags: bool = False) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, not {interval_s}")
        self.address = address
        self.prefix = parse_prefix(prefix, "prefix")
        self.interval_s = interval_s
        self.tags = tags
        self._collector = collector
        self._baselines: dict[SeriesKey, float] = {}
        self._counts = {"pushes": 0, "datagrams": 0, "send_errors": 0, "collect_errors": 0}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sock: socket.socket | None = None
        self._sockaddr: tuple[Any, ...] | None = None
        self._thread: threading.Thread | None = None
        self._failing = False
        self._send_failing = False

    def start(self) -> None:
        """Resolve the address, open the UDP socket and start pushing."""
        if self._sock is not None:
            return
        self._open()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="conntrail-statsd", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (bounded), push a last time, close the socket (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping.set()
            thread.join(_STOP_TIMEOUT_S)
        if self._sock is not None:
            self.push_now()
            with self._lock:
                self._sock.close()
                self._sock = None

    def stats(self) -> dict[str, int]:
        """Counters: pushes, datagrams sent, send_errors, collect_errors."""
        with self._lock:
            return dict(self._counts)

    def push_now(self) -> int:
        """Collect and send now; the number of datagrams sent."""
        with self._lock:
            if self._sock is None:
                raise RuntimeError("statsd pusher is not started")
            lines = self._collect()
            if lines is None:
                return 0
            self._counts["pushes"] += 1
            return sum(self._send(datagram) for datagram in pack(lines))

    def _open(self) -> None:
        host, port = self.address
        try:
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                host, port, type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise ConntrailError(f"statsd: cannot send to {host}:{port}: "
                                 f"{exc.strerror or exc}") from exc
        sock.setblocking(False)  # a full send buffer is a counted error, never a stall
        self._sock, self._sockaddr = sock, sockaddr

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            try:
                self.push_now()
            except Exception:
                # A bug here must not end the pushes for the rest of the daemon's life.
                log.exception("statsd: push failed")

    def _collect(self) -> list[Line] | None:
        try:
            samples = list(self._collector())
        except Exception:
            # Any collector bug costs one push; the traceback once per failing streak.
            self._counts["collect_errors"] += 1
            level = logging.DEBUG if self._failing else logging.ERROR
            log.log(level, "statsd: collecting samples failed", exc_info=True)
            self._failing = True
            return None
        self._failing = False
        return [line for sample in samples if (line := self._line(sample)) is not None]

    def _line(self, sample: Sample) -> Line | None:
        value = float(sample.value)
        if not math.isfinite(value):
            return None  # statsd has no NaN or infinity
        if sample.kind != "counter":
            return Line(sample_line(sample, value, self.prefix, self.tags))
        series = (sample.name, sample.labels)
        before = self._baselines.get(series, 0.0)
        delta = value - before if value >= before else value
        if delta == 0:
            return None
        return Line(sample_line(sample, delta, self.prefix, self.tags), series, value)

    def _send(self, datagram: list[Line]) -> int:
        assert self._sock is not None and self._sockaddr is not None
        try:
            self._sock.sendto(b"\n".join(line.text for line in datagram), self._sockaddr)
        except OSError as exc:
            self._counts["send_errors"] += 1
            # Warn once per failing streak: an unreachable statsd would warn every push.
            level = logging.DEBUG if self._send_failing else logging.WARNING
            log.log(level, "statsd: sending to %s:%s failed: %s", *self.address, exc)
            self._send_failing = True
            return 0
        self._send_failing = False
        for line in datagram:
            if line.series is not None:
                self._baselines[line.series] = line.value
        self._counts["datagrams"] += 1
        return 1

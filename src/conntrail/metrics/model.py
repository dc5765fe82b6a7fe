"""The one value metrics exporters share: a named, labelled number read from the daemon."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge"]


@dataclass(frozen=True, slots=True)
class Sample:
    """One time series' current value; `name` is Prometheus-safe (`conntrail_..._total`)."""

    name: str
    kind: Kind
    help: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


Collector = Callable[[], Iterable[Sample]]
"""Reads the daemon's counters now; called on every scrape or push, from the exporter's thread."""

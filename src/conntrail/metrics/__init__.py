"""Metrics: the daemon's counters as Prometheus text (a scrape endpoint) or statsd datagrams."""

from conntrail.metrics.model import Collector, Sample

__all__ = ["Collector", "Sample"]

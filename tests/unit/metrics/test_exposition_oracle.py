"""render() read back by prometheus_client's own text parser (the reference oracle)."""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

from conntrail.metrics.exposition import render
from conntrail.metrics.model import Sample

AWKWARD = ['plain', 'back\\slash', 'quo"te', 'new\nline', 'all \\ " \n at once', '', 'ünï']


Parsed = dict[str, tuple[str, str, list[tuple[dict[str, str], float]]]]


def _parsed(samples: list[Sample]) -> Parsed:
    """Family name → (type, help, [(labels, value)]) as the reference parser reads them."""
    page = render(samples).decode()
    return {family.name: (family.type, family.documentation,
                          [(dict(s.labels), s.value) for s in family.samples])
            for family in text_string_to_metric_families(page)}


def test_awkward_label_values_survive_the_reference_parser() -> None:
    samples = [Sample("conntrail_odd", "gauge", "odd", n, (("v", text),))
               for n, text in enumerate(AWKWARD)]
    families = _parsed(samples)
    assert [labels["v"] for labels, _ in families["conntrail_odd"][2]] == AWKWARD


def test_help_types_and_values_survive_the_reference_parser() -> None:
    samples = [Sample("conntrail_events_received_total", "counter", 'got "it"\\ \nok', 2 ** 40),
               Sample("conntrail_queue_depth", "gauge", "depth", 0.25, (("sink", "db"),)),
               Sample("conntrail_lag_seconds", "gauge", "lag", math.inf)]
    families = _parsed(samples)
    # The client strips the _total suffix from counter family names.
    assert families["conntrail_events_received"] == (
        "counter", 'got "it"\\ \nok', [({}, float(2 ** 40))])
    assert families["conntrail_queue_depth"] == ("gauge", "depth", [({"sink": "db"}, 0.25)])
    assert families["conntrail_lag_seconds"][2] == [({}, math.inf)]


def test_nan_survives_the_reference_parser() -> None:
    families = _parsed([Sample("g", "gauge", "h", math.nan)])
    assert math.isnan(families["g"][2][0][1])

"""render(): the Prometheus 0.0.4 text (golden page, escaping, families, values, bad names)."""

from __future__ import annotations

import math

import pytest

from conntrail.metrics.exposition import CONTENT_TYPE, format_value, render
from conntrail.metrics.model import Sample

RECEIVED = "conntrail_events_received_total"
WRITTEN = "conntrail_sink_written_total"
DEPTH = "conntrail_queue_depth"


def _counter(name: str, value: float, **labels: str) -> Sample:
    return Sample(name, "counter", f"help of {name}", value, tuple(labels.items()))


def _gauge(name: str, value: float, **labels: str) -> Sample:
    return Sample(name, "gauge", f"help of {name}", value, tuple(labels.items()))


GOLDEN = """\
# HELP conntrail_events_received_total help of conntrail_events_received_total
# TYPE conntrail_events_received_total counter
conntrail_events_received_total 1234
# HELP conntrail_sink_written_total help of conntrail_sink_written_total
# TYPE conntrail_sink_written_total counter
conntrail_sink_written_total{pipeline="main",sink="db"} 10
conntrail_sink_written_total{pipeline="main",sink="log"} 12
# HELP conntrail_queue_depth help of conntrail_queue_depth
# TYPE conntrail_queue_depth gauge
conntrail_queue_depth{sink="db"} 0.5
conntrail_queue_depth{sink="log"} 3
"""


def test_golden_page_groups_families_in_first_seen_order() -> None:
    samples = [_counter(RECEIVED, 1234),
               _counter(WRITTEN, 10, pipeline="main", sink="db"),
               _gauge(DEPTH, 0.5, sink="db"),
               _counter(WRITTEN, 12, pipeline="main", sink="log"),  # interleaved: joins its family
               _gauge(DEPTH, 3.0, sink="log")]
    assert render(samples).decode() == GOLDEN


def test_one_help_and_type_per_family() -> None:
    page = render(_counter(WRITTEN, n, sink=str(n)) for n in range(5)).decode()
    assert page.count("# HELP ") == 1 and page.count("# TYPE ") == 1
    assert page.count("\n") == 7


def test_first_samples_help_names_the_family() -> None:
    samples = [Sample("a", "gauge", "first", 1, (("x", "1"),)),
               Sample("a", "gauge", "second", 2, (("x", "2"),))]
    assert render(samples).decode().splitlines()[0] == "# HELP a first"


def test_nothing_renders_an_empty_page() -> None:
    assert render([]) == b""


def test_label_values_are_escaped() -> None:
    page = render([_gauge("g", 1, path='C:\\dir "x"\nnext')]).decode()
    assert page.splitlines()[-1] == 'g{path="C:\\\\dir \\"x\\"\\nnext"} 1'


def test_help_escapes_backslash_and_newline_but_not_quotes() -> None:
    page = render([Sample("g", "gauge", 'a "b" \\ c\nd', 1)]).decode()
    assert page.splitlines()[0] == '# HELP g a "b" \\\\ c\\nd'


def test_non_ascii_label_values_are_utf8() -> None:
    assert "é".encode() in render([_gauge("g", 1, host="café")])


def test_content_type_is_text_format_0_0_4() -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


@pytest.mark.parametrize(("value", "text"), [
    (0, "0"), (7, "7"), (7.0, "7"), (-3.0, "-3"), (2.5, "2.5"), (0.1, "0.1"),
    (1e20, "1e+20"), (1e-7, "1e-07"), (2 ** 60, "1152921504606846976"), (True, "1"),
    (math.inf, "+Inf"), (-math.inf, "-Inf"), (math.nan, "NaN"), (-0.0, "0"),
])
def test_values_are_written_like_prometheus(value: float, text: str) -> None:
    assert format_value(value) == text


@pytest.mark.parametrize("name", ["", "1events", "events-total", "events total", "événements",
                                  "a\nb", "a{b}"])
def test_invalid_metric_name_is_a_programming_error(name: str) -> None:
    with pytest.raises(ValueError, match="invalid metric name"):
        render([_gauge(name, 1)])


@pytest.mark.parametrize("name", ["colon:ok", "_under", "a1_B2"])
def test_valid_unusual_metric_names(name: str) -> None:
    assert render([_gauge(name, 1)]).startswith(f"# HELP {name} ".encode())


@pytest.mark.parametrize("label", ["", "1st", "sink-name", "__reserved", "a:b", "é"])
def test_invalid_label_name_is_a_programming_error(label: str) -> None:
    with pytest.raises(ValueError, match="invalid label name"):
        render([Sample("g", "gauge", "h", 1, ((label, "v"),))])


def test_repeated_label_name_is_refused() -> None:
    with pytest.raises(ValueError, match="repeats"):
        render([Sample("g", "gauge", "h", 1, (("a", "1"), ("a", "2")))])


def test_a_family_with_two_kinds_is_refused() -> None:
    with pytest.raises(ValueError, match="both counter and gauge"):
        render([_counter("m", 1, a="1"), _gauge("m", 1, a="2")])


def test_the_same_series_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="given twice"):
        render([_counter("m", 1, a="1"), _counter("m", 2, a="1")])


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        render([Sample("m", "histogram", "h", 1)])  # type: ignore[arg-type]

"""Prometheus text exposition format 0.0.4: samples in, bytes out (pure, no I/O).

Format reference: https://prometheus.io/docs/instrumenting/exposition_formats/ — one
`# HELP` and one `# TYPE` line per family, then its samples; label values escape `\\`, `"`
and newline; HELP text escapes `\\` and newline.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from conntrail.metrics.model import Sample

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_KINDS = ("counter", "gauge")
_LABEL_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})
_HELP_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n"})
# Beyond 2**53 a float no longer holds every integer; print those the way floats print.
_EXACT_INT = 2.0 ** 53


def render(samples: Iterable[Sample]) -> bytes:
    """The samples as a Prometheus text page, one block per family in first-seen order.

    Raises ValueError for an invalid metric or label name, an unknown kind, a family whose
    samples disagree on the kind, or the same series twice: all programming errors.
    """
    families: dict[str, list[Sample]] = {}
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for sample in samples:
        members = families.setdefault(sample.name, [])
        _check(sample, members[0] if members else None)
        series = (sample.name, sample.labels)
        if series in seen:
            raise ValueError(f"metric {sample.name}: series {sample.labels!r} given twice")
        seen.add(series)
        members.append(sample)
    return "".join(_family(members) for members in families.values()).encode()


def format_value(value: float) -> str:
    """A number as Prometheus writes it: integers without ".0", then +Inf, -Inf, NaN."""
    if isinstance(value, int):
        return str(int(value))  # int() turns a bool into 1/0 rather than "True"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < _EXACT_INT:
        return str(int(value))
    return repr(float(value))


def escape_label_value(text: str) -> str:
    """A label value inside its double quotes."""
    return text.translate(_LABEL_ESCAPES)


def escape_help(text: str) -> str:
    """HELP text (quotes stay as they are in HELP lines)."""
    return text.translate(_HELP_ESCAPES)


def check_metric_name(name: str) -> None:
    """Raise ValueError unless `name` is a valid Prometheus metric name."""
    if not _METRIC_NAME.match(name):
        raise ValueError(f"invalid metric name {name!r}")


def _check(sample: Sample, first: Sample | None) -> None:
    check_metric_name(sample.name)
    if sample.kind not in _KINDS:
        raise ValueError(f"metric {sample.name}: unknown kind {sample.kind!r}")
    if first is not None and first.kind != sample.kind:
        raise ValueError(f"metric {sample.name}: both {first.kind} and {sample.kind}")
    names = [name for name, _ in sample.labels]
    for name in names:
        # Names starting with "__" are reserved for Prometheus itself.
        if not _LABEL_NAME.match(name) or name.startswith("__"):
            raise ValueError(f"metric {sample.name}: invalid label name {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"metric {sample.name}: a label name repeats in {names}")


def _family(members: list[Sample]) -> str:
    first = members[0]
    head = [f"# HELP {first.name} {escape_help(first.help)}\n",
            f"# TYPE {first.name} {first.kind}\n"]
    return "".join(head + [_sample_line(sample) for sample in members])


def _sample_line(sample: Sample) -> str:
    if not sample.labels:
        return f"{sample.name} {format_value(sample.value)}\n"
    labels = ",".join(f'{name}="{escape_label_value(value)}"' for name, value in sample.labels)
    return f"{sample.name}{{{labels}}} {format_value(sample.value)}\n"

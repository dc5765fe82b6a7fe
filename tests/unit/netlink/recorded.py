"""Shared by the codec tests: reading recorded kernel replies, and bounded Hypothesis runs."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, settings

from conntrail.recording import parse_lines

DATA_ROOT = Path(__file__).resolve().parents[2] / "data"


def datagrams(folder: Path, name: str) -> list[bytes]:
    """The datagrams of the recording `folder/name.hex`, in order."""
    with (folder / f"{name}.hex").open(encoding="ascii") as handle:
        return [item.data for item in parse_lines(handle)]


def ci(max_examples: int) -> settings:
    """Settings for a CI run: bounded examples, no per-example deadline (busy machines)."""
    return settings(max_examples=max_examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

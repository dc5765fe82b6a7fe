"""Times, endpoints and the output of `who`/`query`: parsing, errors, rendering."""

from __future__ import annotations

import pytest

from conntrail.cli.timeargs import parse_duration, parse_endpoint, parse_time
from conntrail.errors import ConfigError
from conntrail.formats import history as fmt
from conntrail.history.rows import ClosedBy, FlowRow
from conntrail.history.store import WhoMatch

S = 1_000_000_000


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-17T14:02:00Z", 1_794_924_120 * S),
    ("2026-11-17T15:02:00+01:00", 1_794_924_120 * S),
    ("2026-11-17T14:02:00.250z", 1_794_924_120 * S + 250_000_000),
    ("1794924120", 1_794_924_120 * S),
    ("1794924120.000000001", 1_794_924_120 * S + 1),
])
def test_times(text: str, expected: int) -> None:
    assert parse_time(text, "--at") == expected


@pytest.mark.parametrize(("text", "message"), [
    ("2026-11-17T14:02:00", "has no zone"),
    ("last tuesday", "not a time"),
    ("", "not a time"),
])
def test_bad_times_name_the_option(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_time(text, "--at")
    assert str(info.value).startswith("--at: ")


def test_durations() -> None:
    assert parse_duration("30s", "-") == 30 * S
    assert parse_duration("2h", "-") == 7200 * S
    assert parse_duration("250ms", "-") == 250_000_000
    with pytest.raises(ConfigError, match="not a duration"):
        parse_duration("soon", "--window")


@pytest.mark.parametrize(("text", "expected"), [
    ("198.51.100.7:53500", ("198.51.100.7", 53500)),
    ("[2001:db8::1]:443", ("2001:db8::1", 443)),
    ("2001:db8::1", ("2001:db8::1", None)),
    ("198.51.100.7", ("198.51.100.7", None)),
])
def test_endpoints(text: str, expected: tuple[str, int | None]) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize("text", ["host:80", "198.51.100.7:99999", "[2001:db8::1]443"])
def test_bad_endpoints(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_endpoint(text)


ROW = FlowRow(1_794_924_120 * S, 1_794_924_150 * S, ClosedBy.DESTROY, "gw", 7, 2, 6,
              "198.18.1.2", "198.18.2.2", 40000, 80, "198.18.2.2", "198.18.2.1", 80, 50000,
              None, None, None, 1, 0x19e, 7, 0, None, None, 3, 200, 2, 100, uid=1000)


def test_who_line_says_who_where_and_when() -> None:
    line = fmt.who_line(WhoMatch("snat", ROW))
    assert line.startswith("snat   inside 198.18.1.2:40000  as 198.18.2.1:50000  to "
                           "198.18.2.2:80  tcp  2026-11-17T14:02:00.000000Z .. "
                           "2026-11-17T14:02:30.000000Z  (30.0s)  300 bytes  netns gw")
    assert line.endswith("uid=1000")


def test_vanished_end_is_shown_as_a_bound() -> None:
    assert fmt.end_text(ROW._replace(closed_by=ClosedBy.VANISHED)).startswith("<=")
    assert fmt.end_text(ROW._replace(end_ns=None)) == "open"


def test_documents_and_csv_name_things() -> None:
    doc = fmt.row_document(ROW)
    assert (doc["nat"], doc["proto"], doc["state"], doc["closed_by"], doc["bytes"]) == (
        "snat", "tcp", "TIME_WAIT", "destroy", 300)
    header, line = "".join(fmt.csv_lines([ROW])).splitlines()
    assert header.startswith("start,end,start_ns,end_ns,closed_by")
    assert line.startswith("2026-11-17T14:02:00.000000Z,2026-11-17T14:02:30.000000Z,")
    table = list(fmt.table_lines([ROW]))
    assert table[0].startswith("START (UTC)") and "snat->198.18.2.1:50000" in table[1]

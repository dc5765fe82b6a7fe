"""Golden corpus: real kernel recordings decode to exactly the committed JSON lines.

The recordings are made by tests/corpus/make_corpus.py on a real kernel. After a deliberate
decoder or layout change, rewrite the goldens with
`python3 -m pytest tests/unit/netlink/test_golden.py --regen-golden` and review the diff.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import pytest
from tests.unit.netlink.corpus import (
    CORPUS_DIR,
    corpus_events,
    datagrams,
    golden_path,
    header,
    hex_files,
    render,
)

from conntrail.model import AF_INET, AF_INET6, CtStatus, EventKind, FlowEvent

RECORDINGS = hex_files()
STANDARD_HEADER_LINES = 2  # "recorded by … on Linux …" and "netns: …; events: …; dump: …"


@pytest.fixture
def regen_golden(request: pytest.FixtureRequest) -> bool:
    """True when run with --regen-golden (tests/conftest.py)."""
    return bool(request.config.getoption("--regen-golden"))


def _diff(expected: list[str], actual: list[str], name: str) -> str:
    """A unified diff of pretty-printed events, with the first differing line and keys."""
    def pretty(lines: list[str]) -> list[str]:
        out = []
        for number, line in enumerate(lines, start=1):
            out.append(f"--- event {number}")
            out.extend(json.dumps(json.loads(line), indent=1, sort_keys=True).splitlines())
        return out

    first = next((i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b),
                 min(len(expected), len(actual)))
    summary = f"{name}: {len(expected)} golden events, {len(actual)} decoded; "
    if first < min(len(expected), len(actual)):
        golden_doc, decoded_doc = json.loads(expected[first]), json.loads(actual[first])
        keys = sorted(key for key in set(golden_doc) | set(decoded_doc)
                      if golden_doc.get(key) != decoded_doc.get(key))
        summary += f"first difference at event {first + 1} in {keys}"
    else:
        summary += f"the shorter list ends at event {first + 1}"
    diff = difflib.unified_diff(pretty(expected), pretty(actual), f"{name}.json (golden)",
                                f"{name}.hex (decoded now)", lineterm="", n=4)
    return summary + "\n" + "\n".join(diff)


def test_corpus_is_present() -> None:
    assert RECORDINGS, f"no recordings in {CORPUS_DIR}: run tests/corpus/make_corpus.py as root"


@pytest.mark.parametrize("recording", RECORDINGS, ids=[path.stem for path in RECORDINGS])
def test_recording_matches_golden(recording: Path, regen_golden: bool) -> None:
    actual = render(recording)
    golden = golden_path(recording)
    if regen_golden:
        golden.write_text("".join(line + "\n" for line in actual), encoding="utf-8")
    assert golden.exists(), f"{golden.name} missing: run with --regen-golden to create it"
    expected = golden.read_text(encoding="utf-8").splitlines()
    if expected != actual:
        pytest.fail(_diff(expected, actual, recording.stem), pytrace=False)


def test_every_golden_has_its_recording() -> None:
    orphans = [path.name for path in CORPUS_DIR.glob("*.json")
               if not path.with_suffix(".hex").exists()]
    assert not orphans, f"golden files without a recording: {orphans}"


@pytest.mark.parametrize("recording", RECORDINGS, ids=[path.stem for path in RECORDINGS])
def test_recording_says_how_it_was_made(recording: Path) -> None:
    lines = header(recording)
    assert lines[0].startswith("recorded by conntrail record on Linux"), lines[:1]
    assert len(lines) > STANDARD_HEADER_LINES, "the header must say what traffic made it"
    assert datagrams(recording), "a recording without datagrams"


# --- coverage: a regenerated corpus that silently lost a case fails here ---------------------

def _events() -> tuple[FlowEvent, ...]:
    return corpus_events().events


def test_corpus_covers_every_protocol_and_family() -> None:
    protos = {event.flow.orig.proto for event in _events()}
    assert protos >= {6, 17, 136, 132, 1, 58, 47, 33}, f"protocols seen: {sorted(protos)}"
    for proto in (6, 17, 136, 132, 47, 33):
        families = {e.flow.orig.family for e in _events() if e.flow.orig.proto == proto}
        assert families == {AF_INET, AF_INET6}, f"protocol {proto}: families {families}"
    assert {e.flow.orig.family for e in _events() if e.flow.orig.proto == 1} == {AF_INET}
    assert {e.flow.orig.family for e in _events() if e.flow.orig.proto == 58} == {AF_INET6}


def test_corpus_covers_every_event_kind() -> None:
    kinds = {event.kind for event in _events()}
    assert kinds == set(EventKind), f"kinds seen: {sorted(kinds)}"
    for proto in (6, 17, 136, 132, 1, 58, 47, 33):
        proto_kinds = {e.kind for e in _events() if e.flow.orig.proto == proto}
        assert proto_kinds >= {EventKind.NEW, EventKind.UPDATE, EventKind.DESTROY}, \
            f"protocol {proto}: kinds {proto_kinds}"


def test_corpus_covers_dump_end_and_error() -> None:
    controls = corpus_events().controls
    assert any(control.kind == "done" for control in controls), "no NLMSG_DONE"
    dumps = [e for e in _events() if e.kind is EventKind.DUMP]
    assert len(dumps) >= 3


def test_corpus_covers_nat() -> None:
    status = [event.flow.status for event in _events()]
    assert any(CtStatus.SRC_NAT in s and CtStatus.DST_NAT not in s for s in status)
    assert any(CtStatus.DST_NAT in s and CtStatus.SRC_NAT not in s for s in status)
    for family in (AF_INET, AF_INET6):
        snat = [e.flow for e in _events()
                if e.flow.orig.family == family and e.flow.nat_type == "snat"]
        dnat = [e.flow for e in _events()
                if e.flow.orig.family == family and e.flow.nat_type == "dnat"]
        assert {f.orig.proto for f in snat} >= {6, 17}, f"family {family}: SNAT protocols"
        assert {f.orig.proto for f in dnat} >= {6, 17}, f"family {family}: DNAT protocols"
        assert all(f.reply is not None and f.reply.dst != f.orig.src for f in snat)
        assert all(f.reply is not None and f.reply.src != f.orig.dst for f in dnat)


def test_corpus_destroys_carry_counters_and_timestamps() -> None:
    destroys = [e.flow for e in _events() if e.kind is EventKind.DESTROY]
    assert destroys
    complete = [f for f in destroys if f.counters_orig is not None
                and f.counters_reply is not None and f.start_ns and f.stop_ns]
    assert complete == destroys, "a DESTROY without counters or start/stop timestamps"
    assert all(f.duration_ns is not None and f.duration_ns >= 0 for f in complete)
    assert any(f.counters_orig is not None and f.counters_orig.bytes > 0 for f in complete)


def test_corpus_covers_mark_zone_labels() -> None:
    flows = [event.flow for event in _events()]
    assert any(f.mark for f in flows), "no CTA_MARK"
    assert any(f.zone for f in flows), "no CTA_ZONE"
    assert any(f.labels for f in flows), "no CTA_LABELS"
    assert any(f.orig.zone for f in flows), "no CTA_TUPLE_ZONE"


def test_corpus_covers_protocol_states_and_ports() -> None:
    flows = [event.flow for event in _events()]
    tcp_states = {f.state_name for f in flows if f.orig.proto == 6}
    assert tcp_states >= {"SYN_SENT", "SYN_RECV", "ESTABLISHED", "TIME_WAIT"}, tcp_states
    sctp = [f for f in flows if f.orig.proto == 132]
    assert all(f.orig.sport is not None and f.orig.dport is not None for f in sctp)
    assert {f.state_name for f in sctp} >= {"COOKIE_WAIT", "ESTABLISHED"}
    dccp = [f for f in flows if f.orig.proto == 33]
    assert all(f.orig.sport is None for f in dccp), "this kernel tracks DCCP generically"
    gre = [f for f in flows if f.orig.proto == 47]
    assert any(f.orig.dport for f in gre), "no GRE key"
    icmp = [f for f in flows if f.orig.proto in (1, 58)]
    assert all(f.orig.icmp_type is not None and f.orig.icmp_id is not None for f in icmp)

"""The golden corpus (tests/data/conntrack/): recordings, their messages, their renderings.

Each `<case>.hex` is a `conntrail record` recording made on a real kernel by
tests/corpus/make_corpus.py; `<case>.json` is its `--layout record` decoding, the golden.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import orjson

from conntrail.formats.jsonl import record_document
from conntrail.model import FlowEvent
from conntrail.netlink.conntrack import Control, decode_datagram
from conntrail.netlink.wire import align4, split_messages
from conntrail.recording import RecordedDatagram, parse_lines

CORPUS_DIR = Path(__file__).resolve().parents[2] / "data" / "conntrack"


def hex_files() -> list[Path]:
    """Every recording of the corpus, sorted by name."""
    return sorted(CORPUS_DIR.glob("*.hex"))


def golden_path(recording: Path) -> Path:
    """The golden .json beside a .hex."""
    return recording.with_suffix(".json")


def header(recording: Path) -> list[str]:
    """The recording's '#' comment lines, without the '# '."""
    lines = recording.read_text(encoding="ascii").splitlines()
    return [line[1:].strip() for line in lines if line.startswith("#")]


@functools.cache
def datagrams(recording: Path) -> tuple[RecordedDatagram, ...]:
    """The datagrams of one recording (DecodeError names the bad line)."""
    with recording.open(encoding="ascii") as handle:
        return tuple(parse_lines(handle))


def decode_recording(recording: Path) -> list[FlowEvent | Control]:
    """Every decoded item of a recording, in order (netns '' as `conntrail decode`)."""
    out: list[FlowEvent | Control] = []
    for item in datagrams(recording):
        out.extend(decode_datagram(item.data, "", item.received_ns))
    return out


def render(recording: Path) -> list[str]:
    """The golden lines of a recording: record_document of each event, as `conntrail decode
    --layout record` writes them (orjson, one object per line)."""
    return [orjson.dumps(record_document(item)).decode()
            for item in decode_recording(recording) if isinstance(item, FlowEvent)]


@functools.cache
def all_messages() -> tuple[bytes, ...]:
    """Every netlink message of the corpus on its own, padded to netlink alignment."""
    out: list[bytes] = []
    for recording in hex_files():
        for item in datagrams(recording):
            for header_ in split_messages(item.data):
                raw = item.data[header_.start - 16:header_.end]
                out.append(raw + b"\0" * (align4(len(raw)) - len(raw)))
    return tuple(out)


@functools.cache
def all_datagrams() -> tuple[bytes, ...]:
    """Every datagram of the corpus, as received."""
    return tuple(item.data for recording in hex_files() for item in datagrams(recording))


@dataclass(frozen=True)
class CorpusEvents:
    """Every flow event and control message of the whole corpus."""

    events: tuple[FlowEvent, ...]
    controls: tuple[Control, ...]


@functools.cache
def corpus_events() -> CorpusEvents:
    """Decode the whole corpus once."""
    events: list[FlowEvent] = []
    controls: list[Control] = []
    for recording in hex_files():
        for item in decode_recording(recording):
            if isinstance(item, FlowEvent):
                events.append(item)
            else:
                controls.append(item)
    return CorpusEvents(tuple(events), tuple(controls))

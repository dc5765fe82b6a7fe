"""The conntrack source keeps the good messages of a datagram that also holds a bad one."""

from __future__ import annotations

import struct

from tests.unit.netlink.corpus import hex_files

from conntrail.kernel.netns import NetnsRef
from conntrail.model import FlowEvent
from conntrail.recording import parse_lines
from conntrail.sources.conntrack import ConntrackSource


def _good_message() -> bytes:
    path = next(p for p in hex_files() if p.name == "udp_ipv4.hex")
    with path.open() as handle:
        return next(iter(parse_lines(handle))).data


def test_bad_message_between_good_ones() -> None:
    good = _good_message()
    # Valid framing (nlmsghdr says 28 bytes), but an attribute claims 200 bytes.
    bad = struct.pack("=IHHII", 28, 0x100, 0, 0, 0) + b"\x02\x00\x00\x00" \
        + struct.pack("=HH", 200, 1) + b"\0" * 4
    source = ConntrackSource(NetnsRef("", None))
    decoded = source._decode(good + bad + good, 1)
    assert [type(item) for item in decoded] == [FlowEvent, FlowEvent]
    assert source.counters.decode_errors == 1


def test_broken_framing_keeps_nothing() -> None:
    source = ConntrackSource(NetnsRef("", None))
    assert source._decode(_good_message() + b"\x01\x02", 1) == []
    assert source.counters.decode_errors == 1

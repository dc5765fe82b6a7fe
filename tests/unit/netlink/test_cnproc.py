"""Proc connector codec: recorded kernel events, hand-built bad input, and properties.

tests/data/cnproc/*.hex are real datagrams recorded on kernel 6.18 by a listener subscribed
with `encode_subscribe` (their headers say which processes ran); the recorder's pid was 32722.
"""

from __future__ import annotations

import functools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.unit.netlink.recorded import DATA_ROOT, ci, datagrams

from conntrail.errors import DecodeError
from conntrail.netlink.cnproc import (
    CN_IDX_PROC,
    CN_MSG,
    CN_VAL_PROC,
    PROC_EVENT_HEADER,
    PROC_INPUT,
    AckEvent,
    CommEvent,
    CoredumpEvent,
    ExecEvent,
    ExitEvent,
    ForkEvent,
    IdEvent,
    McastOp,
    ProcEvent,
    ProcEventType,
    PtraceEvent,
    SidEvent,
    UnknownEvent,
    decode_events,
    encode_subscribe,
)
from conntrail.netlink.wire import NLMSG_DONE, NLMSG_NOOP, NLMSGHDR, pack_message, split_messages

DATA = DATA_ROOT / "cnproc"
recording = functools.partial(datagrams, DATA)  # a recording's datagrams, by name
HEADER = NLMSGHDR.size  # 16
EVENT = HEADER + CN_MSG.size  # the proc_event of a one-message datagram starts at 36
UNION = EVENT + PROC_EVENT_HEADER.size  # and its union at 52
RECORDINGS = sorted(path.stem for path in DATA.glob("*.hex"))
R = 32722  # the recorder




def fork(seq: int, ts: int, child: int, tgid: int | None = None) -> ForkEvent:
    return ForkEvent(seq, 1, ts, R, R, child, child if tgid is None else tgid)


def exited(seq: int, ts: int, pid: int, code: int = 0, cpu: int = 1) -> ExitEvent:
    return ExitEvent(seq, cpu, ts, pid, pid, code, 17, R, R)


EXPECTED: dict[str, list[ProcEvent]] = {
    "ack": [AckEvent(3549, 1, 14346198657028, 0x1000 + 1, 0)],
    "fork_exec_exit": [
        fork(3550, 14346699482898, 32723),
        ExecEvent(3551, 1, 14346699705088, 32723, 32723),
        exited(3552, 14346699981398, 32723),
    ],
    "exit_status": [  # exit_code is the wait status: exit(3) → 3 << 8
        fork(3553, 14347100798484, 32724),
        ExecEvent(3554, 1, 14347101027954, 32724, 32724),
        exited(3555, 14347101397404, 32724, 3 << 8),
    ],
    "thread": [  # a thread's fork names the process's parent; its exit_signal is -1
        fork(3556, 14347502163090, 32725),
        ExecEvent(3557, 1, 14347502395670, 32725, 32725),
        fork(3558, 14347509292180, 32726, 32725),
        ExitEvent(3559, 1, 14347509371590, 32726, 32725, 0, -1, 0, 0),
        exited(3603, 14347511140770, 32725, cpu=0),
    ],
    "uid_gid": [
        fork(3560, 14347912056926, 32727),
        ExecEvent(3561, 1, 14347912484726, 32727, 32727),
        IdEvent(3562, 1, 14347913434846, 32727, 32727, False, 4242, 4242),
        IdEvent(3563, 1, 14347913438936, 32727, 32727, True, 4343, 4343),
        ExecEvent(3564, 1, 14347913557836, 32727, 32727),
        exited(3565, 14347913744686, 32727),
    ],
    "sid_comm": [
        fork(3566, 14348314558672, 32728),
        ExecEvent(3567, 1, 14348314796722, 32728, 32728),
        SidEvent(3568, 1, 14348321302212, 32728, 32728),
        CommEvent(3569, 1, 14348321336962, 32728, 32728, "ctt-renamed"),
        exited(3570, 14348322804012, 32728),
    ],
    "ptrace": [
        fork(3571, 14348723584008, 32729),
        ExecEvent(3572, 1, 14348723814478, 32729, 32729),
        PtraceEvent(3573, 1, 14348773961115, 32729, 32729, R, R),
        PtraceEvent(3574, 1, 14348774000045, 32729, 32729, 0, 0),
        exited(3599, 14349024326590, 32729),
    ],
    "coredump": [  # killed by SIGSEGV (no core: ulimit -c 0): wait status 11
        fork(3600, 14349425310506, 32750),
        ExecEvent(3601, 1, 14349425527466, 32750, 32750),
        CoredumpEvent(3602, 1, 14349425843706, 32750, 32750, R, R),
        exited(3603, 14349425892456, 32750, 11),
    ],
}


def event_message(what: int, union: bytes, idx: int = CN_IDX_PROC, seq: int = 5,
                  length: int | None = None, msg_type: int = NLMSG_DONE) -> bytes:
    """One connector message carrying a proc_event in the kernel's layout."""
    event = PROC_EVENT_HEADER.pack(what, 0, 123) + union
    cn = CN_MSG.pack(idx, CN_VAL_PROC, seq, 0, len(event) if length is None else length, 0)
    return pack_message(msg_type, 0, 0, cn + event)


def refused(data: bytes) -> DecodeError:
    """The DecodeError that decoding `data` must raise."""
    with pytest.raises(DecodeError) as info:
        decode_events(data)
    return info.value


# --- the recorded kernel events --------------------------------------------------------------

def test_every_recording_has_expectations() -> None:
    assert set(RECORDINGS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_events(name: str) -> None:
    events = [event for data in recording(name) for event in decode_events(data)]
    assert events == EXPECTED[name]


def test_recorded_datagrams_hold_one_40_byte_event() -> None:
    """6.18 sends each event alone: nlmsghdr (type NLMSG_DONE) + cn_msg + 40-byte proc_event."""
    for name in RECORDINGS:
        for data in recording(name):
            (header,) = split_messages(data)
            assert (header.msg_type, len(data)) == (NLMSG_DONE, 76)
            assert CN_MSG.unpack_from(data, header.start)[4] == 40


# --- requests --------------------------------------------------------------------------------

def test_listen_request_bytes() -> None:
    expected = bytes.fromhex(
        "28000000" "0300" "0000" "00000000" "00000000"  # nlmsghdr: 40 bytes, NLMSG_DONE
        "01000000" "01000000" "07000000" "00100000" "0400" "0000"  # cn_msg: proc, seq 7, ack
        "01000000")  # PROC_CN_MCAST_LISTEN
    assert encode_subscribe(McastOp.LISTEN, seq=7, ack=0x1000) == expected


def test_filtered_listen_and_ignore_requests() -> None:
    wanted = ProcEventType.FORK | ProcEventType.EXEC | ProcEventType.EXIT
    (header,) = split_messages(data := encode_subscribe(events=wanted))
    cn = CN_MSG.unpack_from(data, header.start)
    assert cn[:2] == (CN_IDX_PROC, CN_VAL_PROC) and cn[4] == PROC_INPUT.size
    assert PROC_INPUT.unpack_from(data, header.start + CN_MSG.size) == (1, 0x80000003)
    assert encode_subscribe(McastOp.IGNORE)[-4:] == struct.pack("=I", 2)


# --- hand-built messages ---------------------------------------------------------------------

def test_unknown_event_type_keeps_its_bytes() -> None:
    union = bytes(range(24))
    (event,) = decode_events(event_message(0x400, union))
    assert event == UnknownEvent(5, 0, 123, 0x400, union)


def test_other_callbacks_and_message_types_are_skipped() -> None:
    fork_union = struct.pack("=iiii", 1, 1, 2, 2)
    data = (event_message(ProcEventType.FORK, fork_union, idx=CN_IDX_PROC + 1)
            + event_message(ProcEventType.FORK, fork_union, msg_type=NLMSG_NOOP)
            + event_message(ProcEventType.FORK, fork_union))
    assert decode_events(data) == [ForkEvent(5, 0, 123, 1, 1, 2, 2)]


def test_comm_is_cut_at_nul_and_bad_utf8_replaced() -> None:
    union = struct.pack("=ii16s", 9, 9, b"ab\xffc\0junk")
    (event,) = decode_events(event_message(ProcEventType.COMM, union))
    assert isinstance(event, CommEvent) and event.comm == "ab\ufffdc"


# --- malformed input: DecodeError at the exact offset ----------------------------------------

def test_truncated_cn_msg() -> None:
    error = refused(pack_message(NLMSG_DONE, 0, 0, bytes(12)))
    assert (error.offset, error.msg_type) == (HEADER, NLMSG_DONE)
    assert "truncated cn_msg: 12 bytes < 20" in str(error)


def test_cn_msg_length_beyond_its_message() -> None:
    error = refused(event_message(ProcEventType.EXEC, bytes(8), length=41))
    assert error.offset == HEADER
    assert "cn_msg length 41 exceeds the 24 bytes" in str(error)


def test_truncated_proc_event() -> None:
    error = refused(event_message(ProcEventType.EXEC, b"", length=8))
    assert error.offset == EVENT
    assert "truncated proc_event: 8 bytes < 16" in str(error)


@pytest.mark.parametrize(("what", "name", "need"), [
    (ProcEventType.FORK, "fork", 16), (ProcEventType.EXIT, "exit", 24),
    (ProcEventType.COMM, "comm", 24), (ProcEventType.UID, "uid", 16),
    (ProcEventType.NONE, "ack", 4)])
def test_event_data_shorter_than_its_type(what: int, name: str, need: int) -> None:
    error = refused(event_message(what, bytes(need - 1)))
    assert error.offset == UNION
    assert f"{name} event data: {need - 1} bytes < {need}" in str(error)


def test_second_message_truncated_names_its_offset() -> None:
    first, second = recording("fork_exec_exit")[:2]
    error = refused(first + second[:50])
    assert error.offset == len(first)


# --- properties ------------------------------------------------------------------------------

def decodes_or_refuses(data: bytes) -> None:
    """decode_events returns events, or DecodeError within the data; nothing else escapes."""
    try:
        events = decode_events(data)
    except DecodeError as exc:
        assert 0 <= exc.offset <= len(data), (exc.offset, len(data))
        return
    assert all(isinstance(event, tuple) and hasattr(event, "timestamp_ns") for event in events)


@ci(500)
@given(st.binary(max_size=300))
def test_random_bytes_decode_or_refuse(data: bytes) -> None:
    decodes_or_refuses(data)


@ci(1500)
@given(st.sampled_from(RECORDINGS), st.data())
def test_mutated_recordings_decode_or_refuse(name: str, data: st.DataObject) -> None:
    raw = bytearray(b"".join(recording(name)))
    for _ in range(data.draw(st.integers(0, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    raw = raw[:data.draw(st.integers(0, len(raw)))]
    decodes_or_refuses(bytes(raw))


@ci(300)
@given(st.lists(st.sampled_from(RECORDINGS), min_size=1, max_size=5))
def test_concatenated_datagrams_decode_as_their_parts(names: list[str]) -> None:
    """Several events in one datagram decode as the same events read one by one."""
    parts = [data for name in names for data in recording(name)]
    assert decode_events(b"".join(parts)) == [e for data in parts for e in decode_events(data)]

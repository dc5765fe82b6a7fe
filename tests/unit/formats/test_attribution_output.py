"""Attribution in the outputs: conntrack-logger's lines, ECS process/user/group, filters."""

from __future__ import annotations

import json

from conntrail.filters.match import compile_filter
from conntrail.formats.jsonl import JsonFormat
from conntrail.formats.text import TextFormat
from conntrail.history.rows import ClosedBy, build_row
from conntrail.model import (
    AF_INET6,
    Attribution,
    Confidence,
    EventKind,
    Flow,
    FlowEvent,
    FlowTuple,
)

WHO = Attribution("labels+ebpf", Confidence.EXACT, uid=1000, gid=1001, cgroup_id=77,
                  cgroup="/user.slice/user-1000.slice/session-3.scope",
                  unit="session-3.scope", pid=2354, ppid=2000, comm="curl",
                  exe="/usr/bin/curl", cmdline="curl -s -o /dev/null example.org")
EVENT = FlowEvent(EventKind.NEW, Flow(orig=FlowTuple(AF_INET6, 6, "2001:db8::12",
                                                     "2001:db8::1010", 55446, 80)),
                  "", 1373127181 * 10**9, WHO)


def test_text_adds_conntrack_loggers_second_and_third_lines() -> None:
    text = TextFormat()(EVENT).decode()
    assert text == ("2013-07-06T16:13:01.000000Z: ipv6/tcp 2001:db8::12/55446 > "
                    "2001:db8::1010/80 :: new\n"
                    "\t2354 1000:1001 /user.slice/user-1000.slice/session-3.scope ::\n"
                    "\tcurl -s -o /dev/null example.org\n")
    assert "\t" not in TextFormat()(EVENT._replace(who=None)).decode()  # unattributed: 1 line
    uid_only = WHO._replace(pid=None, cmdline=None, comm=None, confidence=Confidence.UID_ONLY)
    assert TextFormat()(EVENT._replace(who=uid_only)).decode().splitlines()[1:] == [
        "\t- 1000:1001 /user.slice/user-1000.slice/session-3.scope ::", "\t-"]


def test_conntrack_logger_template_names() -> None:
    line = TextFormat("{ev.src} {info.pid} {info.uid}:{info.gid} {info.service} "
                      "{info.cmdline} {confidence} {method}")(EVENT).decode()
    assert line == ("2001:db8::12 2354 1000:1001 /user.slice/user-1000.slice/session-3.scope "
                    "curl -s -o /dev/null example.org exact labels+ebpf\n")


def test_ecs_process_user_group_and_attribution() -> None:
    doc = json.loads(JsonFormat()(EVENT))
    assert doc["process"] == {"pid": 2354, "name": "curl", "executable": "/usr/bin/curl",
                              "command_line": "curl -s -o /dev/null example.org",
                              "parent": {"pid": 2000}}
    assert (doc["user"], doc["group"]) == ({"id": "1000"}, {"id": "1001"})
    assert doc["conntrail"]["attribution"] == {
        "method": "labels+ebpf", "confidence": "exact",
        "cgroup": "/user.slice/user-1000.slice/session-3.scope", "unit": "session-3.scope"}
    assert "process" not in json.loads(JsonFormat()(EVENT._replace(who=None)))


def test_filters_select_on_attribution() -> None:
    assert compile_filter('process.name == "curl" and user.id == 1000')(EVENT)
    assert compile_filter('service == "session-*" and pid == 2354 and gid == 1001')(EVENT)
    assert compile_filter("cgroup == /user.slice/*")(EVENT)
    assert not compile_filter("uid == 0")(EVENT)
    assert not compile_filter('process.name == "curl"')(EVENT._replace(who=None))
    no_exe = EVENT._replace(who=WHO._replace(exe=None))
    assert compile_filter('process.name == "curl"')(no_exe)  # falls back to comm


def test_stored_rows_keep_the_attribution() -> None:
    row = build_row(EVENT.flow, "", 1, None, ClosedBy.OPEN, WHO)
    assert (row.pid, row.uid, row.gid, row.exe, row.cmdline, row.unit) == (
        2354, 1000, 1001, "/usr/bin/curl", "curl -s -o /dev/null example.org",
        "session-3.scope")


def test_a_command_line_cannot_forge_log_lines() -> None:
    forged = WHO._replace(cmdline="sh -c x\n2026-01-01T00:00:00Z: ipv4/tcp forged\x1b[2J")
    text = TextFormat()(EVENT._replace(who=forged)).decode()
    assert text.count("\n") == 3
    assert text.splitlines()[2] == "\tsh -c x\\n2026-01-01T00:00:00Z: ipv4/tcp forged\\x1b[2J"

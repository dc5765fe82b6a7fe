"""The eBPF tier's records, decoded from bytes laid out as attribution.bpf.c writes them."""

from __future__ import annotations

import ipaddress
import re
import struct
from pathlib import Path

import pytest

from conntrail.errors import DecodeError, KernelError
from conntrail.kernel import bpf
from conntrail.model import AF_INET, AF_INET6, FlowTuple

SOURCE = Path(__file__).resolve().parents[2] / "src" / "conntrail" / "bpf" / "attribution.bpf.c"

# The C layouts, written field by field (independently of bpf.py's struct formats).
FLOW = struct.Struct("<BBBB B3x I I Q Q Q Q Q I I I I H H 4x 16s 16s 16s")
EXEC = struct.Struct("<B3x I I I I I Q Q I H H 16s 128s 256s")
FORK = struct.Struct("<B3x I I 4x Q 16s")


def flow_bytes(*, family: int = AF_INET, proto: int = 6, src: str = "198.18.0.2",
               dst: str = "198.18.1.2", sport: int = 40000, dport: int = 443, pid: int = 1234,
               tgid: int = 1230, uid: int = 4242, gid: int = 4343, comm: bytes = b"curl",
               source: int = 1, owner_hook: int = 2, flags: int = 0) -> bytes:
    saddr = ipaddress.ip_address(src).packed.ljust(16, b"\0")
    daddr = ipaddress.ip_address(dst).packed.ljust(16, b"\0")
    return FLOW.pack(bpf.REC_FLOW, family, proto, source, owner_hook, flags, 4026531840,
                     123456789, 77, 3, 9001, 9002, pid, tgid, uid, gid, sport, dport, saddr,
                     daddr, comm)


def exec_bytes(argv: bytes, *, args_size: int | None = None, filename: bytes = b"/usr/bin/curl",
               comm: bytes = b"curl") -> bytes:
    return EXEC.pack(bpf.REC_EXEC, 1230, 1230, 1, 4242, 4343, 555, 9001,
                     len(argv) if args_size is None else args_size, len(argv), len(filename),
                     comm, filename, argv)


def test_layouts_match_the_c_source() -> None:
    text = SOURCE.read_text()
    sizes = dict(re.findall(r"sizeof\(struct (\w+)\) == (\d+)", text))
    assert {name: int(size) for name, size in sizes.items()} == {
        "flow_rec": FLOW.size, "exec_rec": EXEC.size, "fork_rec": FORK.size}
    assert (FLOW.size, EXEC.size, FORK.size) == (128, 448, 40)
    assert 'SEC("license") = "GPL"' in text


def test_ipv4_tcp_flow() -> None:
    record = bpf.decode_record(flow_bytes())
    assert isinstance(record, bpf.FlowRecord)
    assert record == bpf.FlowRecord(
        family=AF_INET, proto=6, src="198.18.0.2", dst="198.18.1.2", sport=40000, dport=443,
        pid=1234, tgid=1230, uid=4242, gid=4343, comm="curl", cgroup_id=9001,
        sk_cgroup_id=9002, ktime_ns=123456789, sock_cookie=77, netns_cookie=3,
        netns_ino=4026531840, source=bpf.FlowSource.EGRESS_TASK,
        owner_hook=bpf.OwnerHook.CONNECT, flags=0)
    assert record.exact
    assert record.key == (AF_INET, 6, "198.18.0.2", "198.18.1.2", 40000, 443)
    assert record.icmp_type is None


def test_ipv6_udp_flow_spelled_like_the_codec() -> None:
    record = bpf.decode_record(flow_bytes(family=AF_INET6, proto=17, src="2001:db8::2",
                                          dst="2001:db8:0:0:0:0:0:1", dport=53))
    assert isinstance(record, bpf.FlowRecord)
    assert (record.src, record.dst, record.dport) == ("2001:db8::2", "2001:db8::1", 53)


def test_icmp_echo_flow() -> None:
    record = bpf.decode_record(flow_bytes(proto=1, sport=0x1234, dport=8 << 8))
    assert isinstance(record, bpf.FlowRecord)
    assert (record.icmp_type, record.icmp_code) == (8, 0)
    assert record.key == (AF_INET, 1, "198.18.0.2", "198.18.1.2", 0x1234, 0)


def test_comm_stops_at_nul_and_survives_bad_utf8() -> None:
    record = bpf.decode_record(flow_bytes(comm=b"a\xffb\0garbage"))
    assert isinstance(record, bpf.FlowRecord)
    assert record.comm == "a\ufffdb"


@pytest.mark.parametrize(("source", "hook", "flags", "exact"), [
    (bpf.FlowSource.EGRESS_TASK, bpf.OwnerHook.CONNECT, 0, True),
    (bpf.FlowSource.EGRESS_TASK, bpf.OwnerHook.SOCK_CREATE, 0, True),
    # a bystander in softirq/timer context, or no owner to check the task against
    (bpf.FlowSource.EGRESS_TASK, bpf.OwnerHook.CONNECT, bpf.FlowFlag.OWNER_DIFFERS, False),
    (bpf.FlowSource.EGRESS_TASK, bpf.OwnerHook.NONE, bpf.FlowFlag.NO_OWNER, False),
    (bpf.FlowSource.EGRESS_TASK, bpf.OwnerHook.NONE,
     bpf.FlowFlag.KTHREAD | bpf.FlowFlag.NO_OWNER, False),
    (bpf.FlowSource.SOCK_HOOK, bpf.OwnerHook.SENDMSG, 0, True),
    (bpf.FlowSource.SOCK_HOOK, bpf.OwnerHook.SOCK_CREATE, 0, False),
    (bpf.FlowSource.NONE, bpf.OwnerHook.NONE, bpf.FlowFlag.NO_OWNER, False),
])
def test_exact_only_when_the_sender_is_certain(source: int, hook: int, flags: int,
                                               exact: bool) -> None:
    record = bpf.decode_record(flow_bytes(source=source, owner_hook=hook, flags=flags))
    assert isinstance(record, bpf.FlowRecord)
    assert record.exact is exact


def test_record_matches_the_conntrack_reply_reversed_with_and_without_nat() -> None:
    record = bpf.decode_record(flow_bytes(src="198.18.9.1", sport=61000))
    assert isinstance(record, bpf.FlowRecord)
    # SNAT on the way out: original keeps the socket's view, the reply shows the packet's.
    reply = FlowTuple(AF_INET, 6, "198.18.1.2", "198.18.9.1", 443, 61000)
    assert bpf.flow_key(reply, reverse=True) == record.key
    assert bpf.flow_key(reply) != record.key
    icmp = bpf.decode_record(flow_bytes(proto=1, sport=7, dport=8 << 8))
    assert isinstance(icmp, bpf.FlowRecord)
    echo_reply = FlowTuple(AF_INET, 1, "198.18.1.2", "198.18.0.2", icmp_type=0, icmp_code=0,
                           icmp_id=7)
    assert bpf.flow_key(echo_reply, reverse=True) == icmp.key
    assert bpf.flow_key(FlowTuple(AF_INET, 47, "198.18.1.2", "198.18.0.2")) is None


def test_exec_record_splits_argv() -> None:
    record = bpf.decode_record(exec_bytes(b"curl\0-s\0https://example.test/\0"))
    assert record == bpf.ExecRecord(pid=1230, tid=1230, ppid=1, uid=4242, gid=4343,
                                    comm="curl", filename="/usr/bin/curl",
                                    argv=("curl", "-s", "https://example.test/"),
                                    args_truncated=False, cgroup_id=9001, ktime_ns=555)
    assert isinstance(record, bpf.ExecRecord)
    assert record.cmdline == "curl -s https://example.test/"


def test_exec_record_truncated_and_empty_args() -> None:
    long_args = b"python3\0-c\0" + b"x" * 300
    record = bpf.decode_record(exec_bytes(long_args[:256], args_size=len(long_args) + 1))
    assert isinstance(record, bpf.ExecRecord)
    assert record.args_truncated
    assert record.argv[:2] == ("python3", "-c") and record.argv[2] == "x" * (256 - 11)
    empty = bpf.decode_record(exec_bytes(b""))
    assert isinstance(empty, bpf.ExecRecord)
    assert empty.argv == () and not empty.args_truncated
    keeps_empty_arg = bpf.decode_record(exec_bytes(b"echo\0\0x\0"))
    assert isinstance(keeps_empty_arg, bpf.ExecRecord)
    assert keeps_empty_arg.argv == ("echo", "", "x")


def test_fork_record() -> None:
    record = bpf.decode_record(FORK.pack(bpf.REC_FORK, 20, 10, 999, b"bash"))
    assert record == bpf.ForkRecord(pid=20, ppid=10, comm="bash", ktime_ns=999)


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty"),
    (b"\x09" + bytes(200), "unknown BPF record type 9"),
    (flow_bytes()[:100], "needs 128 bytes"),
    (exec_bytes(b"a\0")[:447], "needs 448 bytes"),
    (flow_bytes(family=7), "unknown family 7"),
])
def test_malformed_records_raise_decode_error(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        bpf.decode_record(data)


def test_exec_lengths_out_of_range() -> None:
    data = bytearray(exec_bytes(b"a\0"))
    struct.pack_into("<H", data, 44, 300)  # argv_len beyond the 256-byte buffer
    with pytest.raises(DecodeError, match="out of range"):
        bpf.decode_record(bytes(data))


def test_longer_records_decode_for_forward_compatibility() -> None:
    assert isinstance(bpf.decode_record(flow_bytes() + bytes(8)), bpf.FlowRecord)


def test_cgroup2_root_from_mountinfo(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
        "40 31 0:38 /sub /mnt/nested rw,relatime - cgroup2 cgroup2 rw\n"
        "41 31 0:38 / /sys/fs/cgroup/uni\\040fied rw,relatime shared:9 - cgroup2 cgroup2 rw\n")
    assert bpf.cgroup2_root(str(mountinfo)) == "/sys/fs/cgroup/uni fied"
    mountinfo.write_text("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n")
    assert bpf.cgroup2_root(str(mountinfo)) is None
    assert bpf.cgroup2_root(str(tmp_path / "missing")) is None


def test_cache_path_is_per_release_and_source(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONNTRAIL_BPF_CACHE", str(tmp_path))
    path = bpf.object_path()
    assert path.parent == tmp_path / __import__("os").uname().release
    assert re.fullmatch(r"attribution-[0-9a-f]{16}\.bpf\.o", path.name)
    assert bpf.object_path("/elsewhere").parent.parent == Path("/elsewhere")


def test_build_without_tools_names_the_packages(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(KernelError, match=r"clang not found \(Debian package clang\).*bpftool"):
        bpf.build_object(cache_dir=tmp_path)


def test_probe_without_libbpf_names_the_package(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bpf, "LIBBPF", "libbpf-missing.so.99")
    bpf._libbpf.cache_clear()
    try:
        support = bpf.probe(cache_dir=tmp_path)
    finally:
        bpf._libbpf.cache_clear()
    assert not support.usable and support.egress is None
    assert any("libbpf-missing.so.99 not found" in p and "libbpf1" in p
               for p in support.problems)
    assert support.describe().startswith("eBPF attribution unavailable")

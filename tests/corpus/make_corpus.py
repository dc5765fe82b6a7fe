#!/usr/bin/env python3
"""Regenerate the golden conntrack corpus in tests/data/conntrack/ on the running kernel.

Run as root: ``python3 tests/corpus/make_corpus.py [CASE ...]`` (``--list`` names the cases).

For each case the script builds fresh network namespaces (``ctg-<tag>-<role>``, joined only by
veth pairs among themselves, addresses from 198.18.0.0/15 and 2001:db8::/32), starts
``conntrail record`` in the namespace whose conntrack table is of interest, makes the traffic,
waits until every flow it made has been destroyed (low timeouts, expired entries evicted with a
``conntrack -L`` dump) and stops the recorder. The recording becomes ``<case>.hex``, its
``conntrail decode --layout record`` output ``<case>.json`` (the golden answer). Each case's
facts are checked on the decoded events before the files replace the old ones, so a kernel
that behaves differently fails loudly instead of writing a corpus whose header lies.

Standard library only; every wait is bounded (the whole run takes well under two minutes) and
every namespace and process is removed again, on failure and on SIGINT/SIGTERM too.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
OUT = ROOT / "tests" / "data" / "conntrack"
PREFIX = "ctg-"
GENERATOR = "tests/corpus/make_corpus.py"

CMD_TIMEOUT = 15.0  # any one command
READY_TIMEOUT = 10.0  # recorder subscribed
SETTLE_TIMEOUT = 8.0  # every flow destroyed (timeouts of 1 s plus eviction)
RECORD_LIMIT_S = 45  # `record -t`: the recorder stops by itself even if this script dies
SOCKET_TIMEOUT = 3.0
POLL_S = 0.1
EVICT_EVERY_S = 0.5

CLONE_NEWNET = 0x40000000
IPPROTO_UDPLITE = 136
IPPROTO_SCTP = 132
IPPROTO_DCCP = 33
IPPROTO_GRE = 47

# Per-namespace conntrack settings: counters and kernel timestamps on every flow.
ACCOUNTING = {
    "net/netfilter/nf_conntrack_acct": "1",
    "net/netfilter/nf_conntrack_timestamp": "1",
    "net/netfilter/nf_conntrack_events": "1",
    "net/ipv6/conf/all/accept_dad": "0",
    "net/ipv6/conf/default/accept_dad": "0",
    "net/ipv6/conf/default/router_solicitations": "0",
}
# Short timeouts so DESTROY follows the traffic within about a second.
FAST_TIMEOUTS = {
    "net/netfilter/nf_conntrack_udp_timeout": "1",
    "net/netfilter/nf_conntrack_icmp_timeout": "1",
    "net/netfilter/nf_conntrack_icmpv6_timeout": "1",
    "net/netfilter/nf_conntrack_generic_timeout": "1",
    "net/netfilter/nf_conntrack_gre_timeout": "1",
    "net/netfilter/nf_conntrack_gre_timeout_stream": "1",
    "net/netfilter/nf_conntrack_tcp_timeout_time_wait": "1",
    "net/netfilter/nf_conntrack_tcp_timeout_close": "1",
    "net/netfilter/nf_conntrack_sctp_timeout_closed": "1",
    "net/netfilter/nf_conntrack_sctp_timeout_shutdown_sent": "1",
    "net/netfilter/nf_conntrack_sctp_timeout_shutdown_recd": "1",
    "net/netfilter/nf_conntrack_sctp_timeout_shutdown_ack_sent": "1",
}
FAST_TIMEOUTS_TEXT = ("timeouts lowered in the recording namespace (udp, icmp, icmpv6, generic, "
                      "gre, tcp time_wait/close, sctp closed/shutdown: 1 s); DESTROY when they "
                      "expire (a `conntrack -L -f ipv4|ipv6` dump every 0.5 s evicts expired "
                      "entries promptly)")


class CaseError(Exception):
    """A case could not be recorded as described."""


# --- commands and namespaces -------------------------------------------------------------------

def run(args: Sequence[str], *, stdin: str | None = None, check: bool = True) -> str:
    """Run a command with a time bound; its stdout, or CaseError when it fails."""
    try:
        proc = subprocess.run(list(args), input=stdin, capture_output=True, text=True,
                              timeout=CMD_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as exc:
        raise CaseError(f"{' '.join(args)}: no answer in {CMD_TIMEOUT:.0f} s") from exc
    if check and proc.returncode != 0:
        raise CaseError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def ns_run(ns: str, args: Sequence[str], *, stdin: str | None = None,
           check: bool = True) -> str:
    """Run a command inside namespace `ns`."""
    return run(["ip", "netns", "exec", ns, *args], stdin=stdin, check=check)


def child_env() -> dict[str, str]:
    """The environment for `python3 -m conntrail`: this tree's src/ first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _LIBC.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def entered(ns: str) -> Iterator[None]:
    """Run the body with this thread inside `ns`; sockets made there stay in `ns`."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(target)
    finally:
        os.close(home)


def write_sysctl(ns: str, key: str, value: str) -> None:
    """Set a per-namespace sysctl (slash-separated key) inside `ns`."""
    with entered(ns), open(f"/proc/sys/{key}", "w", encoding="ascii") as handle:
        handle.write(value)


def netns_exists(ns: str) -> bool:
    """Is there a named namespace `ns`?"""
    return os.path.exists(f"/run/netns/{ns}")


def delete_netns(ns: str) -> None:
    """Delete a namespace of ours if present (idempotent)."""
    if netns_exists(ns):
        run(["ip", "netns", "delete", ns], check=False)


class Lab:
    """The namespaces and sockets of one case; `close` removes everything it made."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.namespaces: list[str] = []
        self.sockets: list[socket.socket] = []

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def netns(self, role: str, *, fast_timeouts: bool = True, forwarding: bool = False) -> str:
        """A fresh namespace `ctg-<tag>-<role>` with lo up and conntrack accounting on."""
        ns = f"{PREFIX}{self.tag}-{role}"
        delete_netns(ns)  # left behind by an interrupted run
        run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        settings = dict(ACCOUNTING)
        if fast_timeouts:
            settings.update(FAST_TIMEOUTS)
        if forwarding:
            settings["net/ipv4/ip_forward"] = "1"
            settings["net/ipv6/conf/all/forwarding"] = "1"
        for key, value in settings.items():
            write_sysctl(ns, key, value)
        return ns

    def veth(self, ns_a: str, dev_a: str, addrs_a: Sequence[str], ns_b: str, dev_b: str,
             addrs_b: Sequence[str]) -> None:
        """A veth pair between two of our namespaces, addressed and up."""
        run(["ip", "-n", ns_a, "link", "add", dev_a, "type", "veth", "peer", "name", dev_b,
             "netns", ns_b])
        for ns, dev, addrs in ((ns_a, dev_a, addrs_a), (ns_b, dev_b, addrs_b)):
            for addr in addrs:
                extra = ["nodad"] if ":" in addr else []
                run(["ip", "-n", ns, "addr", "add", addr, "dev", dev, *extra])
            run(["ip", "-n", ns, "link", "set", dev, "up"])
        # Permanent neighbours: no ARP/ND round (a lost first solicitation costs 1 s).
        for ns, dev, peer_ns, peer_dev, peer_addrs in ((ns_a, dev_a, ns_b, dev_b, addrs_b),
                                                       (ns_b, dev_b, ns_a, dev_a, addrs_a)):
            mac = json.loads(run(["ip", "-j", "-n", peer_ns, "link", "show", "dev",
                                  peer_dev]))[0]["address"]
            for addr in peer_addrs:
                run(["ip", "-n", ns, "neigh", "replace", addr.split("/")[0], "lladdr", mac,
                     "dev", dev, "nud", "permanent"])

    def route(self, ns: str, *spec: str) -> None:
        """Add a route inside `ns` (`ip route add` arguments)."""
        family = ["-6"] if any(":" in part for part in spec) else []
        run(["ip", *family, "-n", ns, "route", "add", *spec])

    def open_socket(self, ns: str, family: int, kind: int,
                    proto: int = 0) -> socket.socket:
        """A socket created inside `ns`, closed with the lab."""
        with entered(ns):
            sock = socket.socket(family, kind, proto)
        self.sockets.append(sock)
        sock.settimeout(SOCKET_TIMEOUT)
        return sock

    def keep(self, sock: socket.socket) -> socket.socket:
        """Close `sock` with the lab (accepted connections)."""
        self.sockets.append(sock)
        sock.settimeout(SOCKET_TIMEOUT)
        return sock

    def close(self) -> None:
        """Close every socket, then delete every namespace."""
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self.sockets.clear()
        for ns in reversed(self.namespaces):
            delete_netns(ns)
        self.namespaces.clear()


def pair_lab(lab: Lab, *, fast_timeouts: bool = True) -> tuple[str, str]:
    """Client `-c` (198.18.0.2, 2001:db8::2) and server `-s` (198.18.0.1, 2001:db8::1)."""
    client = lab.netns("c", fast_timeouts=fast_timeouts)
    server = lab.netns("s", fast_timeouts=fast_timeouts)
    lab.veth(client, "c0", ["198.18.0.2/24", "2001:db8::2/64"],
             server, "s0", ["198.18.0.1/24", "2001:db8::1/64"])
    return client, server


PAIR_ADDRS: dict[int, tuple[str, str]] = {socket.AF_INET: ("198.18.0.2", "198.18.0.1"),
              socket.AF_INET6: ("2001:db8::2", "2001:db8::1")}
FAMILY_TEXT: dict[int, str] = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}


def endpoint(address: str, port: int) -> str:
    """address:port, with brackets around IPv6 addresses."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def pair_text(family: int, tag: str) -> str:
    """The header line that describes a pair lab."""
    client, server = PAIR_ADDRS[family]
    return (f"namespaces: client {PREFIX}{tag}-c {client} ==veth== {PREFIX}{tag}-s {server} "
            f"(server); recorded in the server namespace")


# --- reading a recording while it grows -----------------------------------------------------

_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
_CT_NEW, _CT_DELETE = 0x0100, 0x0102
_NLM_F_MULTI, _NLM_F_CREATE_EXCL = 0x2, 0x600


@dataclass(frozen=True)
class Seen:
    """One netlink message of a recording: its kind and conntrack id (when it has one)."""

    kind: str  # new, update, destroy, dump, done, error, other
    ct_id: int | None = None


def _ct_id(data: bytes, start: int, end: int) -> int | None:
    offset = start + 4  # nfgenmsg
    while offset + 4 <= end:
        length, attr_type = _NLATTR.unpack_from(data, offset)
        if length < 4:
            return None
        if attr_type & 0x3FFF == 12 and length >= 8:  # CTA_ID
            return int(struct.unpack_from("!I", data, offset + 4)[0])
        offset += (length + 3) & ~3
    return None


def scan(text: str) -> list[Seen]:
    """The messages in the complete lines of a (possibly still growing) recording."""
    out: list[Seen] = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n") or not line.strip() or line.startswith("#"):
            continue
        data = bytes.fromhex(line.split()[-1])
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, msg_type, flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size or offset + length > len(data):
                break
            if msg_type in (_CT_NEW, _CT_DELETE):
                if msg_type == _CT_DELETE:
                    kind = "destroy"
                elif flags & _NLM_F_MULTI or seq:
                    kind = "dump"
                else:
                    kind = "new" if flags & _NLM_F_CREATE_EXCL else "update"
                out.append(Seen(kind, _ct_id(data, offset + _NLMSGHDR.size, offset + length)))
            else:
                out.append(Seen({3: "done", 2: "error"}.get(msg_type, "other")))
            offset += (length + 3) & ~3
    return out


def flows_finished(flows: int) -> Callable[[list[Seen]], bool]:
    """At least `flows` conntrack entries were created, and every one was destroyed."""
    def done(seen: list[Seen]) -> bool:
        created = {item.ct_id for item in seen if item.kind == "new"}
        destroyed = {item.ct_id for item in seen if item.kind == "destroy"}
        return len(created) >= flows and created <= destroyed
    return done


def dumps_finished(requests: int) -> Callable[[list[Seen]], bool]:
    """Every dump request was answered (NLMSG_DONE or NLMSG_ERROR)."""
    def done(seen: list[Seen]) -> bool:
        return sum(item.kind in ("done", "error") for item in seen) >= requests
    return done


# --- the recorder ------------------------------------------------------------------------------

class Recorder:
    """`conntrail record` in one namespace, writing to a temporary file next to the corpus."""

    def __init__(self, case: str, ns: str, comments: Sequence[str], *, dump: bool = False,
                 events: str = "new,update,destroy") -> None:
        self.case = case
        self.ns = ns
        self.part = OUT / f".{case}.hex.part"
        self.log = OUT / f".{case}.log.part"
        args = [sys.executable, "-m", "conntrail", "record", "--netns", ns,
                "-o", str(self.part), "-e", events, "-t", str(RECORD_LIMIT_S)]
        if dump:
            args.append("--dump")
        for line in comments:
            args += ["--comment", line]
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start recording and return once the recorder is subscribed in its namespace."""
        self.part.unlink(missing_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log,
                                         env=child_env(), cwd=ROOT)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CaseError(f"conntrail record exited early: {self._stderr()}")
            if self._subscribed():
                return
            time.sleep(0.05)
        raise CaseError(f"conntrail record not subscribed after {READY_TIMEOUT:.0f} s")

    def _subscribed(self) -> bool:
        """A NETLINK_NETFILTER socket with multicast groups exists in our namespace."""
        with entered(self.ns), open("/proc/thread-self/net/netlink", encoding="ascii") as fh:
            rows = [line.split() for line in fh.readlines()[1:]]
        return any(len(row) > 3 and row[1] == "12" and int(row[3], 16) != 0 for row in rows)

    def _stderr(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return ""

    def seen(self) -> list[Seen]:
        """What the recording holds so far."""
        try:
            return scan(self.part.read_text(encoding="ascii"))
        except FileNotFoundError:
            return []

    def wait(self, finished: Callable[[list[Seen]], bool], evict: bool = True) -> bool:
        """Poll until `finished`; meanwhile a conntrack dump evicts expired entries."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        next_evict = time.monotonic() + EVICT_EVERY_S
        while time.monotonic() < deadline:
            if finished(self.seen()):
                return True
            if evict and time.monotonic() >= next_evict:
                for family in ("ipv4", "ipv6"):  # `conntrack -L` alone lists IPv4 only
                    ns_run(self.ns, ["conntrack", "-L", "-f", family], check=False)
                next_evict = time.monotonic() + EVICT_EVERY_S
            time.sleep(POLL_S)
        return finished(self.seen())

    def stop(self) -> None:
        """Stop the recorder (SIGINT, as a user would) and check it exited cleanly."""
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
                raise CaseError("conntrail record ignored SIGINT") from None
        if proc.returncode != 0:
            raise CaseError(f"conntrail record exit {proc.returncode}: {self._stderr()}")

    def discard(self) -> None:
        """Stop without checks and remove the temporary files."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        self.part.unlink(missing_ok=True)
        self.log.unlink(missing_ok=True)


# --- packet builders ---------------------------------------------------------------------------

def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the SCTP checksum (RFC 9260 appendix A)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283, "crc32c check value"


def sctp_chunk(chunk_type: int, value: bytes = b"", flags: int = 0) -> bytes:
    """One SCTP chunk, padded to 4 bytes."""
    raw = struct.pack("!BBH", chunk_type, flags, 4 + len(value)) + value
    return raw + b"\0" * (-len(raw) % 4)


def sctp_packet(sport: int, dport: int, vtag: int, *chunks: bytes) -> bytes:
    """An SCTP common header plus chunks, with its CRC-32C (stored little endian, as Linux)."""
    body = struct.pack("!HHII", sport, dport, vtag, 0) + b"".join(chunks)
    return body[:8] + struct.pack("<I", crc32c(body)) + body[12:]


def sctp_init(chunk_type: int, tag: int, tsn: int, params: bytes = b"") -> bytes:
    """INIT (1) or INIT ACK (2): initiate tag, a_rwnd, streams out/in, initial TSN."""
    return sctp_chunk(chunk_type, struct.pack("!IIHHI", tag, 65536, 10, 10, tsn) + params)


def inet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo_header(family: int, src: str, dst: str, proto: int, length: int) -> bytes:
    """The IPv4 or IPv6 pseudo-header of transport checksums."""
    if family == socket.AF_INET:
        return (socket.inet_pton(family, src) + socket.inet_pton(family, dst)
                + struct.pack("!BBH", 0, proto, length))
    return (socket.inet_pton(family, src) + socket.inet_pton(family, dst)
            + struct.pack("!I3xB", length, proto))


def dccp_packet(family: int, src: str, dst: str, sport: int, dport: int, dccp_type: int,
                seq: int, ack: int | None = None) -> bytes:
    """A DCCP Request (type 0) or Response (type 1) with 48-bit sequence numbers."""
    body = b"" if ack is None else struct.pack("!HHI", 0, ack >> 32, ack & 0xFFFFFFFF)
    body += struct.pack("!I", 0x63746731)  # service code 'ctg1'
    offset_words = (16 + len(body)) // 4
    header = struct.pack("!HHBBHBBHI", sport, dport, offset_words, 0, 0, (dccp_type << 1) | 1,
                         0, seq >> 32, seq & 0xFFFFFFFF)
    packet = header + body
    checksum = inet_checksum(pseudo_header(family, src, dst, IPPROTO_DCCP, len(packet))
                             + packet)
    return packet[:6] + struct.pack("!H", checksum) + packet[8:]


def gre_v0(payload: bytes) -> bytes:
    """A plain RFC 2784 GRE header (no key), carrying an Ethernet-bridged payload."""
    return struct.pack("!HH", 0x0000, 0x6558) + payload


def gre_pptp(call_id: int, seq: int) -> bytes:
    """An enhanced GRE (version 1, PPTP) header with key (call id) and sequence number."""
    return struct.pack("!HHHHI", 0x3001, 0x880B, 0, call_id, seq)


# --- traffic -------------------------------------------------------------------------------------

def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Read exactly `size` bytes (bounded by the socket timeout)."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise CaseError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return data


REQUEST = b"GET /corpus HTTP/1.0\r\n\r\n"
RESPONSE = b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def tcp_exchange(lab: Lab, client_ns: str, server_ns: str, family: int, listen: tuple[str, int],
                 target: tuple[str, int]) -> None:
    """Connect, request, response, client half-close, server close: a full orderly TCP life."""
    server = lab.open_socket(server_ns, family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(listen)
    server.listen(1)
    client = lab.open_socket(client_ns, family, socket.SOCK_STREAM)
    client.connect(target)
    conn = lab.keep(server.accept()[0])
    client.sendall(REQUEST)
    recv_exact(conn, len(REQUEST))
    conn.sendall(RESPONSE)
    recv_exact(client, len(RESPONSE))
    client.shutdown(socket.SHUT_WR)
    if conn.recv(1) != b"":
        raise CaseError("expected the client's FIN")
    conn.close()
    if client.recv(1) != b"":
        raise CaseError("expected the server's FIN")
    client.close()


def dgram_exchange(lab: Lab, client_ns: str, server_ns: str, family: int,
                   listen: tuple[str, int], target: tuple[str, int], proto: int = 0,
                   query: bytes = b"corpus query", answer: bytes = b"corpus answer") -> None:
    """One datagram each way over UDP (proto 0) or UDP-Lite (136)."""
    server = lab.open_socket(server_ns, family, socket.SOCK_DGRAM, proto)
    server.bind(listen)
    client = lab.open_socket(client_ns, family, socket.SOCK_DGRAM, proto)
    client.sendto(query, target)
    data, peer = server.recvfrom(2048)
    if data != query:
        raise CaseError(f"datagram mangled: {data!r}")
    server.sendto(answer, peer)
    if client.recv(2048) != answer:
        raise CaseError("answer mangled")


def raw_pair(lab: Lab, client_ns: str, server_ns: str, family: int,
             proto: int) -> tuple[socket.socket, socket.socket]:
    """Raw sockets for `proto` on both sides of a pair lab, bound to their addresses.

    A listening raw socket also keeps the receiving kernel from answering "protocol
    unreachable" for protocols it has no handler for.
    """
    client_addr, server_addr = PAIR_ADDRS[family]
    client = lab.open_socket(client_ns, family, socket.SOCK_RAW, proto)
    client.bind((client_addr, 0))
    server = lab.open_socket(server_ns, family, socket.SOCK_RAW, proto)
    server.bind((server_addr, 0))
    return client, server


def raw_recv(sock: socket.socket, family: int) -> bytes:
    """The transport payload of the next packet on a raw socket (IPv4 raw includes the IP
    header)."""
    data = sock.recv(65535)
    if family == socket.AF_INET:
        data = data[(data[0] & 0x0F) * 4:]
    return data


def ping(ns: str, target: str, count: int = 2) -> None:
    """ICMP or ICMPv6 echo with iputils ping (bounded)."""
    ns_run(ns, ["ping", "-6" if ":" in target else "-4", "-n", "-q", "-c", str(count),
                "-i", "0.2", "-W", "2", target])


# --- checks on the decoded golden ----------------------------------------------------------------

Doc = dict[str, Any]
Check = tuple[str, Callable[[list[Doc]], bool]]


def kinds(*wanted: str) -> Check:
    """Every one of these event kinds occurs."""
    return (f"kinds {', '.join(wanted)}",
            lambda docs: set(wanted) <= {doc["kind"] for doc in docs})


def only(proto: int | Sequence[int], family: int | None = None) -> Check:
    """Every event is of these protocols (and family)."""
    protos = {proto} if isinstance(proto, int) else set(proto)

    def check(docs: list[Doc]) -> bool:
        return all(doc["orig"]["proto"] in protos
                   and (family is None or doc["orig"]["family"] == family) for doc in docs)
    return f"protocol {sorted(protos)} family {family}", check


def with_ports(expected: bool) -> Check:
    """Every original tuple has ports (or none has)."""
    return (f"ports {'present' if expected else 'absent'}",
            lambda docs: all((doc["orig"]["sport"] is not None) == expected for doc in docs))


def states(*wanted: int) -> Check:
    """These protocol states occur."""
    return (f"states {wanted}",
            lambda docs: set(wanted) <= {doc["proto_state"] for doc in docs})


def status(flag: str) -> Check:
    """Some event carries this status bit."""
    return f"status {flag}", lambda docs: any(flag in doc["status"] for doc in docs)


def field_value(name: str, value: Any) -> Check:
    """Some event has this top-level field value."""
    return f"{name} = {value}", lambda docs: any(doc[name] == value for doc in docs)


def _accounted(doc: Doc) -> bool:
    return (doc["kind"] == "destroy" and doc["counters_orig"] is not None
            and doc["counters_reply"] is not None and doc["start_ns"] is not None
            and doc["stop_ns"] is not None)


DESTROY_ACCOUNTED: Check = ("every DESTROY has counters and start/stop timestamps",
                            lambda docs: all(_accounted(d) for d in docs
                                             if d["kind"] == "destroy"))


def standard(proto: int | Sequence[int], family: int | None) -> list[Check]:
    """What every live-traffic case must show."""
    return [kinds("new", "update", "destroy"), only(proto, family), DESTROY_ACCOUNTED]


# --- recording one case --------------------------------------------------------------------------

@dataclass(frozen=True)
class Written:
    """What one case produced."""

    case: str
    datagrams: int
    kinds: dict[str, int]
    protos: list[int]
    seconds: float


def record_case(case: str, ns: str, comments: Sequence[str], traffic: Callable[[], None], *,
                finished: Callable[[list[Seen]], bool], checks: Sequence[Check],
                dump: bool = False, evict: bool = True) -> Written:
    """Record `traffic` in `ns`, decode, check, then move the files into place."""
    began = time.monotonic()
    header = [f"case {case}: {comments[0]}", *comments[1:], f"made by {GENERATOR}"]
    recorder = Recorder(case, ns, header, dump=dump)
    json_part = OUT / f".{case}.json.part"
    try:
        recorder.start()
        traffic()
        if not recorder.wait(finished, evict=evict):
            raise CaseError(f"flows not complete after {SETTLE_TIMEOUT:.0f} s: "
                            f"{Counter(item.kind for item in recorder.seen())}")
        recorder.stop()
        decoded = subprocess.run(
            [sys.executable, "-m", "conntrail", "decode", str(recorder.part), "--layout",
             "record"], capture_output=True, env=child_env(), cwd=ROOT, timeout=CMD_TIMEOUT,
            check=False)
        if decoded.returncode != 0:
            raise CaseError(f"conntrail decode failed: {decoded.stderr.decode().strip()}")
        docs = [json.loads(line) for line in decoded.stdout.splitlines()]
        failed = [name for name, check in checks if not check(docs)]
        if failed:
            raise CaseError(f"decoded events do not show: {'; '.join(failed)}")
        json_part.write_bytes(decoded.stdout)
        datagrams = sum(1 for line in recorder.part.read_text(encoding="ascii").splitlines()
                        if line.strip() and not line.startswith("#"))
        os.replace(recorder.part, OUT / f"{case}.hex")
        os.replace(json_part, OUT / f"{case}.json")
    finally:
        recorder.discard()
        json_part.unlink(missing_ok=True)
    return Written(case, datagrams, dict(Counter(doc["kind"] for doc in docs)),
                   sorted({doc["orig"]["proto"] for doc in docs}), time.monotonic() - began)


# --- the cases -----------------------------------------------------------------------------------

V4, V6 = socket.AF_INET, socket.AF_INET6
FAMILY_SUFFIX: dict[int, str] = {V4: "ipv4", V6: "ipv6"}


def case_tcp(family: int) -> Written:
    """TCP: handshake, data both ways, orderly close, TIME_WAIT, DESTROY."""
    tag = f"tcp{family_digit(family)}"
    with Lab(tag) as lab:
        client, server = pair_lab(lab)
        caddr, saddr = PAIR_ADDRS[family]
        comments = [f"TCP over {FAMILY_TEXT[family]}, Python sockets",
                    pair_text(family, tag),
                    f"traffic: {caddr} connects to {endpoint(saddr, 8000)}, sends a "
                    f"{len(REQUEST)}-byte request, gets a {len(RESPONSE)}-byte response; "
                    "client half-closes, server closes (FIN both ways), client socket in TIME_WAIT",
                    FAST_TIMEOUTS_TEXT]
        return record_case(
            f"tcp_{FAMILY_SUFFIX[family]}", server, comments,
            lambda: tcp_exchange(lab, client, server, family, (saddr, 8000), (saddr, 8000)),
            finished=flows_finished(1),
            checks=[*standard(6, family), with_ports(True), states(1, 2, 3, 7),
                    status("ASSURED")])


def family_digit(family: int) -> str:
    """'4' or '6'."""
    return "4" if family == V4 else "6"


def case_dgram(family: int, proto: int) -> Written:
    """UDP or UDP-Lite: one query, one answer, DESTROY on timeout."""
    name = "udp" if proto == 0 else "udplite"
    tag = f"{name}{family_digit(family)}"
    with Lab(tag) as lab:
        client, server = pair_lab(lab)
        caddr, saddr = PAIR_ADDRS[family]
        quirk = []
        if proto == IPPROTO_UDPLITE:
            # This kernel's conntrack marks every UDP-Lite packet it checksums in prerouting
            # INVALID (`conntrack -S` invalid+1), although the UDP-Lite stack accepts it.
            write_sysctl(server, "net/netfilter/nf_conntrack_checksum", "0")
            quirk = ["nf_conntrack_checksum=0 in the server namespace: with checksum "
                     "verification on, this kernel's conntrack counts every incoming UDP-Lite "
                     "packet INVALID (never tracked, no reply seen) although the UDP-Lite "
                     "socket accepts it"]
        sock_text = ("socket(AF_INET%s, SOCK_DGRAM, 0)" if proto == 0 else
                     "socket(AF_INET%s, SOCK_DGRAM, IPPROTO_UDPLITE=136), full checksum "
                     "coverage") % ("" if family == V4 else "6")
        comments = [f"{name.upper() if proto == 0 else 'UDP-Lite'} over {FAMILY_TEXT[family]}, "
                    f"{sock_text}",
                    pair_text(family, tag),
                    f"traffic: {caddr} sends a 12-byte query to {endpoint(saddr, 5300)}, "
                    "the listener answers with 13 bytes",
                    *quirk, FAST_TIMEOUTS_TEXT]
        port = 5300
        return record_case(
            f"{name}_{FAMILY_SUFFIX[family]}", server, comments,
            lambda: dgram_exchange(lab, client, server, family, (saddr, port), (saddr, port),
                                   proto),
            finished=flows_finished(1),
            checks=[*standard(17 if proto == 0 else IPPROTO_UDPLITE, family), with_ports(True),
                    status("SEEN_REPLY")])


SCTP_PORTS = (40000, 9899)
SCTP_TAG_CLIENT = 0x1A2B3C4D
SCTP_TAG_SERVER = 0x5E6F7081


def sctp_traffic(lab: Lab, client_ns: str, server_ns: str, family: int) -> None:
    """The four-way handshake, then SHUTDOWN / SHUTDOWN ACK / SHUTDOWN COMPLETE, crafted."""
    client, server = raw_pair(lab, client_ns, server_ns, family, IPPROTO_SCTP)
    _, saddr = PAIR_ADDRS[family]
    caddr = PAIR_ADDRS[family][0]
    cport, sport = SCTP_PORTS
    cookie = b"conntrail-corpus-cookie!"
    steps: list[tuple[socket.socket, socket.socket, str, bytes]] = [
        (client, server, saddr,
         sctp_packet(cport, sport, 0, sctp_init(1, SCTP_TAG_CLIENT, 1000))),
        (server, client, caddr,
         sctp_packet(sport, cport, SCTP_TAG_CLIENT,
                     sctp_init(2, SCTP_TAG_SERVER, 5000,
                               struct.pack("!HH", 7, 4 + len(cookie)) + cookie))),
        (client, server, saddr,
         sctp_packet(cport, sport, SCTP_TAG_SERVER, sctp_chunk(10, cookie))),
        (server, client, caddr, sctp_packet(sport, cport, SCTP_TAG_CLIENT, sctp_chunk(11))),
        (client, server, saddr,
         sctp_packet(cport, sport, SCTP_TAG_SERVER, sctp_chunk(7, struct.pack("!I", 4999)))),
        (server, client, caddr, sctp_packet(sport, cport, SCTP_TAG_CLIENT, sctp_chunk(8))),
        (client, server, saddr, sctp_packet(cport, sport, SCTP_TAG_SERVER, sctp_chunk(14))),
    ]
    for sender, receiver, dest, packet in steps:
        sender.sendto(packet, (dest, 0))
        if raw_recv(receiver, family) != packet:
            raise CaseError("SCTP packet changed on the way")


def case_sctp(family: int) -> Written:
    """SCTP crafted on raw sockets: this kernel has no SCTP sockets, but tracks SCTP."""
    tag = f"sctp{family_digit(family)}"
    with Lab(tag) as lab:
        client, server = pair_lab(lab)
        caddr, saddr = PAIR_ADDRS[family]
        cport, sport = SCTP_PORTS
        comments = [f"SCTP over {FAMILY_TEXT[family]}, crafted on raw sockets "
                    "(socket(AF_INET%s, SOCK_RAW, 132); no SCTP socket support in this kernel) "
                    "with correct CRC-32C checksums" % ("" if family == V4 else "6"),
                    pair_text(family, tag),
                    f"traffic: {endpoint(caddr, cport)} -> {endpoint(saddr, sport)} INIT "
                    f"(tag 0x{SCTP_TAG_CLIENT:x}), INIT ACK (tag 0x{SCTP_TAG_SERVER:x}, "
                    "state cookie), COOKIE ECHO, COOKIE ACK, SHUTDOWN, SHUTDOWN ACK, "
                    "SHUTDOWN COMPLETE",
                    "conntrack tracks it as SCTP with ports and SCTP state: CLOSED (NEW, on "
                    "INIT), COOKIE_WAIT, COOKIE_ECHOED, ESTABLISHED (ASSURED), SHUTDOWN_SENT, "
                    "SHUTDOWN_ACK_SENT, CLOSED; the CRC-32C is verified in the server's "
                    "prerouting (nf_conntrack_checksum=1)",
                    FAST_TIMEOUTS_TEXT]
        return record_case(
            f"sctp_{FAMILY_SUFFIX[family]}", server, comments,
            lambda: sctp_traffic(lab, client, server, family),
            finished=flows_finished(1),
            checks=[*standard(IPPROTO_SCTP, family), with_ports(True), states(1, 2, 3, 4, 5, 7),
                    status("ASSURED")])


def dccp_traffic(lab: Lab, client_ns: str, server_ns: str, family: int) -> None:
    """A DCCP Request and its Response, crafted."""
    client, server = raw_pair(lab, client_ns, server_ns, family, IPPROTO_DCCP)
    caddr, saddr = PAIR_ADDRS[family]
    request = dccp_packet(family, caddr, saddr, 41000, 5001, 0, seq=0x10000001)
    client.sendto(request, (saddr, 0))
    if raw_recv(server, family) != request:
        raise CaseError("DCCP request changed on the way")
    response = dccp_packet(family, saddr, caddr, 5001, 41000, 1, seq=0x20000001,
                           ack=0x10000001)
    server.sendto(response, (caddr, 0))
    if raw_recv(client, family) != response:
        raise CaseError("DCCP response changed on the way")


def case_dccp(family: int) -> Written:
    """DCCP: no DCCP conntrack in this kernel, so generic tracking without ports."""
    tag = f"dccp{family_digit(family)}"
    with Lab(tag) as lab:
        client, server = pair_lab(lab)
        caddr, saddr = PAIR_ADDRS[family]
        comments = [f"DCCP (protocol 33) over {FAMILY_TEXT[family]}, crafted on raw sockets",
                    pair_text(family, tag),
                    f"traffic: DCCP-Request {endpoint(caddr, 41000)} -> {endpoint(saddr, 5001)}, "
                    "DCCP-Response back",
                    "this kernel has no DCCP connection tracking (no nf_conntrack_dccp_* "
                    "sysctls): conntrack uses its generic tracker, so the tuples carry protocol "
                    "33 and addresses but NO ports and there is no DCCP state",
                    FAST_TIMEOUTS_TEXT]
        return record_case(
            f"dccp_{FAMILY_SUFFIX[family]}", server, comments,
            lambda: dccp_traffic(lab, client, server, family),
            finished=flows_finished(1),
            checks=[*standard(IPPROTO_DCCP, family), with_ports(False),
                    field_value("proto_state", None)])


GRE_CALL_ID = 0x1234


def gre_traffic(lab: Lab, client_ns: str, server_ns: str, family: int) -> None:
    """Plain GRE both ways, then one enhanced (PPTP) GRE packet with a call id."""
    client, server = raw_pair(lab, client_ns, server_ns, family, IPPROTO_GRE)
    caddr, saddr = PAIR_ADDRS[family]
    frame = bytes(range(64))
    for sender, receiver, dest, packet in (
            (client, server, saddr, gre_v0(frame)),
            (server, client, caddr, gre_v0(frame[::-1])),
            (client, server, saddr, gre_pptp(GRE_CALL_ID, 1))):
        sender.sendto(packet, (dest, 0))
        if raw_recv(receiver, family) != packet:
            raise CaseError("GRE packet changed on the way")


def case_gre(family: int) -> Written:
    """GRE: version 0 (keys 0) with a reply, and version 1 (PPTP) with a call id key."""
    tag = f"gre{family_digit(family)}"
    with Lab(tag) as lab:
        client, server = pair_lab(lab)
        caddr, saddr = PAIR_ADDRS[family]
        comments = [f"GRE (protocol 47) over {FAMILY_TEXT[family]}, crafted on raw sockets",
                    pair_text(family, tag),
                    f"traffic: GRE v0 (no key, 64-byte payload) {caddr} -> {saddr} and back; "
                    f"then one enhanced GRE v1 (PPTP) packet {caddr} -> {saddr} with call id "
                    f"0x{GRE_CALL_ID:04x}",
                    "conntrack's GRE tracker reports keys as ports: 0/0 for GRE v0 (tracked "
                    f"like generic), 0/{GRE_CALL_ID} for the PPTP packet (no PPTP helper, so "
                    "no key map for the source key)",
                    FAST_TIMEOUTS_TEXT]
        return record_case(
            f"gre_{FAMILY_SUFFIX[family]}", server, comments,
            lambda: gre_traffic(lab, client, server, family),
            finished=flows_finished(2),
            checks=[*standard(IPPROTO_GRE, family), with_ports(True), status("SEEN_REPLY"),
                    ("a tuple with the PPTP call id",
                     lambda docs: any(d["orig"]["dport"] == GRE_CALL_ID for d in docs))])


def case_icmp(family: int) -> Written:
    """ICMP or ICMPv6 echo request/reply with ping."""
    tag = f"icmp{family_digit(family)}"
    name = "icmp_ipv4" if family == V4 else "icmpv6_ipv6"
    proto = 1 if family == V4 else 58
    with Lab(tag) as lab:
        client, server = pair_lab(lab)
        _, saddr = PAIR_ADDRS[family]
        comments = [f"{'ICMP' if family == V4 else 'ICMPv6'} echo over {FAMILY_TEXT[family]}",
                    pair_text(family, tag),
                    f"traffic: `ping -c 2 -i 0.2 {saddr}` in the client namespace (two echo "
                    "requests and replies with one identifier: one flow)",
                    FAST_TIMEOUTS_TEXT]
        return record_case(
            name, server, comments, lambda: ping(client, saddr),
            finished=flows_finished(1),
            checks=[*standard(proto, family), with_ports(False),
                    ("ICMP type, code and id in the tuples",
                     lambda docs: all(d["orig"]["icmp_type"] is not None
                                      and d["orig"]["icmp_id"] is not None for d in docs))])


NAT_RULESET = """
table inet ctg_nat {
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        iifname "rs" meta nfproto ipv4 tcp dport 8080 dnat ip to 198.18.1.2:80
        iifname "rs" meta nfproto ipv6 tcp dport 8080 dnat ip6 to [2001:db8:1::2]:80
        iifname "rs" meta nfproto ipv4 udp dport 8053 dnat ip to 198.18.1.2:53
        iifname "rs" meta nfproto ipv6 udp dport 8053 dnat ip6 to [2001:db8:1::2]:53
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "rs" masquerade
    }
}
"""
NAT_ADDRS: dict[int, dict[str, str]] = {V4: {"client": "198.18.1.2", "router_in": "198.18.1.1",
                  "router_out": "198.18.2.1", "server": "198.18.2.2"},
             V6: {"client": "2001:db8:1::2", "router_in": "2001:db8:1::1",
                  "router_out": "2001:db8:2::1", "server": "2001:db8:2::2"}}


def nat_lab(lab: Lab) -> tuple[str, str, str]:
    """client -c -- router -r (forwarding, masquerade towards -s, port forwards) -- server -s."""
    client = lab.netns("c")
    router = lab.netns("r", forwarding=True)
    server = lab.netns("s")
    lab.veth(client, "c0", ["198.18.1.2/24", "2001:db8:1::2/64"],
             router, "rc", ["198.18.1.1/24", "2001:db8:1::1/64"])
    lab.veth(router, "rs", ["198.18.2.1/24", "2001:db8:2::1/64"],
             server, "s0", ["198.18.2.2/24", "2001:db8:2::2/64"])
    lab.route(client, "default", "via", "198.18.1.1")
    lab.route(client, "default", "via", "2001:db8:1::1")
    ns_run(router, ["nft", "-f", "-"], stdin=NAT_RULESET)
    return client, router, server


def nat_text(tag: str) -> list[str]:
    """Header lines describing the NAT lab."""
    return [f"namespaces: client {PREFIX}{tag}-c (198.18.1.2, 2001:db8:1::2) ==veth== router "
            f"{PREFIX}{tag}-r (198.18.1.1/198.18.2.1, 2001:db8:1::1/2001:db8:2::1, "
            f"forwarding) ==veth== server {PREFIX}{tag}-s (198.18.2.2, 2001:db8:2::2); "
            "recorded in the ROUTER namespace",
            "router nft (table inet ctg_nat): `oifname \"rs\" masquerade` towards the server; "
            "port forwards from the server side: tcp 8080 -> client:80, udp 8053 -> client:53"]


def case_snat(family: int) -> Written:
    """TCP, UDP and ICMP from client to server through the router's masquerade."""
    tag = f"snat{family_digit(family)}"
    addrs = NAT_ADDRS[family]
    with Lab(tag) as lab:
        client, router, server = nat_lab(lab)
        srv = addrs["server"]

        def traffic() -> None:
            tcp_exchange(lab, client, server, family, (srv, 80), (srv, 80))
            dgram_exchange(lab, client, server, family, (srv, 53), (srv, 53))
            ping(client, srv)

        comments = [f"source NAT (masquerade) over {FAMILY_TEXT[family]}: TCP, UDP and "
                    f"{'ICMP' if family == V4 else 'ICMPv6'} echo through the router",
                    *nat_text(tag),
                    f"traffic: client {addrs['client']} -> server {srv}: TCP :80 (request, "
                    "response, orderly close), UDP :53 (query, answer), ping -c 2; the server "
                    f"sees {addrs['router_out']}, so each reply tuple's destination is the "
                    "router's outside address",
                    FAST_TIMEOUTS_TEXT]
        return record_case(
            f"nat_snat_{FAMILY_SUFFIX[family]}", router, comments, traffic,
            finished=flows_finished(3),
            checks=[*standard((6, 17, 1 if family == V4 else 58), family), status("SRC_NAT"),
                    status("SRC_NAT_DONE"),
                    ("reply destination is the router's outside address",
                     lambda docs: all(d["reply"]["dst"] == addrs["router_out"] for d in docs))])


def case_dnat(family: int) -> Written:
    """Port forwards: the server side reaches the client through the router's DNAT."""
    tag = f"dnat{family_digit(family)}"
    addrs = NAT_ADDRS[family]
    with Lab(tag) as lab:
        client, router, server = nat_lab(lab)
        public = addrs["router_out"]
        inside = addrs["client"]

        def traffic() -> None:
            tcp_exchange(lab, server, client, family, (inside, 80), (public, 8080))
            dgram_exchange(lab, server, client, family, (inside, 53), (public, 8053))

        comments = [f"destination NAT (port forward) over {FAMILY_TEXT[family]}: TCP and UDP",
                    *nat_text(tag),
                    f"traffic: server-side host {addrs['server']} -> router {public}:8080 (TCP, "
                    f"forwarded to {inside}:80: request, response, orderly close) and "
                    f"{public}:8053 (UDP, forwarded to {inside}:53: query, answer); each "
                    "reply tuple's source is the inside host",
                    FAST_TIMEOUTS_TEXT]
        return record_case(
            f"nat_dnat_{FAMILY_SUFFIX[family]}", router, comments, traffic,
            finished=flows_finished(2),
            checks=[*standard((6, 17), family), status("DST_NAT"), status("DST_NAT_DONE"),
                    ("reply source is the inside host",
                     lambda docs: all(d["reply"]["src"] == inside for d in docs))])


DUMP_TRACK_RULESET = """
table inet ctg_track {
    chain prerouting {
        type filter hook prerouting priority filter; policy accept;
        ct state new counter
    }
}
"""


def case_dump() -> Written:
    """A `--dump` of a table that holds TCP, UDP and ICMP entries of both families."""
    tag = "dump"
    with Lab(tag) as lab:
        client, server = pair_lab(lab, fast_timeouts=False)
        ns_run(server, ["nft", "-f", "-"], stdin=DUMP_TRACK_RULESET)
        open_conns: list[socket.socket] = []
        for family in (V4, V6):
            _, saddr = PAIR_ADDRS[family]
            listener = lab.open_socket(server, family, socket.SOCK_STREAM)
            listener.bind((saddr, 8000))
            listener.listen(1)
            conn = lab.open_socket(client, family, socket.SOCK_STREAM)
            conn.connect((saddr, 8000))
            open_conns.append(lab.keep(listener.accept()[0]))
            conn.sendall(REQUEST)
            recv_exact(open_conns[-1], len(REQUEST))
            dgram_exchange(lab, client, server, family, (saddr, 5300), (saddr, 5300))
        ping(client, PAIR_ADDRS[V4][1], count=1)
        comments = ["a `conntrail record --dump` of a table with entries made beforehand "
                    "(dump replies: NLM_F_MULTI, then NLMSG_DONE or an error per request)",
                    pair_text(V4, tag) + "; default timeouts; nft table inet ctg_track "
                    "(`ct state new counter`) keeps conntrack active before recording",
                    "entries: TCP ESTABLISHED (connection kept open, request sent) to "
                    "198.18.0.1:8000 and [2001:db8::1]:8000, UDP query+answer to :5300 on both "
                    "families, one ICMP echo to 198.18.0.1; no traffic while recording",
                    "record sends one AF_UNSPEC dump request: entries of both families"]
        return record_case(
            "dump", server, comments, lambda: None, finished=dumps_finished(1),
            checks=[("only DUMP events", lambda docs: {d["kind"] for d in docs} == {"dump"}),
                    ("at least 3 entries", lambda docs: len(docs) >= 3),
                    ("entries of both families",
                     lambda docs: {d["orig"]["family"] for d in docs} == {2, 10}),
                    ("TCP ESTABLISHED entry", lambda docs: any(
                        d["orig"]["proto"] == 6 and d["proto_state"] == 3 for d in docs)),
                    ("counters and start timestamp on dumped entries", lambda docs: all(
                        d["counters_orig"] is not None and d["start_ns"] for d in docs))],
            dump=True, evict=False)


ZONE_RULESET = """
table inet ctg_zone {
    chain prerouting_raw {
        type filter hook prerouting priority raw; policy accept;
        udp dport 7000 ct zone set 7
        udp dport 7001 ct original zone set 9
    }
    chain output_raw {
        type filter hook output priority raw; policy accept;
        udp sport 7000 ct zone set 7
    }
    chain prerouting_mark {
        type filter hook prerouting priority filter; policy accept;
        udp dport { 7000, 7001 } ct mark set 0x2a ct label set 5 ct label set 63
    }
}
"""


def case_zone_mark_labels() -> Written:
    """Zone, directional zone, mark and labels set by nft in the recording namespace."""
    tag = "zone"
    with Lab(tag) as lab:
        client, server = pair_lab(lab)
        ns_run(server, ["nft", "-f", "-"], stdin=ZONE_RULESET)

        def traffic() -> None:
            for family, port in ((V4, 7000), (V6, 7000), (V4, 7001)):
                _, saddr = PAIR_ADDRS[family]
                dgram_exchange(lab, client, server, family, (saddr, port), (saddr, port))

        comments = ["conntrack zone, directional zone, mark and labels set by nftables",
                    pair_text(V4, tag) + " (IPv4 and IPv6)",
                    "server nft (table inet ctg_zone): priority raw (-300, before conntrack) "
                    "`udp dport 7000 ct zone set 7` (prerouting) and `udp sport 7000 ct zone "
                    "set 7` (output), `udp dport 7001 ct original zone set 9` (prerouting); "
                    "priority filter `udp dport { 7000, 7001 } ct mark set 0x2a ct label set 5 "
                    "ct label set 63`",
                    "traffic: UDP query+answer to 198.18.0.1:7000 and [2001:db8::1]:7000 (zone "
                    "7: CTA_ZONE) and to 198.18.0.1:7001 (original-direction zone 9: "
                    "CTA_TUPLE_ZONE in the original tuple only); all with mark 0x2a and labels "
                    "5 and 63 (CTA_LABELS: 16-byte bitmap of host-order longs)",
                    FAST_TIMEOUTS_TEXT]
        return record_case(
            "zone_mark_labels", server, comments, traffic, finished=flows_finished(3),
            checks=[*standard(17, None), field_value("zone", 7), field_value("mark", 0x2A),
                    ("labels 5 and 63",
                     lambda docs: any(d["labels"] == hex((1 << 5) | (1 << 63)) for d in docs)),
                    ("original tuple zone 9",
                     lambda docs: any(d["orig"]["zone"] == 9 for d in docs)),
                    ("both families",
                     lambda docs: {d["orig"]["family"] for d in docs} == {2, 10})])


CASES: dict[str, Callable[[], Written]] = {
    "tcp_ipv4": lambda: case_tcp(V4),
    "tcp_ipv6": lambda: case_tcp(V6),
    "udp_ipv4": lambda: case_dgram(V4, 0),
    "udp_ipv6": lambda: case_dgram(V6, 0),
    "udplite_ipv4": lambda: case_dgram(V4, IPPROTO_UDPLITE),
    "udplite_ipv6": lambda: case_dgram(V6, IPPROTO_UDPLITE),
    "sctp_ipv4": lambda: case_sctp(V4),
    "sctp_ipv6": lambda: case_sctp(V6),
    "dccp_ipv4": lambda: case_dccp(V4),
    "dccp_ipv6": lambda: case_dccp(V6),
    "gre_ipv4": lambda: case_gre(V4),
    "gre_ipv6": lambda: case_gre(V6),
    "icmp_ipv4": lambda: case_icmp(V4),
    "icmpv6_ipv6": lambda: case_icmp(V6),
    "nat_snat_ipv4": lambda: case_snat(V4),
    "nat_snat_ipv6": lambda: case_snat(V6),
    "nat_dnat_ipv4": lambda: case_dnat(V4),
    "nat_dnat_ipv6": lambda: case_dnat(V6),
    "dump": case_dump,
    "zone_mark_labels": case_zone_mark_labels,
}


# --- main ----------------------------------------------------------------------------------------

def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every Lab/Recorder clean-up


def main(argv: Sequence[str] | None = None) -> int:
    """Record the chosen cases (default: all); exit 1 when any failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("cases", nargs="*", metavar="CASE", help="cases to record (default all)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(CASES))
        return 0
    unknown = [name for name in args.cases if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)}; see --list")
    if os.geteuid() != 0:
        print("make_corpus: must run as root (namespaces, nft, raw sockets)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    OUT.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    failures: list[str] = []
    for name in args.cases or list(CASES):
        try:
            written = CASES[name]()
        except (CaseError, OSError) as exc:
            failures.append(name)
            print(f"FAILED {name}: {exc}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # namespaces and recorder are already cleaned up
            print(f"interrupted during {name}; its files were left as they were",
                  file=sys.stderr)
            return 130
        counts = " ".join(f"{kind}={count}" for kind, count in sorted(written.kinds.items()))
        print(f"wrote {OUT.relative_to(ROOT)}/{name}.hex and .json: {written.datagrams} "
              f"datagrams, events {counts}, protocols {written.protos} "
              f"({written.seconds:.1f} s)")
    print(f"{len(args.cases or CASES) - len(failures)} cases written, {len(failures)} failed "
          f"in {time.monotonic() - began:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

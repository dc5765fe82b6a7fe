"""Would this firewall ruleset drop these flows? Ask the kernel, never a copy of nftables.

`check_ruleset(ruleset, probes)` loads the ruleset into a throwaway network namespace and sends
each probe's first packet through it for real: the kernel's own netfilter decides.

The harness (built per run, deleted in a `finally`, KeyboardInterrupt included)::

    ctc-<pid>-<n>-p (P: injector and sink)     ctc-<pid>-<n>-r (R: the firewall under test)
      ctc-in   ─────────── veth ───────────▶    ctc-in  (or interfaces[0])  INPUT, FORWARD in
      ctc-out  ◀────────── veth ────────────    ctc-out (or interfaces[1])  default routes out
                                                lo: probe addresses (/32, /128), LOCAL

- R forwards (IPv4 and IPv6), has rp_filter off and accept_local on, holds the destinations
  of INPUT/LOCAL probes and the sources of OUTPUT/LOCAL probes as local addresses (link-local
  and multicast ones on ctc-in, multicast with `autojoin`), and routes everything else out
  of ctc-out via a fake gateway with a permanent neighbour entry whose MAC nobody owns, so
  P's ip_rcv discards what R forwards. P routes everything into R via a fake gateway whose
  permanent neighbour is R's MAC. No ARP or ND anywhere (R's rules may drop R's answers),
  and no host interface touched: the veths are created inside the namespaces.
- Probes are built by hand with correct checksums: TCP SYN with an MSS option, 1-byte UDP,
  UDP-Lite (RFC 3828 checksum), ICMP/ICMPv6 of the given type and code (echo request by
  default), SCTP INIT alone with its CRC32c, and any other protocol as a bare IP packet whose
  first payload bytes hold the ports. They leave IPPROTO_RAW sockets (the kernel keeps the
  given header): INPUT and FORWARD from P, OUTPUT and LOCAL from R itself. The sockets are
  opened while the thread is inside the namespace and stay bound to it: no helper process.
- After the ruleset under test, R gets conntrail's probe table (`inet conntrail_fwcheck`):
  base chains at the last priority (2147483647, the top of nft's int32 range) on input and
  postrouting record each packet that reaches them, i.e. that every earlier base chain on
  the way accepted; chains at the first priority on the ingress of ctc-in and lo record that
  a packet arrived at all, which tells a harness loss (resent, or UNTESTABLE) from a drop.
  Records are dynamic sets keyed addresses . protocol . two 16-bit words. Untracked packets
  are recorded by header (ports; for ICMP type<<8|code and the checksum, unique per probe
  because each has its own id); tracked ones by conntrack's original tuple (`ct original
  …`, original direction only). So NAT (masquerade, DNAT, redirect) is judged on what the
  probe sent, and the kernel's own packets (a reject's reset carries the probe's conntrack
  entry) never count as the probe passing. The sets are read back with `nft -j list`.
- Calibration: the same probes run at the same time through an identical harness without
  the ruleset. A probe that does not arrive where its hook says (input, or out of ctc-out)
  there is UNTESTABLE, with the reason logged: a harness limit is never reported as the
  firewall dropping the flow. Each run has its own namespaces, so no shared conntrack state.
- Probes that cannot share one harness (an address local for one probe and remote for
  another, or two probes with the same conntrack tuple either way round) go to further
  rounds. Probes without a source port get 40000 + their index.

Kernel facts found on this machine (6.18) that shaped it:
- No dummy driver (CONFIG_DUMMY unset): the sink is a veth into P.
- A packet that a rule on the local output path drops makes sendto() fail with EPERM: that
  is a verdict, not a harness failure.
- Conntrack checks a UDP-Lite checksum with UDP's pseudo-header (udplite_error passes
  IPPROTO_UDP), so RFC-correct UDP-Lite from outside is `ct state invalid` here, as it would
  be for real senders.
- nft 1.0.6 crashes listing a set typed with a raw payload (`typeof … @th,32,16`) once it
  holds two elements, and types `ct original proto-src` only when one protocol is in the
  rule's context: hence plain types and one conntrack rule per protocol in use.

Limitations (what the harness cannot reproduce):
- Interface names: R has only lo and its two veths. Rules on other names (`iifname "eth0"`)
  never match, and rules that need the interface to exist (`iif eth0`, netdev chains,
  flowtables on a device) make the ruleset fail to load. Pass `interfaces=("eth0", "eth1")`
  to name R's P-side and out-side interfaces; every INPUT and FORWARD probe enters on the
  first, every FORWARD and OUTPUT probe leaves on the second.
- Routing is R's: default routes and local addresses only; `fib` expressions see that.
- Every probe is a lone first packet: rules that depend on state built by other traffic
  (established/related, limit, quota, ct count, meters) see a fresh state, except the set
  elements and object state written in the ruleset itself. ICMP errors relate to nothing.
- Probes sent from R come from a root-owned raw socket: socket matches (meta skuid, skgid,
  cgroup, socket) see that socket, not the real application's.
- Egress hooks (netdev/inet egress) come after the last recording point.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import json
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from conntrail.errors import ConfigError, KernelError
from conntrail.kernel.netns import NETNS_RUN_DIR, NetnsRef, entered
from conntrail.kernel.nft import TABLE_NAME, run_nft

log = logging.getLogger(__name__)

NS_PREFIX = "ctc-"
PROBE_TABLE = "conntrail_fwcheck"
PRIORITY_FIRST = -2147483648  # nft accepts the whole int32 range for base chain priorities
PRIORITY_LAST = 2147483647
DEFAULT_INTERFACES = ("ctc-in", "ctc-out")

# uapi/linux/in.h
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
IPPROTO_SCTP = 132
IPPROTO_UDPLITE = 136
# Protocols conntrack tracks by ports, and that we build a real header for.
_PORT_PROTOCOLS = frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, IPPROTO_UDPLITE})
_ICMP: dict[int, int] = {socket.AF_INET: IPPROTO_ICMP, socket.AF_INET6: IPPROTO_ICMPV6}
_ECHO_REQUEST: dict[int, int] = {socket.AF_INET: 8, socket.AF_INET6: 128}

_TTL = 64
_AUTO_PORT_BASE = 40000
_AUTO_PORT_SPAN = 65536 - _AUTO_PORT_BASE
_MAC_R_IN = "02:c7:00:00:00:01"  # R's P-side veth: P's fake gateway resolves to it
_MAC_R_OUT = "02:c7:00:00:00:02"
_MAC_P_IN = "02:c7:00:00:00:11"
_MAC_P_OUT = "02:c7:00:00:00:12"
_MAC_NOBODY = "02:c7:00:00:00:fe"  # R's fake gateway: P drops these frames as not its own
_GW4, _GW6 = "192.0.0.9", "fe80::1"
# R's own addresses on the out-side veth, so that masquerade finds a source: RFC 7600's IPv4
# dummy address and RFC 6666's discard-only IPv6 prefix, which no real flow uses.
_R_OUT4, _R_OUT6 = "192.0.0.8", "100::1"
_P_IN, _P_OUT = "ctc-in", "ctc-out"
_P_LINK_LOCAL = "fe80::c7:11"

_COUNTER = itertools.count()
_STALE_AFTER = 600.0  # seconds: a dead process's namespace older than this is removed


class Hook(enum.IntEnum):
    """Where a flow meets the firewall (values: uapi netfilter.h NF_INET_*; LOCAL is ours)."""

    INPUT = 1  # NF_INET_LOCAL_IN: comes from outside to this host
    OUTPUT = 3  # NF_INET_LOCAL_OUT: this host to outside
    FORWARD = 2  # NF_INET_FORWARD: routed through this host
    LOCAL = 5  # loopback: output, then input, on the same host


@dataclass(frozen=True, slots=True)
class Probe:
    """One new flow to try: concrete addresses and ports (None: pick one / echo request)."""

    hook: Hook
    family: int  # socket.AF_INET or socket.AF_INET6
    proto: int
    src: str
    dst: str
    sport: int | None = None
    dport: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None


class Verdict(enum.Enum):
    """What happened to a probe's first packet."""

    PASSED = "passed"
    DROPPED = "dropped"
    UNTESTABLE = "untestable"  # the harness itself could not deliver it (see the log)


# --------------------------------------------------------------------------- packets

# saddr, daddr, l4proto and two 16-bit numbers: the ports for port protocols; for ICMP the
# header is recorded as type<<8|code and checksum, conntrack's tuple as id and type<<8|code.
_Key = tuple[bytes, bytes, int, int, int]


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _checksum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 internet checksum."""
    if len(data) % 2:
        data += b"\0"
    total = initial + sum(struct.unpack(f"!{len(data) // 2}H", data))
    return ~_fold(total) & 0xFFFF


def _pseudo_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """The sum over the TCP/UDP pseudo-header (IPv4 or IPv6 form, by address length)."""
    if len(src) == 4:
        header = src + dst + struct.pack("!BBH", 0, proto, length)
    else:
        header = src + dst + struct.pack("!I3xB", length, proto)
    return sum(struct.unpack(f"!{len(header) // 2}H", header))


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def _crc32c(data: bytes) -> int:
    """CRC32c (Castagnoli), the SCTP checksum (RFC 9260 appendix A)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _transport(proto: int, src: bytes, dst: bytes, sport: int, dport: int, icmp: bool,
               seq: int) -> bytes:
    """The layer-4 part of a first packet, checksummed; `sport` is the ICMP id for ICMP."""
    if icmp:
        kind, code = dport >> 8, dport & 0xFF
        body = struct.pack("!BBHHH", kind, code, 0, sport, 1) + b"conntrail"
        initial = _pseudo_sum(src, dst, proto, len(body)) if proto == IPPROTO_ICMPV6 else 0
        csum = _checksum(body, initial)
        return body[:2] + struct.pack("!H", csum) + body[4:]
    if proto == IPPROTO_TCP:
        # SYN, data offset 6 (one MSS option), window 64240: what Linux sends.
        segment = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 6 << 4, 0x02, 64240, 0, 0) \
            + b"\x02\x04\x05\xb4"
        csum = _checksum(segment, _pseudo_sum(src, dst, proto, len(segment)))
        return segment[:16] + struct.pack("!H", csum) + segment[18:]
    if proto in (IPPROTO_UDP, IPPROTO_UDPLITE):
        # UDP-Lite: the length field is the checksum coverage, 0 = the whole datagram.
        length = 9 if proto == IPPROTO_UDP else 0
        datagram = struct.pack("!HHHH", sport, dport, length, 0) + b"?"
        csum = _checksum(datagram, _pseudo_sum(src, dst, proto, len(datagram))) or 0xFFFF
        return datagram[:6] + struct.pack("!H", csum) + datagram[8:]
    if proto == IPPROTO_SCTP:
        # Common header with verification tag 0 + an INIT chunk alone, as conntrack wants.
        init = struct.pack("!BBHIIHHI", 1, 0, 20, 0x1000 + seq, 106496, 10, 65535, seq)
        packet = struct.pack("!HHII", sport, dport, 0, 0) + init
        return packet[:8] + struct.pack("<I", _crc32c(packet)) + packet[12:]
    # Any other protocol: a bare payload whose first bytes hold the ports, so that rules on
    # `th dport` see them (conntrack tracks these protocols without ports).
    return struct.pack("!HHI", sport, dport, 0)


def _ip_packet(family: int, proto: int, src: bytes, dst: bytes, ident: int,
               payload: bytes) -> bytes:
    if family == socket.AF_INET:
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, _TTL,
                             proto, 0, src, dst)
        header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
        return header + payload
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), proto, _TTL, src, dst) + payload


@dataclass(frozen=True, slots=True)
class _Packet:
    """A probe made concrete: the bytes to send and the keys it may be recorded under."""

    index: int
    probe: Probe
    src: str  # canonical text forms
    dst: str
    keys: tuple[_Key, ...]  # header key first; conntrack's original tuple if it differs
    ident: tuple[Any, ...]  # conntrack identity, both directions: unique within a round
    wire: bytes

    @property
    def label(self) -> str:
        p = self.probe
        if p.proto == _ICMP[p.family]:
            what = f"{'icmpv6' if p.family == socket.AF_INET6 else 'icmp'}" \
                   f" type {self.keys[0][3] >> 8} code {self.keys[0][3] & 0xFF}"
        else:
            what = f"proto {p.proto} {self.keys[0][3]}->{self.keys[0][4]}"
        return f"#{self.index} {p.hook.name} {self.src} -> {self.dst} {what}"


def _address(text: str, family: int, index: int, name: str) -> tuple[str, bytes]:
    """Canonical text and packed form (inet_pton: ten times faster than ipaddress)."""
    try:
        packed = socket.inet_pton(family, text)
    except (OSError, ValueError, TypeError) as exc:
        kind = "IPv4" if family == socket.AF_INET else "IPv6"
        raise ConfigError(f"probes[{index}].{name}", f"{text!r} is not an {kind} address") \
            from exc
    return socket.inet_ntop(family, packed), packed


def _field(value: int | None, high: int, index: int, name: str) -> None:
    if value is not None and not 0 <= value <= high:
        raise ConfigError(f"probes[{index}].{name}", f"{value} is out of range 0-{high}")


def _make_packet(index: int, probe: Probe) -> _Packet:
    """Validate a probe and build its first packet (ConfigError names the faulty field)."""
    if probe.family not in (socket.AF_INET, socket.AF_INET6):
        raise ConfigError(f"probes[{index}].family", f"{probe.family} is not AF_INET(6)")
    if not isinstance(probe.hook, Hook):
        raise ConfigError(f"probes[{index}].hook", f"{probe.hook!r} is not a Hook")
    _field(probe.proto, 255, index, "proto")
    _field(probe.sport, 65535, index, "sport")
    _field(probe.dport, 65535, index, "dport")
    _field(probe.icmp_type, 255, index, "icmp_type")
    _field(probe.icmp_code, 255, index, "icmp_code")
    src, src_raw = _address(probe.src, probe.family, index, "src")
    dst, dst_raw = _address(probe.dst, probe.family, index, "dst")
    proto = probe.proto
    ends = frozenset((src, dst))
    seq = 0x10000 + index
    if proto == _ICMP[probe.family]:
        ident_no = index % 65535 + 1
        kind = _ECHO_REQUEST[probe.family] if probe.icmp_type is None else probe.icmp_type
        typecode = kind << 8 | (probe.icmp_code or 0)
        payload = _transport(proto, src_raw, dst_raw, ident_no, typecode, True, seq)
        # The checksum depends on the id, so the header key is unique per probe too.
        csum = int.from_bytes(payload[2:4], "big")
        keys: tuple[_Key, ...] = ((src_raw, dst_raw, proto, typecode, csum),
                                 (src_raw, dst_raw, proto, ident_no, typecode))
        ident: tuple[Any, ...] = (probe.family, proto, ends, ident_no)
    else:
        sport = _AUTO_PORT_BASE + index % _AUTO_PORT_SPAN if probe.sport is None else probe.sport
        dport = probe.dport or 0
        if proto in _PORT_PROTOCOLS:
            keys = ((src_raw, dst_raw, proto, sport, dport),)
            ident = (probe.family, proto, frozenset(((src, sport), (dst, dport))))
        else:
            sport = probe.sport or 0
            keys = ((src_raw, dst_raw, proto, sport, dport), (src_raw, dst_raw, proto, 0, 0))
            ident = (probe.family, proto, ends)
        payload = _transport(proto, src_raw, dst_raw, sport, dport, False, seq)
    wire = _ip_packet(probe.family, proto, src_raw, dst_raw, index % 65535 + 1, payload)
    return _Packet(index, probe, src, dst, keys, ident, wire)


# --------------------------------------------------------------------------- planning

def _always_local(family: int, addr: str) -> bool:
    """Addresses R has without us: loopback, and ones that cannot be a local unicast."""
    raw = socket.inet_pton(family, addr)
    if family == socket.AF_INET:
        return raw[0] == 127 or raw in (bytes(4), b"\xff" * 4)
    return raw in (bytes(16), bytes(15) + b"\x01")


def _multicast(family: int, addr: str) -> bool:
    raw = socket.inet_pton(family, addr)
    return 224 <= raw[0] <= 239 if family == socket.AF_INET else raw[0] == 0xFF


def _on_link(family: int, addr: str) -> bool:
    """IPv6 addresses that need an interface (link-local unicast, link-scope multicast)."""
    if family != socket.AF_INET6:
        return False
    raw = socket.inet_pton(family, addr)
    return (raw[0] == 0xFE and raw[1] & 0xC0 == 0x80) or (raw[0] == 0xFF and raw[1] & 0x0F <= 2)


@dataclass
class _Round:
    """Probes that can share one harness."""

    packets: list[_Packet] = field(default_factory=list)
    local: set[tuple[int, str]] = field(default_factory=set)
    remote: set[tuple[int, str]] = field(default_factory=set)
    idents: set[tuple[Any, ...]] = field(default_factory=set)

    @staticmethod
    def needs(pk: _Packet) -> tuple[set[tuple[int, str]], set[tuple[int, str]]]:
        fam, hook = pk.probe.family, pk.probe.hook
        local: set[tuple[int, str]] = set()
        remote: set[tuple[int, str]] = set()
        if hook in (Hook.INPUT, Hook.LOCAL):
            local.add((fam, pk.dst))
        if hook in (Hook.OUTPUT, Hook.LOCAL):
            local.add((fam, pk.src))
        if hook in (Hook.OUTPUT, Hook.FORWARD):
            remote.add((fam, pk.dst))
        return local, remote

    def accepts(self, pk: _Packet) -> bool:
        local, remote = self.needs(pk)
        return pk.ident not in self.idents and not local & self.remote \
            and not remote & self.local

    def add(self, pk: _Packet) -> None:
        local, remote = self.needs(pk)
        self.local |= local
        self.remote |= remote
        self.idents.add(pk.ident)
        self.packets.append(pk)


def _plan(probes: Sequence[Probe]) -> list[_Round]:
    rounds: list[_Round] = []
    for index, probe in enumerate(probes):
        pk = _make_packet(index, probe)
        for rnd in rounds:
            if rnd.accepts(pk):
                break
        else:
            rnd = _Round()
            rounds.append(rnd)
        rnd.add(pk)
    return rounds or [_Round()]


# --------------------------------------------------------------------------- probe table

_STATIONS = ("arr", "in", "out", "lo")
_HEADER = {4: "ip saddr . ip daddr . meta l4proto", 6: "ip6 saddr . ip6 daddr . meta l4proto"}
_CT = {4: "ct original ip saddr . ct original ip daddr . ct original protocol"
          " . ct original proto-src . ct original proto-dst",
       6: "ct original ip6 saddr . ct original ip6 daddr . ct original protocol"
          " . ct original proto-src . ct original proto-dst"}
_ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
_NFPROTO = {4: "ipv4", 6: "ipv6"}


def _record_rules(station: str, protos: dict[int, set[int]], header_when: str) -> list[str]:
    """Rules that put every packet passing here into the station's sets."""
    rules = []
    for fam in (4, 6):
        nf = _NFPROTO[fam]
        rules.append(f"{header_when}meta nfproto {nf} "
                     f"update @{station}_h{fam} {{ {_HEADER[fam]} . th sport . th dport }}")
        # nft types `ct original proto-src` only with a protocol in context: one rule each.
        rules.extend(f"ct direction original meta nfproto {nf} meta l4proto {proto} "
                     f"update @{station}_c{fam} {{ {_CT[fam]} }}"
                     for proto in sorted(protos[fam]))
    return rules


def _probe_table(inside: str, protos: dict[int, set[int]], size: int) -> str:
    """conntrail's recording table for a harness (inside: R's P-side interface)."""
    lines = [f"table inet {PROBE_TABLE} {{"]
    for station in _STATIONS:
        for fam in (4, 6):
            plain = f"{_ADDR_TYPE[fam]} . {_ADDR_TYPE[fam]} . inet_proto . inet_service" \
                    " . inet_service"
            lines.append(f"  set {station}_h{fam} {{ type {plain}; flags dynamic; "
                         f"size {size}; }}")
            lines.append(f"  set {station}_c{fam} {{ type {plain}; flags dynamic; "
                         f"size {size}; }}")
    lines += ["  counter arr_in { }", "  counter arr_lo { }", "  counter post_lo { }"]
    untracked = "ct state invalid,untracked "
    chains = [
        (f'type filter hook ingress device "{inside}" priority {PRIORITY_FIRST}', "arr_in",
         [*_record_rules("arr", protos, ""),
          f"ip ttl {_TTL} counter name arr_in", f"ip6 hoplimit {_TTL} counter name arr_in"]),
        (f'type filter hook ingress device "lo" priority {PRIORITY_FIRST}', "arr_lo",
         [*_record_rules("arr", protos, ""), "counter name arr_lo"]),
        (f"type filter hook input priority {PRIORITY_LAST}", "input",
         _record_rules("in", protos, untracked)),
        (f"type filter hook postrouting priority {PRIORITY_LAST}", "post",
         ['meta oif "lo" goto post_lo', *_record_rules("out", protos, untracked)]),
        ("", "post_lo", [*_record_rules("lo", protos, untracked), "counter name post_lo"]),
    ]
    for hook, name, rules in chains:
        lines.append(f"  chain {name} {{")
        if hook:
            lines.append(f"    {hook}; policy accept;")
        lines.extend(f"    {rule}" for rule in rules)
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- processes

def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise KernelError(f"the {name} command is missing (install iproute2 and nftables)")
    return path


class _CancelledError(KernelError):
    """The other run failed or the caller was interrupted: stop early and clean up."""


@dataclass
class _Deadline:
    """The time left for the whole check, and the flag that stops both runs."""

    end: float
    stop: threading.Event = field(default_factory=threading.Event)

    def left(self) -> float:
        return self.end - time.monotonic()

    def budget(self, what: str) -> float:
        if self.stop.is_set():
            raise _CancelledError(f"firewall check cancelled before {what}")
        left = self.left()
        if left <= 0:
            raise KernelError(f"firewall check timed out before {what}")
        return left


def _run(args: list[str], stdin: str | None, timeout: float, what: str,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command in the calling thread's network namespace."""
    try:
        proc = subprocess.run(args, input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise KernelError(f"firewall check: {what} timed out") from exc
    except OSError as exc:
        raise KernelError(f"firewall check: {what}: {exc.strerror}") from exc
    if check and proc.returncode != 0:
        raise KernelError(f"firewall check: {what} failed: {proc.stderr.strip()}")
    return proc


def _write_sysctls(ref: NetnsRef, values: Iterable[tuple[str, str]]) -> None:
    with entered(ref):
        for key, value in values:
            try:
                with open("/proc/sys/" + key, "w", encoding="ascii") as handle:
                    handle.write(value)
            except OSError as exc:
                raise KernelError(f"sysctl {key}={value} in {ref.name}: {exc.strerror}") \
                    from exc


_R_SYSCTLS = (
    # Before the veths exist, so that they inherit the defaults.
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv4/conf/all/rp_filter", "0"), ("net/ipv4/conf/default/rp_filter", "0"),
    ("net/ipv4/conf/all/accept_local", "1"), ("net/ipv4/conf/default/accept_local", "1"),
    ("net/ipv4/conf/all/send_redirects", "0"), ("net/ipv4/conf/default/send_redirects", "0"),
    ("net/ipv6/conf/all/forwarding", "1"), ("net/ipv6/conf/default/forwarding", "1"),
    ("net/ipv6/conf/all/accept_dad", "0"), ("net/ipv6/conf/default/accept_dad", "0"),
    ("net/ipv6/conf/default/addr_gen_mode", "1"),  # no link-local: no DAD, ND or MLD noise
)
_P_SYSCTLS = (("net/ipv6/conf/default/addr_gen_mode", "1"),)


def _delete_namespaces(names: Sequence[str]) -> None:
    """`ip netns del` each name; retried when interrupted, so an interrupt never leaks one."""
    pending = [name for name in names if os.path.exists(os.path.join(NETNS_RUN_DIR, name))]
    interrupted: KeyboardInterrupt | None = None
    for _attempt in range(3):
        if not pending:
            break
        try:
            subprocess.run([_binary("ip"), "-force", "-batch", "-"], text=True,
                           input="".join(f"netns del {name}\n" for name in pending),
                           capture_output=True, timeout=30, check=False)
        except KeyboardInterrupt as exc:
            interrupted = exc
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.error("deleting namespaces %s: %s", ", ".join(pending), exc)
        pending = [name for name in pending
                   if os.path.exists(os.path.join(NETNS_RUN_DIR, name))]
    if pending:
        log.error("could not delete namespaces: %s", ", ".join(pending))
    if interrupted is not None:
        raise interrupted


def _stale_namespaces() -> list[str]:
    """ctc- namespaces left by conntrail processes that no longer exist (killed -9).

    Also old enough: a process in another PID namespace sharing /run/netns looks dead from
    here, but its checks last seconds. (A bound namespace's nsfs inode keeps its creation
    time.)
    """
    stale = []
    now = time.time()
    with contextlib.suppress(OSError):
        for name in os.listdir(NETNS_RUN_DIR):
            match = re.fullmatch(rf"{NS_PREFIX}(\d+)-\d+-[a-z]+", name)
            if match is None or int(match.group(1)) == os.getpid():
                continue
            try:
                os.kill(int(match.group(1)), 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    if now - os.stat(os.path.join(NETNS_RUN_DIR, name)).st_ctime \
                            >= _STALE_AFTER:
                        stale.append(name)
            except PermissionError:
                pass
    return stale


# --------------------------------------------------------------------------- harness

_Observed = dict[str, set[_Key]]  # station -> recorded keys


@dataclass
class _Outcome:
    """What one harness saw."""

    observed: _Observed
    errors: dict[int, str]  # probe index -> why it could not be sent


class _Harness:
    """R and P for one run; `close()` deletes them whatever happened."""

    def __init__(self, role: str, interfaces: tuple[str, str], deadline: _Deadline) -> None:
        base = f"{NS_PREFIX}{os.getpid()}-{next(_COUNTER)}"
        self.role = role
        self.r = NetnsRef(f"{base}-r", os.path.join(NETNS_RUN_DIR, f"{base}-r"))
        self.p = NetnsRef(f"{base}-p", os.path.join(NETNS_RUN_DIR, f"{base}-p"))
        self.inside, self.outside = interfaces
        self.deadline = deadline
        self.sockets: dict[str, socket.socket] = {}
        self.ifindex: dict[str, int] = {}

    # -- building
    def build(self, rnd: _Round, ruleset: str | None) -> None:
        ip = _binary("ip")
        _run([ip, "-batch", "-"], f"netns add {self.r.name}\nnetns add {self.p.name}\n",
             self.deadline.budget("creating namespaces"), "creating namespaces")
        _write_sysctls(self.r, _R_SYSCTLS)
        _write_sysctls(self.p, _P_SYSCTLS)
        _run([ip, "-n", self.r.name, "-batch", "-"], self._r_commands(),
             self.deadline.budget("wiring"), f"wiring {self.r.name}")
        _run([ip, "-n", self.p.name, "-batch", "-"], self._p_commands(),
             self.deadline.budget("wiring"), f"wiring {self.p.name}")
        addresses = self._address_commands(rnd)
        if addresses:
            proc = _run([ip, "-n", self.r.name, "-force", "-batch", "-"], addresses,
                        self.deadline.budget("adding addresses"), "adding addresses",
                        check=False)
            if proc.returncode != 0:
                log.warning("fwcheck %s: some probe addresses could not be added (their "
                            "probes will be untestable): %s", self.role,
                            proc.stderr.strip()[:2000])
        if ruleset is not None:
            proc = self.nft(["-f", "-"], ruleset, "loading the ruleset", check=False)
            if proc.returncode != 0:
                message = proc.stderr.strip().replace("/dev/stdin:", "ruleset:")
                raise KernelError(f"the ruleset does not load:\n{message}")
        protos: dict[int, set[int]] = {4: set(), 6: set()}
        for pk in rnd.packets:
            protos[4 if pk.probe.family == socket.AF_INET else 6].add(pk.probe.proto)
        self.nft(["-f", "-"], _probe_table(self.inside, protos, max(1024, 4 * len(rnd.packets))),
                 "loading the probe table")
        self._open_sockets()

    def _r_commands(self) -> str:
        return "\n".join([
            f"link add {self.inside} address {_MAC_R_IN} type veth peer name {_P_IN} "
            f"address {_MAC_P_IN} netns {self.p.name}",
            f"link add {self.outside} address {_MAC_R_OUT} type veth peer name {_P_OUT} "
            f"address {_MAC_P_OUT} netns {self.p.name}",
            "link set lo up", f"link set {self.inside} up", f"link set {self.outside} up",
            f"addr add {_R_OUT4}/32 dev {self.outside}",
            f"addr add {_R_OUT6}/128 dev {self.outside} nodad",
            f"neigh add {_GW4} lladdr {_MAC_NOBODY} dev {self.outside} nud permanent",
            f"neigh add {_GW6} lladdr {_MAC_NOBODY} dev {self.outside} nud permanent",
            f"route add default via {_GW4} dev {self.outside} onlink",
            f"route add ::/0 via {_GW6} dev {self.outside}",
        ]) + "\n"

    def _p_commands(self) -> str:
        return "\n".join([
            "link set lo up", f"link set {_P_IN} up", f"link set {_P_OUT} up",
            # IPv6 will not route to a link-scope destination from a device without a
            # link-local address, even for a raw packet that brings its own source. /128, not
            # /64: an on-link fe80::/64 would make P resolve link-local destinations with ND,
            # and R's ruleset may well drop R's answers; the gateway's entry is permanent.
            f"addr add {_P_LINK_LOCAL}/128 dev {_P_IN} nodad",
            f"neigh add {_GW4} lladdr {_MAC_R_IN} dev {_P_IN} nud permanent",
            f"neigh add {_GW6} lladdr {_MAC_R_IN} dev {_P_IN} nud permanent",
            f"route add default via {_GW4} dev {_P_IN} onlink",
            f"route add ::/0 via {_GW6} dev {_P_IN}",
        ]) + "\n"

    def _address_commands(self, rnd: _Round) -> str:
        lines = []
        for fam, addr in sorted(rnd.local):
            if _always_local(fam, addr):
                continue
            if _multicast(fam, addr):
                prefix = 32 if fam == socket.AF_INET else 128
                lines.append(f"addr add {addr}/{prefix} dev {self.inside} autojoin")
            elif _on_link(fam, addr):
                lines.append(f"addr add {addr}/128 dev {self.inside} nodad")
            elif fam == socket.AF_INET:
                lines.append(f"addr add {addr}/32 dev lo")
            else:
                lines.append(f"addr add {addr}/128 dev lo nodad")
        return "".join(line + "\n" for line in lines)

    def nft(self, args: list[str], stdin: str | None, what: str,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        with entered(self.r):
            return _run([_binary("nft"), *args], stdin, self.deadline.budget(what),
                        f"nft {what}", check)

    def _open_sockets(self) -> None:
        for side, ref, devices in (("p", self.p, (_P_IN,)),
                                   ("r", self.r, (self.inside, self.outside))):
            with entered(ref):
                try:
                    v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
                    self.sockets[side + "4"] = v4
                    v4.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                    self.sockets[side + "6"] = socket.socket(socket.AF_INET6, socket.SOCK_RAW,
                                                             socket.IPPROTO_RAW)
                    for device in devices:
                        self.ifindex[f"{side}:{device}"] = socket.if_nametoindex(device)
                except OSError as exc:
                    raise KernelError(f"raw socket in {ref.name}: {exc.strerror}") from exc

    # -- running
    def send(self, packets: Iterable[_Packet]) -> tuple[dict[int, str], int]:
        """Send each packet once; returns send errors and how many went out from P."""
        errors: dict[int, str] = {}
        from_p = 0
        for number, pk in enumerate(packets):
            if number % 512 == 0:
                self.deadline.budget("sending")
            probe = pk.probe
            outside = probe.hook in (Hook.INPUT, Hook.FORWARD)
            fam = "4" if probe.family == socket.AF_INET else "6"
            sock = self.sockets[("p" if outside else "r") + fam]
            address: tuple[Any, ...]
            if probe.family == socket.AF_INET:
                address = (pk.dst, 0)
            else:
                scope = 0
                if _on_link(probe.family, pk.dst):
                    scope = self.ifindex[f"p:{_P_IN}" if outside else
                                         f"r:{self.outside}" if probe.hook == Hook.OUTPUT
                                         else f"r:{self.inside}"]
                address = (pk.dst, 0, 0, scope)
            try:
                sock.sendto(pk.wire, address)
            except PermissionError:
                # A rule on R's output path dropped it: the kernel answers a locally sent
                # packet that netfilter drops with EPERM. That is a verdict, not a failure;
                # the records tell the rest.
                if outside:
                    errors[pk.index] = "sending failed: EPERM in the injector namespace"
                continue
            except OSError as exc:
                errors[pk.index] = f"sending failed: {exc.strerror}"
                continue
            from_p += outside
        return errors, from_p

    def counters(self) -> dict[str, int]:
        text = self.nft(["-j", "list", "counters", "table", "inet", PROBE_TABLE], None,
                        "reading counters").stdout
        found: dict[str, int] = {}
        for entry in json.loads(text).get("nftables", []):
            counter = entry.get("counter") if isinstance(entry, dict) else None
            if counter is not None:
                found[counter["name"]] = int(counter.get("packets", 0))
        return found

    def settle(self, expected_from_p: int, reserve: float) -> None:
        """Wait until everything sent was processed, the counts stop moving, or time is up."""
        previous: dict[str, int] | None = None
        still = 0
        while True:
            seen = self.counters()
            if seen.get("arr_in", 0) >= expected_from_p and \
                    seen.get("arr_lo", 0) >= seen.get("post_lo", 0):
                return
            still = still + 1 if seen == previous else 0
            if still >= 3:
                log.debug("fwcheck %s: counters steady at %s (expected %d from P)", self.role,
                          seen, expected_from_p)
                return
            if self.deadline.stop.is_set():
                raise _CancelledError("firewall check cancelled")
            if self.deadline.left() < reserve:
                log.warning("fwcheck %s: time is up while packets may be in flight (%s, "
                            "expected %d from P)", self.role, seen, expected_from_p)
                return
            previous = seen
            time.sleep(0.01)

    def observe(self) -> _Observed:
        text = self.nft(["-j", "-p", "list", "table", "inet", PROBE_TABLE], None,
                        "reading the records").stdout
        observed: _Observed = {station: set() for station in _STATIONS}
        for entry in json.loads(text).get("nftables", []):
            nft_set = entry.get("set") if isinstance(entry, dict) else None
            if nft_set is None:
                continue
            station, _, kind = nft_set["name"].partition("_")
            family = socket.AF_INET if kind.endswith("4") else socket.AF_INET6
            target = observed[station]
            for elem in nft_set.get("elem", []):
                target.add(_key(elem, family))
        return observed

    def run(self, rnd: _Round, reserve: float) -> _Outcome:
        errors, from_p = self.send(rnd.packets)
        self.settle(from_p, reserve)
        observed = self.observe()
        # A packet that never reached R's ingress was lost between the namespaces (a full
        # backlog, say) before any rule or conntrack saw it: sending it again is harmless.
        for _attempt in range(2):
            lost = [pk for pk in rnd.packets if pk.index not in errors
                    and pk.probe.hook in (Hook.INPUT, Hook.FORWARD)
                    and not _seen(pk, observed, ("arr",))]
            if not lost or self.deadline.left() < reserve:
                break
            log.debug("fwcheck %s: %d packets lost before R, sending them again", self.role,
                      len(lost))
            more_errors, more_from_p = self.send(lost)
            errors.update(more_errors)
            self.settle(from_p + more_from_p, reserve)
            observed = self.observe()
        return _Outcome(observed, errors)

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()
        _delete_namespaces([self.r.name, self.p.name])


def _key(elem: Any, family: int) -> _Key:
    if isinstance(elem, dict) and "elem" in elem:
        elem = elem["elem"].get("val", elem["elem"])
    saddr, daddr, proto, sport, dport = elem["concat"]
    return (socket.inet_pton(family, saddr), socket.inet_pton(family, daddr), int(proto),
            int(sport), int(dport))


def _seen(pk: _Packet, observed: _Observed, stations: Sequence[str]) -> bool:
    return any(key in observed[station] for station in stations for key in pk.keys)


# --------------------------------------------------------------------------- verdicts

_EXPECTED = {Hook.INPUT: "in", Hook.LOCAL: "in", Hook.OUTPUT: "out", Hook.FORWARD: "out"}


def _calibrated(pk: _Packet, outcome: _Outcome) -> str | None:
    """None when the harness alone delivers the probe where it should; else why not."""
    if pk.index in outcome.errors:
        return outcome.errors[pk.index]
    hook = pk.probe.hook
    if _seen(pk, outcome.observed, (_EXPECTED[hook],)):
        return None
    if hook in (Hook.INPUT, Hook.FORWARD) and not _seen(pk, outcome.observed, ("arr",)):
        return "never reached the firewall namespace (the injector's kernel kept or refused " \
               "it, e.g. a loopback destination, or headers nft cannot parse)"
    if _seen(pk, outcome.observed, ("in", "out")):
        return "the kernel routes it elsewhere (addresses in conflict?)"
    return "the kernel drops it without any rule (martian, multicast or unroutable address, " \
           "or a protocol it cannot carry)"


def _judged(pk: _Packet, outcome: _Outcome) -> tuple[Verdict, str]:
    if pk.index in outcome.errors:
        return Verdict.UNTESTABLE, outcome.errors[pk.index]
    # NAT may move a flow between input and postrouting: either end counts as passed.
    if _seen(pk, outcome.observed, ("in", "out")):
        return Verdict.PASSED, ""
    hook = pk.probe.hook
    if hook in (Hook.INPUT, Hook.FORWARD) and not _seen(pk, outcome.observed, ("arr",)):
        return Verdict.UNTESTABLE, "lost before reaching the firewall namespace"
    if hook == Hook.LOCAL and _seen(pk, outcome.observed, ("lo",)) \
            and not _seen(pk, outcome.observed, ("arr",)):
        return Verdict.UNTESTABLE, "lost on loopback"
    return Verdict.DROPPED, ""


def _report(untestable: list[tuple[_Packet, str]], total: int) -> None:
    if not untestable:
        return
    log.warning("fwcheck: %d of %d probes are untestable in this harness", len(untestable),
                total)
    for pk, reason in untestable[:20]:
        log.warning("  %s: %s", pk.label, reason)
    if len(untestable) > 20:
        log.warning("  … and %d more (debug logging lists them all)", len(untestable) - 20)
        for pk, reason in untestable[20:]:
            log.debug("  %s: %s", pk.label, reason)


# --------------------------------------------------------------------------- public API

def _check_interfaces(interfaces: tuple[str, str]) -> tuple[str, str]:
    pattern = re.compile(r"[A-Za-z0-9_.-]{1,15}")
    names = tuple(interfaces)
    if len(names) != 2 or names[0] == names[1] or \
            any(not pattern.fullmatch(n) or n in ("lo", ".", "..") for n in names):
        raise ConfigError("interfaces", f"{interfaces!r}: two distinct interface names "
                          "(at most 15 characters, not lo) are needed")
    return names[0], names[1]


def _run_harness(role: str, rnd: _Round, ruleset: str | None, interfaces: tuple[str, str],
                 deadline: _Deadline, reserve: float) -> _Outcome | None:
    """Build one harness, run the round's probes through it, delete it (a worker thread)."""
    harness = _Harness(role, interfaces, deadline)
    try:
        harness.build(rnd, ruleset)
        return harness.run(rnd, reserve) if rnd.packets else None
    except BaseException:
        deadline.stop.set()  # the other run need not finish
        raise
    finally:
        harness.close()


def _results(futures: Sequence[Future[_Outcome | None]],
             deadline: _Deadline) -> list[_Outcome | None]:
    """Both runs' outcomes; on any failure stop both, wait for their clean-up, raise the cause."""
    try:
        return [future.result() for future in futures]
    except BaseException as exc:
        deadline.stop.set()
        wait(futures)
        if isinstance(exc, _CancelledError):  # this run was stopped by the other's failure
            for future in futures:
                cause = future.exception()
                if cause is not None and not isinstance(cause, _CancelledError):
                    raise cause from None
        raise


def _decide(rnd: _Round, real_outcome: _Outcome, cal_outcome: _Outcome,
            verdicts: dict[int, Verdict], untestable: list[tuple[_Packet, str]]) -> None:
    """Calibration first: a probe the bare harness cannot deliver gets no verdict from it."""
    for pk in rnd.packets:
        why = _calibrated(pk, cal_outcome)
        if why is not None:
            verdicts[pk.index] = Verdict.UNTESTABLE
            untestable.append((pk, f"without the ruleset: {why}"))
            continue
        verdict, why = _judged(pk, real_outcome)
        verdicts[pk.index] = verdict
        if verdict is Verdict.UNTESTABLE:
            untestable.append((pk, why))


def check_ruleset(ruleset: str, probes: Sequence[Probe], *, timeout: float = 5.0,
                  interfaces: tuple[str, str] | None = None) -> list[Verdict]:
    """Evaluate each probe's first packet against `ruleset` with the kernel; one verdict each.

    Raises KernelError when the ruleset does not load (nft's message, with line numbers
    as `ruleset:LINE:COLUMNS`), when the harness cannot be built, or when `timeout` seconds
    run out before it is; ConfigError for a malformed probe or interface name.
    """
    deadline = _Deadline(time.monotonic() + timeout)
    names = _check_interfaces(interfaces or DEFAULT_INTERFACES)
    rounds = _plan(probes)
    stale = _stale_namespaces()
    if stale:
        log.info("fwcheck: deleting namespaces left by dead processes: %s", ", ".join(stale))
        _delete_namespaces(stale)
    reserve = min(1.0, timeout / 5)  # kept for reading the records after the wait
    verdicts: dict[int, Verdict] = {}
    untestable: list[tuple[_Packet, str]] = []
    started = time.monotonic()
    # The two runs of a round are independent (own namespaces, own conntrack): run them side
    # by side. Leaving the pool waits for both, so their namespaces are gone when we return
    # or raise, KeyboardInterrupt included.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="conntrail-fwcheck") as pool:
        try:
            for number, rnd in enumerate(rounds):
                futures = [pool.submit(_run_harness, "ruleset", rnd, ruleset, names, deadline,
                                       reserve)]
                if rnd.packets:
                    futures.append(pool.submit(_run_harness, "calibration", rnd, None, names,
                                               deadline, reserve))
                outcomes = _results(futures, deadline)
                if not rnd.packets:
                    continue
                real_outcome, cal_outcome = outcomes
                assert real_outcome is not None and cal_outcome is not None
                _decide(rnd, real_outcome, cal_outcome, verdicts, untestable)
                log.debug("fwcheck: round %d/%d, %d probes", number + 1, len(rounds),
                          len(rnd.packets))
        except BaseException:
            deadline.stop.set()  # e.g. Ctrl-C between two submissions
            raise
    _report(sorted(untestable, key=lambda item: item[0].index), len(probes))
    log.info("fwcheck: %d probes in %d round(s), %.2f s", len(probes), len(rounds),
             time.monotonic() - started)
    return [verdicts[index] for index in range(len(probes))]


_OWN_TABLES = frozenset({TABLE_NAME, PROBE_TABLE})
_TABLE_LINE = re.compile(r'table\s+(\S+)\s+"?([^"\s{]+)"?\s*\{')  # family, name


def live_ruleset(netns: NetnsRef) -> str:
    """`nft list ruleset` of a namespace, minus conntrail's own tables: the activation table
    (`inet conntrail`) and this harness's probe table. A ruleset conntrail emitted for the
    user (`conntrail_policy`) is the firewall being checked, and stays."""
    text = run_nft(["list", "ruleset"], netns)
    kept: list[str] = []
    skipping = False
    for line in text.splitlines(keepends=True):
        if skipping:
            skipping = line.rstrip("\n") != "}"
            continue
        match = _TABLE_LINE.match(line)
        if match is not None and match.group(2) in _OWN_TABLES:
            skipping = not line.rstrip().endswith("}")  # nft ends a table with "}" alone
            continue
        kept.append(line)
    return "".join(kept)

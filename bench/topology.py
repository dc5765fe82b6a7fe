"""Three-namespace bench topology: client -> router (conntrack, NAT, truth counter) -> server.

    ctb-client  c0 198.18.1.2/24 ==veth== rc 198.18.1.1/24  ctb-router
    ctb-router  rs 198.18.2.1/24 ==veth== s0 198.18.2.2/24  ctb-server

The veth pairs are created directly inside the namespaces (`ip -n NS link add ... peer ...
netns NS2`), so nothing ever appears in, or routes to, the host's namespace. The router
forwards, masquerades towards the server and counts `ct state new` packets in its forward
chain with the named counter `ctnew`: that counter is the truth of flows created. The server
drops every UDP datagram in its input hook, so nothing answers and no ICMP comes back.
IPv6 is disabled in all three namespaces so that no link-local chatter adds conntrack events.

Standalone use, for poking at it by hand: `python3 bench/topology.py up|down|counter`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

CLIENT = "ctb-client"
ROUTER = "ctb-router"
SERVER = "ctb-server"
NAMESPACES = (CLIENT, ROUTER, SERVER)
CLIENT_ADDR = "198.18.1.2"
SERVER_ADDR = "198.18.2.2"
NFT_TABLE = "ctbench"
COUNTER = "ctnew"
CMD_TIMEOUT = 60.0

ROUTER_RULESET = f"""
table inet {NFT_TABLE} {{
    counter {COUNTER} {{ }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        ct state new counter name "{COUNTER}"
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "rs" masquerade
    }}
}}
"""

SERVER_RULESET = f"""
table inet {NFT_TABLE} {{
    chain input {{
        type filter hook input priority filter; policy accept;
        meta l4proto udp drop
    }}
}}
"""


def run(args: list[str], stdin: str | None = None, check: bool = True) -> str:
    """Run a command with a time bound and return its stdout; raise on failure if `check`."""
    proc = subprocess.run(args, input=stdin, capture_output=True, text=True,
                          timeout=CMD_TIMEOUT, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def in_ns(ns: str, args: list[str], stdin: str | None = None, check: bool = True) -> str:
    """Run a command inside namespace `ns`."""
    return run(["ip", "netns", "exec", ns, *args], stdin=stdin, check=check)


def sysctl_path(key: str) -> str:
    """The /proc/sys path of a dotted sysctl key."""
    return "/proc/sys/" + key.replace(".", "/")


def ns_sysctl_write(ns: str, key: str, value: str) -> None:
    """Set a sysctl as seen from inside `ns` (per-netns keys only take effect there)."""
    in_ns(ns, ["sysctl", "-q", "-w", f"{key}={value}"])


def ns_sysctl_read(ns: str, key: str) -> str:
    """Read a sysctl as seen from inside `ns`."""
    return in_ns(ns, ["cat", sysctl_path(key)]).strip()


def existing_bench_namespaces() -> list[str]:
    """Names of this bench's namespaces that exist now (left over or current)."""
    out = run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [name for name in names if name in NAMESPACES]


def delete_namespaces() -> None:
    """Flush the router's conntrack table (synchronously), then delete all bench namespaces.

    Deleting a namespace frees its conntrack entries in a kernel worker, asynchronously; a
    flush first keeps that work out of the next run's measurement.
    """
    present = existing_bench_namespaces()
    if ROUTER in present:
        in_ns(ROUTER, ["conntrack", "-F"], check=False)
    for ns in present:
        run(["ip", "netns", "del", ns], check=False)


@dataclass
class Topology:
    """The three namespaces, set up on enter and torn down on exit (also on failure)."""

    udp_timeout: int | None = None
    notes: dict[str, str] = field(default_factory=dict)

    def __enter__(self) -> Topology:
        delete_namespaces()
        try:
            self._create()
        except BaseException:
            delete_namespaces()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        delete_namespaces()

    def _create(self) -> None:
        for ns in NAMESPACES:
            run(["ip", "netns", "add", ns])
            ns_sysctl_write(ns, "net.ipv6.conf.all.disable_ipv6", "1")
            ns_sysctl_write(ns, "net.ipv6.conf.default.disable_ipv6", "1")
            in_ns(ns, ["ip", "link", "set", "lo", "up"])
        run(["ip", "-n", CLIENT, "link", "add", "c0", "type", "veth",
             "peer", "name", "rc", "netns", ROUTER])
        run(["ip", "-n", ROUTER, "link", "add", "rs", "type", "veth",
             "peer", "name", "s0", "netns", SERVER])
        self._address(CLIENT, "c0", f"{CLIENT_ADDR}/24")
        self._address(ROUTER, "rc", "198.18.1.1/24")
        self._address(ROUTER, "rs", "198.18.2.1/24")
        self._address(SERVER, "s0", f"{SERVER_ADDR}/24")
        run(["ip", "-n", CLIENT, "route", "add", "default", "via", "198.18.1.1"])
        ns_sysctl_write(ROUTER, "net.ipv4.ip_forward", "1")
        in_ns(ROUTER, ["nft", "-f", "-"], stdin=ROUTER_RULESET)
        in_ns(SERVER, ["nft", "-f", "-"], stdin=SERVER_RULESET)
        if self.udp_timeout is not None:
            ns_sysctl_write(ROUTER, "net.netfilter.nf_conntrack_udp_timeout",
                            str(self.udp_timeout))
        for key in ("net.netfilter.nf_conntrack_udp_timeout", "net.netfilter.nf_conntrack_max",
                    "net.netfilter.nf_conntrack_buckets", "net.netfilter.nf_conntrack_events"):
            self.notes[key] = ns_sysctl_read(ROUTER, key)

    @staticmethod
    def _address(ns: str, dev: str, cidr: str) -> None:
        run(["ip", "-n", ns, "addr", "add", cidr, "dev", dev])
        run(["ip", "-n", ns, "link", "set", dev, "up"])


def flows_created() -> int:
    """The truth: packets counted by the router's `ct state new` counter."""
    out = in_ns(ROUTER, ["nft", "-j", "list", "counter", "inet", NFT_TABLE, COUNTER])
    for item in json.loads(out).get("nftables", []):
        if "counter" in item:
            return int(item["counter"]["packets"])
    raise RuntimeError(f"no counter in nft output: {out[:200]}")


def conntrack_count() -> int:
    """Entries in the router's conntrack table now (nf_conntrack_count is per-netns)."""
    return int(ns_sysctl_read(ROUTER, "net.netfilter.nf_conntrack_count"))


def global_sysctl(key: str) -> str:
    """Read a sysctl in the initial namespace (this process's)."""
    return Path(sysctl_path(key)).read_text(encoding="ascii").strip()


def set_global_sysctl(key: str, value: str) -> None:
    """Write a sysctl in the initial namespace (host-wide keys such as nf_conntrack_max)."""
    Path(sysctl_path(key)).write_text(value + "\n", encoding="ascii")


def main(argv: list[str]) -> int:
    """`up` builds the topology and leaves it; `down` removes it; `counter` prints the truth."""
    action = argv[1] if len(argv) > 1 else ""
    if action == "up":
        topo = Topology()
        topo.__enter__()  # deliberately left up; `down` removes it
        print(json.dumps(topo.notes))
    elif action == "down":
        delete_namespaces()
    elif action == "counter":
        print(flows_created())
    else:
        print("usage: topology.py up|down|counter", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

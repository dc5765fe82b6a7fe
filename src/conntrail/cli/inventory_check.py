"""`inventory --check-against`: which confirmed flows would this ruleset drop?

Each confirmed entry becomes one probe (two for an entry merged across IPv4 and IPv6) that
kernel/fwcheck.py sends through a throw-away namespace holding the ruleset: the kernel's own
netfilter decides. An entry whose address is a network (--group-by) is probed with one host
in it, and an entry with any address (--ports-only) with a documentation address: the
verdict then holds for that representative.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import orjson

from conntrail.errors import ConfigError
from conntrail.formats.inventory import TABLE_HEADER, DumpInfo, entry_document, table_cells
from conntrail.inventory.model import ANY_FAMILY, Direction, InventoryEntry
from conntrail.kernel.fwcheck import Hook, Probe, Verdict, check_ruleset, live_ruleset
from conntrail.kernel.netns import resolve
from conntrail.model import AF_INET, AF_INET6
from conntrail.sinks.inventory import Renderer

_HOOKS = {Direction.INBOUND: Hook.INPUT, Direction.OUTBOUND: Hook.OUTPUT,
          Direction.FORWARDED: Hook.FORWARD, Direction.LOCAL: Hook.LOCAL}
# Stand-ins for "any address" (RFC 5737 / RFC 3849 documentation ranges).
_ANY = {AF_INET: ("192.0.2.1", "198.51.100.1"), AF_INET6: ("2001:db8:a::1", "2001:db8:b::1")}


def ruleset_source(spec: str) -> tuple[str, Path | None, str | None]:
    """(description, file, netns name) of a --check-against value; the file is read now,
    so an unreadable one is refused before anything starts."""
    if spec.startswith("netns:"):
        name = spec.removeprefix("netns:")
        resolve(name or None)  # an unknown namespace is refused now
        return f"the live ruleset of netns {name or '(current)'}", None, name
    path = Path(spec)
    if not path.is_file():
        raise ConfigError("--check-against", f"{spec}: no such ruleset file (or use "
                                             "netns:NAME for a namespace's live ruleset)")
    read_ruleset(path)
    return str(path), path, None


def read_ruleset(path: Path) -> str:
    """A ruleset file's text; unreadable or not text is a ConfigError."""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a text file"
        raise ConfigError("--check-against", f"{path}: {reason}") from None


def _host(text: str, family: int, role: int) -> str:
    if not text:
        return _ANY[family][role]
    if "/" not in text:
        return text
    network = ipaddress.ip_network(text)
    return str(next(network.hosts(), network.network_address))


def probes_for(entry: InventoryEntry) -> Iterator[Probe]:
    """The probes standing for one entry."""
    families = (AF_INET, AF_INET6) if entry.family == ANY_FAMILY else (entry.family,)
    for family in families:
        yield Probe(_HOOKS[entry.direction], family, entry.proto, _host(entry.src, family, 0),
                    _host(entry.dst, family, 1), entry.sport, entry.dport, entry.icmp_type,
                    entry.icmp_code)


def evaluate(ruleset: str, entries: list[InventoryEntry]
             ) -> list[tuple[InventoryEntry, Verdict]]:
    """Every confirmed entry with the kernel's verdict (the worst of its probes)."""
    confirmed = [entry for entry in entries if entry.confirmed]
    owners: list[int] = []
    probes: list[Probe] = []
    for number, entry in enumerate(confirmed):
        for probe in probes_for(entry):
            owners.append(number)
            probes.append(probe)
    verdicts = [Verdict.PASSED] * len(confirmed)
    for owner, verdict in zip(owners, check_ruleset(ruleset, probes), strict=True):
        if verdict is Verdict.DROPPED or verdicts[owner] is Verdict.PASSED:
            verdicts[owner] = verdict
    return list(zip(confirmed, verdicts, strict=True))


def check_renderer(spec: str, fmt: str, outcomes: list[bool]) -> Renderer:
    """A dump renderer reporting the flows the ruleset would not admit; appends to
    `outcomes` whether every confirmed flow passed."""
    description, path, netns = ruleset_source(spec)

    def render(entries: list[InventoryEntry], info: DumpInfo) -> bytes:
        ruleset = read_ruleset(path) if path is not None else \
            live_ruleset(resolve(netns or None))
        results = evaluate(ruleset, entries)
        outcomes.append(not any(v is Verdict.DROPPED for _, v in results))
        if fmt == "json":
            return _json_report(description, results, info)
        return _text_report(description, results, info).encode()

    return render


def _counts(results: list[tuple[InventoryEntry, Verdict]]) -> dict[str, int]:
    counts = {verdict.value: 0 for verdict in Verdict}
    for _, verdict in results:
        counts[verdict.value] += 1
    return counts


def _text_report(description: str, results: list[tuple[InventoryEntry, Verdict]],
                 info: DumpInfo) -> str:
    counts = _counts(results)
    lines = [f"# check against {description}: {len(results)} confirmed entries, "
             f"{counts['passed']} pass, {counts['dropped']} would be DROPPED, "
             f"{counts['untestable']} untestable ({info.events} events seen)"]
    shown = [(entry, verdict) for entry, verdict in results if verdict is not Verdict.PASSED]
    if shown:
        cells = [("VERDICT", "NETNS", *TABLE_HEADER)] + [
            (verdict.value, entry.netns or "-", *table_cells(entry)) for entry, verdict in shown]
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)
                            ).rstrip() for row in cells]
    return "\n".join(lines) + "\n"


def _json_report(description: str, results: list[tuple[InventoryEntry, Verdict]],
                 info: DumpInfo) -> bytes:
    return orjson.dumps({
        "check": {"against": description, "entries": len(results), **_counts(results),
                  "events": info.events},
        "flows": [{**entry_document(entry), "verdict": verdict.value}
                  for entry, verdict in results if verdict is not Verdict.PASSED],
    }, option=orjson.OPT_APPEND_NEWLINE)

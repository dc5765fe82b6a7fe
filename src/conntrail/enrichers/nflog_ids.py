"""NFLOG uid/gid matched to conntrack flows: recent first-packet records keyed by tuple.

Pure and synchronous (no I/O): the attribution stage feeds it the records of
`kernel/nflogsrc.py` and asks it, for each NEW event, who sent the flow's first packet. The
kernel queues a flow's record before its NEW event, so draining the NFLOG socket just before
resolving a batch of NEW events is enough; a record never asked for (its event was lost or
filtered) expires after `max_age_ns` or when more than `max_entries` are held.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from conntrail.errors import DecodeError
from conntrail.model import FlowTuple
from conntrail.netlink.nflog import Hook, NflogPacket, PacketTuple, packet_tuple

# The first nine fields of FlowTuple (all but the zone): a PacketTuple compares equal.
Key = tuple[int, int, str, str, int | None, int | None, int | None, int | None, int | None]


class Ids(NamedTuple):
    """The socket identity of a flow's first packet; both None: no user socket sent it (the
    kernel did, e.g. an IGMP report)."""

    uid: int | None
    gid: int | None


class _Entry(NamedTuple):
    ids: Ids
    seen_ns: int


class NflogIds:
    """Recent records, tuple → (uid, gid, seen); bounded by age and by count."""

    def __init__(self, max_age_ns: int = 30_000_000_000, max_entries: int = 65536,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.max_age_ns = max_age_ns
        self.max_entries = max_entries
        self._clock = clock
        # Insertion order is age order. OrderedDict, not dict: a dict whose front entries were
        # deleted scans the dead slots on every next(iter()).
        self._entries: OrderedDict[PacketTuple | Key, _Entry] = OrderedDict()
        self.counters = {"added": 0, "taken": 0, "missed": 0, "expired": 0, "evicted": 0,
                         "skipped": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, record: NflogPacket, now_ns: int | None = None) -> PacketTuple | None:
        """Remember a record logged at the output hook; returns its tuple, or None when it
        cannot be matched (another hook, no payload, headers not parsable)."""
        family = record.ip_family
        if record.hook != Hook.LOCAL_OUT or record.payload is None or family is None:
            self.counters["skipped"] += 1
            return None
        try:
            key = packet_tuple(record.payload, family)
        except DecodeError:
            key = None
        if key is None:
            self.counters["skipped"] += 1
            return None
        now = self._clock() if now_ns is None else now_ns
        entries = self._entries
        entries.pop(key, None)  # a repeated first packet (the first was dropped): newest wins
        entries[key] = _Entry(Ids(record.uid, record.gid), now)
        self.counters["added"] += 1
        self.expire(now)
        return key

    def take(self, flow: FlowTuple, now_ns: int | None = None) -> Ids | None:
        """The ids of the first packet of the flow whose original tuple is `flow`, removed
        once found; None when no recent record has that tuple."""
        now = self._clock() if now_ns is None else now_ns
        self.expire(now)
        entry = self._entries.pop(flow[:9], None)
        if entry is None:
            self.counters["missed"] += 1
            return None
        self.counters["taken"] += 1
        return entry.ids

    def expire(self, now_ns: int | None = None) -> None:
        """Drop records older than `max_age_ns`, then the oldest beyond `max_entries`."""
        now = self._clock() if now_ns is None else now_ns
        entries = self._entries
        oldest = now - self.max_age_ns
        while entries:
            key = next(iter(entries))
            if entries[key].seen_ns >= oldest:
                break
            entries.popitem(last=False)
            self.counters["expired"] += 1
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
            self.counters["evicted"] += 1

    def stats(self) -> dict[str, int]:
        """added, taken, missed (take found nothing), expired, evicted, skipped, held."""
        return {**self.counters, "held": len(self._entries)}

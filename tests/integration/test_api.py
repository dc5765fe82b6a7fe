"""The library API: sync and async iteration, fileno for other loops, netns by path."""

from __future__ import annotations

import asyncio
import select
import threading
import time

import conntrail
from conntrail.model import EventKind, FlowEvent
from tests.integration.netenv import Netns, NetnsFactory
from tests.integration.traffic import udp_exchange


def _traffic_later(ns: Netns, port: int) -> threading.Thread:
    def run() -> None:
        time.sleep(0.3)
        udp_exchange(ns, "127.0.0.1", port)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_sync_iterator(netns_factory: NetnsFactory) -> None:
    ns = netns_factory.new("host")
    thread = _traffic_later(ns, 6001)
    seen = []
    for event in conntrail.events(netns=ns.name, kinds={"new"}, timeout=3.0):
        seen.append(event)
        if event.flow.orig.dport == 6001:
            break
    thread.join()
    assert seen[-1].kind is EventKind.NEW and seen[-1].netns == ns.name
    assert "conntrail" not in ns.tables()  # the iterator's session cleaned up


def test_async_iterator(netns_factory: NetnsFactory) -> None:
    ns = netns_factory.new("host")

    async def first_new() -> FlowEvent:
        async for event in conntrail.aevents(netns=ns.name, kinds=("new",)):
            if event.flow.orig.dport == 6002:
                return event
        raise AssertionError("iterator ended")

    thread = _traffic_later(ns, 6002)
    event = asyncio.run(asyncio.wait_for(first_new(), timeout=10))
    thread.join()
    assert event.flow.orig.proto == 17


def test_listener_fileno_with_path(netns_factory: NetnsFactory) -> None:
    ns = netns_factory.new("host")
    with conntrail.Listener(netns=f"/run/netns/{ns.name}", kinds=["new"]) as listener:
        thread = _traffic_later(ns, 6003)
        readable, _, _ = select.select([listener.fileno()], [], [], 5)
        assert readable
        time.sleep(0.1)
        records = listener.read()
        thread.join()
    assert any(isinstance(r, FlowEvent) and r.flow.orig.dport == 6003 for r in records)
    assert listener.stats()["received"] >= 1

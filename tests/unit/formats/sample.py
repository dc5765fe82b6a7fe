"""Sample flow events for format tests, built from the model directly."""

from __future__ import annotations

from conntrail.model import Counters, CtStatus, EventKind, Flow, FlowEvent, FlowTuple

T0 = 1_795_313_157_861_752_000  # 2026-11-22T02:05:57.861752Z

SNAT_TCP = FlowEvent(
    EventKind.DESTROY,
    Flow(orig=FlowTuple(2, 6, "198.18.1.2", "198.18.2.2", 40000, 443),
         reply=FlowTuple(2, 6, "198.18.2.2", "198.18.2.1", 443, 61000),
         status=CtStatus.CONFIRMED | CtStatus.ASSURED | CtStatus.SEEN_REPLY | CtStatus.SRC_NAT,
         proto_state=7, mark=0x2A, zone=None, ct_id=99,
         counters_orig=Counters(6, 400), counters_reply=Counters(5, 1200),
         start_ns=T0, stop_ns=T0 + 1_500_000_000),
    "qrouter-1", T0 + 2_000_000_000)

PLAIN_UDP6 = FlowEvent(
    EventKind.NEW,
    Flow(orig=FlowTuple(10, 17, "2001:db8::1", "2001:db8::2", 5000, 53),
         reply=FlowTuple(10, 17, "2001:db8::2", "2001:db8::1", 53, 5000),
         status=CtStatus.CONFIRMED, timeout=30, ct_id=7),
    "", T0)

ICMP = FlowEvent(
    EventKind.NEW,
    Flow(orig=FlowTuple(2, 1, "198.18.1.2", "198.18.2.2", icmp_type=8, icmp_code=0, icmp_id=7),
         reply=FlowTuple(2, 1, "198.18.2.2", "198.18.1.2", icmp_type=0, icmp_code=0,
                         icmp_id=7),
         status=CtStatus.CONFIRMED, ct_id=3),
    "", T0)

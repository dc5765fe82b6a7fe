"""ECS JSON: field mapping for NAT, counters, ICMP; the lossless record layout."""

from __future__ import annotations

import json

from tests.unit.formats.sample import ICMP, PLAIN_UDP6, SNAT_TCP, T0

from conntrail.formats.jsonl import JsonFormat, record_document
from conntrail.model import LossNotice


def test_snat_destroy_as_ecs() -> None:
    doc = json.loads(JsonFormat()(SNAT_TCP))
    assert doc == {
        "@timestamp": "2026-11-22T02:05:59.361752Z",
        "event": {"kind": "event", "category": ["network"], "type": ["connection", "end"],
                  "action": "destroy", "start": "2026-11-22T02:05:57.861752Z",
                  "end": "2026-11-22T02:05:59.361752Z", "duration": 1_500_000_000},
        "network": {"type": "ipv4", "transport": "tcp", "iana_number": "6",
                    "bytes": 1600, "packets": 11},
        "source": {"ip": "198.18.1.2", "port": 40000, "bytes": 400, "packets": 6,
                   "nat": {"ip": "198.18.2.1", "port": 61000}},
        "destination": {"ip": "198.18.2.2", "port": 443, "bytes": 1200, "packets": 5},
        "conntrail": {"ct": {"id": 99, "status": ["SEEN_REPLY", "ASSURED", "CONFIRMED",
                                                  "SRC_NAT"],
                             "nat": "snat", "state": "TIME_WAIT", "mark": 42},
                      "netns": "qrouter-1"},
    }


def test_new_uses_receipt_time_without_kernel_stamp() -> None:
    doc = json.loads(JsonFormat()(PLAIN_UDP6))
    assert doc["@timestamp"] == "2026-11-22T02:05:57.861752Z"
    assert "nat" not in doc["source"] and "nat" not in doc["destination"]
    assert doc["network"]["transport"] == "udp" and doc["event"]["type"][1] == "start"


def test_icmp_under_conntrail() -> None:
    doc = json.loads(JsonFormat()(ICMP))
    assert doc["conntrail"]["icmp"] == {"type": 8, "code": 0, "id": 7, "reply_type": 0}
    assert "port" not in doc["source"]


def test_loss_notice() -> None:
    doc = json.loads(JsonFormat()(LossNotice("", "enobufs", None, T0)))
    assert doc["event"] == {"kind": "alert", "action": "events-lost", "reason": "enobufs"}
    assert doc["conntrail"] == {"lost": None}


def test_record_layout_is_lossless() -> None:
    doc = record_document(SNAT_TCP)
    assert doc["orig"]["sport"] == 40000 and doc["reply"]["dport"] == 61000
    assert doc["counters_reply"] == {"packets": 5, "bytes": 1200}
    assert doc["status"] == ["SEEN_REPLY", "ASSURED", "CONFIRMED", "SRC_NAT"]
    assert doc["kind"] == "destroy" and doc["netns"] == "qrouter-1"

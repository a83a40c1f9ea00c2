"""Floods and privacy through the real daemon (mqtt.md v1.1 rate limits and ids; issue 8)."""

from __future__ import annotations

import uuid

import pytest

from agent.sim.cabinet import SimulatedCabinet
from cabinet_helpers import wait_event


@pytest.fixture
def cabinet_id() -> str:
    return "CAB-FLOOD"


def test_a_garbage_flood_costs_bounded_records_and_never_delays_a_valid_command(cabinet: SimulatedCabinet) -> None:
    p = cabinet.platform
    assert p is not None
    seq_before = max(p.records) if p.records else 0
    for i in range(2000):
        p.publish_raw("cmd", b"garbage %d" % i)
    # a valid command right behind the flood is carried out
    sid = cabinet.authorize(1, "s-flood")
    assert sid
    rejected = [r for s, r in sorted(p.records.items()) if s > seq_before and r["type"] == "event"
                and r["body"]["kind"] == "command_rejected"]
    assert len(rejected) <= 60                               # 2,000 refusals, at most 60 records
    null_replies = [r for r in p.reply_log if r.get("id") is None]
    assert len(null_replies) <= 60                           # and at most 60 replies
    assert cabinet.agent is not None and cabinet.agent.poll() is None


def test_ids_longer_than_64_characters_are_refused_with_id_null(cabinet: SimulatedCabinet) -> None:
    p = cabinet.platform
    assert p is not None
    before = len(p.reply_log)
    p.send_command("status", {}, command_id="x" * 10_000)
    p.wait_for(lambda: len(p.reply_log) > before, 10, "a reply")
    reply = p.reply_log[-1]
    assert reply["id"] is None and reply["ok"] is False and len(reply["error"]) <= 200
    wait_event(cabinet, "command_rejected", command_id=None)


def test_shopper_references_stay_out_of_the_info_log(cabinet: SimulatedCabinet) -> None:
    shopper = f"shopper-{uuid.uuid4()}"
    sid = cabinet.shop(1, {"A1": 1}, shopper=shopper)
    sale = cabinet.wait_session_end(sid)
    assert sale["body"]["shopper"] == shopper           # the platform gets it, the log does not
    assert shopper not in cabinet.agent_log.read_text(errors="replace")

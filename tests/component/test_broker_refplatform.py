"""The private broker and the reference platform against a real Mosquitto.

Records here are built by hand from the wording of mqtt.md (hashlib + json), not with
agent code, so the platform's verification is checked against the spec itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.errors import SignatureError
from agent.platform.refplatform import ChainError, ReferencePlatform, record_hash
from agent.protocol import canonical, load_public_key, parse_ts, verify_signed
from agent.sim.broker import BrokerError, PrivateBroker

CAB = "CAB-0001"
ZEROS = "0" * 64
RefPlatformFactory = Callable[..., ReferencePlatform]


# -- hand-built records ---------------------------------------------------------------


def spec_hash(rec: dict[str, Any]) -> str:
    """mqtt.md, literally: sha256 of canonical JSON of exactly {seq, type, at, prev, body}."""
    core = {k: rec[k] for k in ("seq", "type", "at", "prev", "body")}
    canonical = json.dumps(core, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(canonical).hexdigest()


def make_chain(n: int) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    prev = ZEROS
    for seq in range(1, n + 1):
        if seq % 2:
            body: dict[str, Any] = {"sale_id": f"sale-{seq}", "items": [{"lane": "A1", "qty": 1}],
                                    "total_cents": 1590, "flags": []}
            rtype = "sale"
        else:
            body = {"kind": "door_forced", "door": seq}
            rtype = "event"
        rec = {"seq": seq, "type": rtype, "at": f"2026-11-29T08:15:{seq:02d}.000Z", "prev": prev, "body": body}
        rec["hash"] = spec_hash(rec)
        prev = rec["hash"]
        records.append(rec)
    return records


def batch(records: list[dict[str, Any]], cabinet: str = CAB) -> bytes:
    return json.dumps({"cabinet": cabinet, "records": records}).encode("utf-8")


# -- a bare MQTT peer standing in for the agent -----------------------------------------


class RawPeer:
    """A plain paho client: publishes what a test hands it, queues what it receives."""

    def __init__(self, broker: PrivateBroker, client_id: str) -> None:
        self.inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._subacks: queue.Queue[int] = queue.Queue()
        connected = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        client.on_connect = lambda c, u, f, rc, p: connected.set()
        client.on_subscribe = lambda c, u, mid, rcs, p: self._subacks.put(mid)
        client.on_message = lambda c, u, msg: self.inbox.put(msg)
        client.connect(broker.host, broker.port)
        client.loop_start()
        self.client = client
        assert connected.wait(5), "raw peer did not connect"

    def subscribe(self, topic: str) -> None:
        _, mid = self.client.subscribe(topic, 1)
        assert self._subacks.get(timeout=5) == mid

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(5)
        assert info.is_published()

    def next_json(self, timeout: float = 5.0) -> tuple[str, Any]:
        msg = self.inbox.get(timeout=timeout)
        return msg.topic, json.loads(msg.payload) if msg.payload else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peer(broker: PrivateBroker) -> Iterator[Callable[[str], RawPeer]]:
    peers: list[RawPeer] = []

    def make(client_id: str = "cab-CAB-0001") -> RawPeer:
        peers.append(RawPeer(broker, client_id))
        return peers[-1]

    yield make
    for p in peers:
        p.close()


def mqtt_roundtrip(b: PrivateBroker) -> None:
    """Publish and receive one message through broker ``b``."""
    p = RawPeer(b, "roundtrip")
    try:
        p.subscribe("probe")
        p.publish("probe", b"{}")
        assert p.next_json() == ("probe", {})
    finally:
        p.close()


# -- broker -----------------------------------------------------------------------------


def test_broker_free_port_and_two_at_once(broker: PrivateBroker, tmp_path: Any) -> None:
    with PrivateBroker(log_dir=tmp_path / "second") as second:
        assert broker.port != second.port
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        mqtt_roundtrip(broker)
        mqtt_roundtrip(second)
    assert not second.running
    with pytest.raises(OSError):
        socket.create_connection((second.host, second.port), timeout=1).close()


def test_broker_on_a_taken_port_fails_clearly(broker: PrivateBroker) -> None:
    with pytest.raises(BrokerError, match="Address already in use"):
        PrivateBroker(port=broker.port)
    mqtt_roundtrip(broker)  # the first one is unharmed


def test_restart_keeps_port_and_platform_reconnects(broker: PrivateBroker, refplatform: RefPlatformFactory,
        peer: Callable[[str], RawPeer]) -> None:
    platform = refplatform(CAB)
    port, pid = broker.port, broker.pid
    broker.restart()
    assert (broker.port, broker.running) == (port, True)
    assert broker.pid != pid
    platform.wait_for(lambda: platform.connections >= 2 and platform.ready, 10, "platform reconnected")
    # Without persistence the broker forgot the subscriptions: the platform must have renewed them.
    peer("agent").publish(platform.records_topic, batch(make_chain(1)))
    platform.wait_contiguous(1, 5)


# -- records: chain verification and acks ------------------------------------------------


def test_valid_chain_is_stored_and_acked(refplatform: RefPlatformFactory,
        peer: Callable[[str], RawPeer]) -> None:
    platform = refplatform(CAB)
    agent = peer("agent")
    agent.subscribe(platform.ack_topic)
    records = make_chain(3)
    agent.publish(platform.records_topic, batch(records))

    platform.wait_contiguous(3, 5)
    assert agent.next_json() == (platform.ack_topic, {"upto": 3})
    assert (platform.chain_errors, platform.errors, platform.duplicates) == ([], 0, 0)
    assert platform.records == {r["seq"]: r for r in records}
    assert platform.records_in_order() == records
    assert platform.sales() == [records[0]["body"], records[2]["body"]]
    assert platform.events() == [records[1]["body"]]
    assert platform.events("door_forced") == [records[1]["body"]]
    assert platform.events("agent_started") == []


def test_broken_hash_is_a_chain_error_and_not_acked(refplatform: RefPlatformFactory,
        peer: Callable[[str], RawPeer]) -> None:
    platform = refplatform(CAB)
    agent = peer("agent")
    agent.subscribe(platform.ack_topic)
    records = make_chain(3)
    records[1]["body"]["door"] = 99  # content changed, hash kept

    agent.publish(platform.records_topic, batch(records))
    platform.wait_for(lambda: platform.batches == 1, 5, "batch processed")
    assert [(e.seq, e.reason) for e in platform.chain_errors] == [(2, "bad_hash")]
    assert platform.contiguous_upto == 1
    assert sorted(platform.records) == [1, 3]  # 3 itself is intact; 2 is missing
    assert agent.next_json() == (platform.ack_topic, {"upto": 1})


def test_broken_prev_link_is_a_chain_error(refplatform: RefPlatformFactory,
        peer: Callable[[str], RawPeer]) -> None:
    platform = refplatform(CAB)
    records = make_chain(3)
    records[1]["prev"] = "f" * 64
    records[1]["hash"] = spec_hash(records[1])  # self-consistent, but not linked to seq 1

    peer("agent").publish(platform.records_topic, batch(records))
    platform.wait_for(lambda: platform.batches == 1, 5, "batch processed")
    errors = platform.chain_errors
    assert [(e.seq, e.reason) for e in errors] == [(2, "bad_prev")]
    assert isinstance(errors[0], ChainError) and "seq 2" in str(errors[0])
    # seq 3 still points at the real seq 2, which the platform never got: held, not contiguous.
    assert platform.contiguous_upto == 1


def test_first_record_must_point_at_zeros(refplatform: RefPlatformFactory,
        peer: Callable[[str], RawPeer]) -> None:
    platform = refplatform(CAB)
    rec = make_chain(1)[0]
    rec["prev"] = "1" * 64
    rec["hash"] = spec_hash(rec)
    peer("agent").publish(platform.records_topic, batch([rec]))
    platform.wait_for(lambda: platform.batches == 1, 5, "batch processed")
    assert [(e.seq, e.reason) for e in platform.chain_errors] == [(1, "bad_prev")]
    assert platform.records == {}


def test_duplicates_are_counted_and_reacked_conflicts_are_errors(refplatform: RefPlatformFactory,
        peer: Callable[[str], RawPeer]) -> None:
    platform = refplatform(CAB)
    agent = peer("agent")
    agent.subscribe(platform.ack_topic)
    records = make_chain(3)
    agent.publish(platform.records_topic, batch(records))
    agent.publish(platform.records_topic, batch(records[1:]))  # a resend after a lost ack

    platform.wait_for(lambda: platform.batches == 2, 5, "both batches processed")
    assert platform.duplicates == 2
    assert platform.chain_errors == []
    assert len(platform.records) == 3
    # The resend is acked again, else an agent whose ack was lost would resend forever.
    assert [agent.next_json()[1], agent.next_json()[1]] == [{"upto": 3}, {"upto": 3}]

    forged = dict(records[2], body={"kind": "door_forced", "door": 7})
    forged["hash"] = spec_hash(forged)
    agent.publish(platform.records_topic, batch([forged]))
    platform.wait_for(lambda: platform.batches == 3, 5, "forged batch processed")
    assert [(e.seq, e.reason) for e in platform.chain_errors] == [(3, "conflict")]
    assert platform.records[3] == records[2]


def test_out_of_order_batches_ack_only_contiguous(refplatform: RefPlatformFactory,
        peer: Callable[[str], RawPeer]) -> None:
    platform = refplatform(CAB)
    agent = peer("agent")
    agent.subscribe(platform.ack_topic)
    records = make_chain(4)
    agent.publish(platform.records_topic, batch(records[2:]))
    platform.wait_for(lambda: platform.batches == 1, 5, "late half processed")
    assert (platform.contiguous_upto, platform.acks_sent) == (0, [])

    agent.publish(platform.records_topic, batch(records[:2]))
    platform.wait_contiguous(4, 5)
    assert agent.next_json() == (platform.ack_topic, {"upto": 4})
    assert platform.chain_errors == []


def test_malformed_messages_are_counted_and_the_platform_keeps_working(refplatform: RefPlatformFactory,
        peer: Callable[[str], RawPeer]) -> None:
    platform = refplatform(CAB)
    agent = peer("agent")
    bad = [
        b"not json",
        b"\xff\xfe",
        b"[]",
        json.dumps({"cabinet": "CAB-9999", "records": make_chain(1)}).encode(),
        batch([{"seq": True, "type": "sale"}]),
        json.dumps({"records": make_chain(1)}).encode(),
    ]
    for payload in bad:
        agent.publish(platform.records_topic, payload)
    agent.publish(platform.reply_topic, b"{}")
    agent.publish(platform.status_topic, b"nope")
    agent.publish(platform.records_topic, batch(make_chain(2)))

    platform.wait_contiguous(2, 5)
    assert platform.errors == len(bad) + 2
    assert platform.chain_errors == []


def test_non_consecutive_batch_breaks_the_batch_rule(refplatform: RefPlatformFactory,
        peer: Callable[[str], RawPeer]) -> None:
    platform = refplatform(CAB)
    records = make_chain(3)
    peer("agent").publish(platform.records_topic, batch([records[0], records[2], records[1]]))
    platform.wait_contiguous(3, 5)  # each record is fine on its own
    assert platform.errors == 1
    assert "consecutive" in platform.error_messages[0]


def test_manual_ack_withholds_then_acks(refplatform: RefPlatformFactory,
        peer: Callable[[str], RawPeer]) -> None:
    platform = refplatform(CAB, auto_ack=False)
    agent = peer("agent")
    agent.subscribe(platform.ack_topic)
    records = make_chain(4)
    agent.publish(platform.records_topic, batch(records[:3]))
    platform.wait_contiguous(3, 5)
    assert platform.acks_sent == []  # an auto ack is recorded before waiters are woken

    assert platform.ack(2) == 2
    # Acks arrive in publish order, so had an auto ack {"upto": 3} gone out it would come first.
    assert agent.next_json() == (platform.ack_topic, {"upto": 2})

    platform.set_auto_ack(True)  # releases what is held at once
    assert agent.next_json() == (platform.ack_topic, {"upto": 3})
    agent.publish(platform.records_topic, batch(records[3:]))
    assert agent.next_json() == (platform.ack_topic, {"upto": 4})
    assert platform.acks_sent == [2, 3, 4]


def test_record_hash_is_byte_exact() -> None:
    """A fixed example hashed outside Python (printf ... | sha256sum): key order, separators, UTF-8."""
    rec = {
        "seq": 1,
        "type": "event",
        "at": "2026-11-29T08:15:02.123Z",
        "prev": ZEROS,
        "body": {"kind": "restock", "lane": "A1", "qty": 2, "name": "香菇 250 g"},
        "hash": "ignored by the hash",
        "extra": "unknown fields are not hashed",
    }
    expected = "e87ca49ce382478df1da881192804ccb7a6038ace681a83722ae8fad1c7e1900"
    assert record_hash(rec) == expected
    assert spec_hash(rec) == expected


def test_record_hash_agrees_with_wire_canonical_on_awkward_values() -> None:
    """The platform's cached encoder must produce wire.canonical()'s bytes exactly."""
    body = {"w": -501.2, "tiny": 2.5e-7, "big": 1e22, "esc": 'a"b\\c\n\t', "u": "香菇\u2028é", "emoji": "\U0001f344",
            "none": None, "flags": [], "yes": True, "nested": {"b": 1, "a": [{"z": 0, "y": -0.0}]}}
    rec = {"seq": 7, "type": "sale", "at": "2026-11-29T08:15:02.123Z", "prev": "ab" * 32, "body": body}
    core = {k: rec[k] for k in ("seq", "type", "at", "prev", "body")}
    assert record_hash(rec) == hashlib.sha256(canonical(core)).hexdigest() == spec_hash(rec)


def test_platform_accepts_the_byte_exact_example(refplatform: RefPlatformFactory,
        peer: Callable[[str], RawPeer]) -> None:
    platform = refplatform(CAB)
    payload = (
        '{"cabinet":"CAB-0001","records":[{"seq":1,"type":"event","at":"2026-11-29T08:15:02.123Z",'
        '"prev":"' + ZEROS + '","hash":"e87ca49ce382478df1da881192804ccb7a6038ace681a83722ae8fad1c7e1900",'
        '"body":{"qty":2,"name":"香菇 250 g","lane":"A1","kind":"restock"}}]}'
    ).encode("utf-8")
    peer("agent").publish(platform.records_topic, payload)
    platform.wait_contiguous(1, 5)
    assert platform.chain_errors == []


# -- commands -----------------------------------------------------------------------------


def test_signed_command_verifies_and_tampering_does_not(refplatform: RefPlatformFactory,
        peer: Callable[[str], RawPeer]) -> None:
    platform = refplatform(CAB)
    key = load_public_key(platform.public_key_b64)
    args = {"door": 1, "session_id": "5f0c6c1e-8d1a-4b8e-9a57-3c1d2b7e4a10", "shopper": "s-1", "auth": "qr"}
    cmd = platform.make_command("open_door", args, ttl_s=300)

    verify_signed(cmd, key)
    assert cmd["issued_at"].endswith("Z") and cmd["expires_at"].endswith("Z")
    assert parse_ts(cmd["expires_at"]) - parse_ts(cmd["issued_at"]) == dt.timedelta(seconds=300)
    for field, value in [("args", dict(args, door=2)), ("expires_at", "2099-01-01T00:00:00.000Z"), ("type", "resend")]:
        with pytest.raises(SignatureError):
            verify_signed(dict(cmd, **{field: value}), key)
    with pytest.raises(SignatureError):
        verify_signed(cmd, load_public_key(ReferencePlatform("h", 1, CAB).public_key_b64))

    explicit = platform.make_command("status", {}, issued_at="2026-11-29T08:00:00.000Z", command_id="fixed-id")
    assert (explicit["id"], explicit["expires_at"]) == ("fixed-id", "2026-11-29T08:01:00.000Z")

    agent = peer("agent")
    agent.subscribe(platform.cmd_topic)
    command_id = platform.send_command("status", {})
    topic, received = agent.next_json()
    assert (topic, received["id"], received["type"]) == (platform.cmd_topic, command_id, "status")
    verify_signed(received, key)


def test_wait_reply_returns_the_agents_replies(refplatform: RefPlatformFactory,
        peer: Callable[[str], RawPeer]) -> None:
    platform = refplatform(CAB)
    agent = peer("agent")
    agent.subscribe(platform.cmd_topic)
    command_id = platform.send_command("status", {})
    _, cmd = agent.next_json()

    reply = {"id": cmd["id"], "ok": True, "at": "2026-11-29T08:15:02.123Z", "error": None, "result": {}}
    agent.publish(platform.reply_topic, json.dumps(reply).encode())
    assert platform.wait_reply(command_id, timeout=5) == reply

    replay = dict(reply, ok=False, error="replayed command")
    agent.publish(platform.reply_topic, json.dumps(replay).encode())
    assert platform.wait_reply(command_id, timeout=5, nth=2) == replay
    assert platform.replies[command_id] == replay
    with pytest.raises(TimeoutError, match="reply #1 to command nobody"):
        platform.wait_reply("nobody", timeout=0.2)


# -- catalog and status ---------------------------------------------------------------------


def test_retained_catalog_reaches_a_late_subscriber_until_cleared(refplatform: RefPlatformFactory,
        peer: Callable[[str], RawPeer]) -> None:
    platform = refplatform(CAB)
    product = {"gtin": "06901234567892", "name": "Dried shiitake 250 g", "cert_id": "PA-2026-000123",
               "valid_from": "2026-01-01", "valid_until": "2027-12-31", "unit_weight_g": 250.0,
               "weight_tolerance_g": 6.0}
    doc = platform.make_catalog(42, [product], revoked=["06900000000014"])
    platform.publish_catalog(doc)

    late = peer("late-1")
    late.subscribe("cab/v1/catalog")
    msg = late.inbox.get(timeout=5)
    assert msg.retain and json.loads(msg.payload) == doc
    verify_signed(json.loads(msg.payload), load_public_key(platform.public_key_b64))
    assert (doc["version"], doc["base_version"], doc["revoked"]) == (42, None, ["06900000000014"])

    platform.clear_retained_catalog()
    later = peer("late-2")
    later.subscribe("cab/v1/catalog")
    # Retained messages follow the SUBACK at once; a marker published now comes after any.
    platform.publish_raw("cab/v1/catalog", b'{"marker":1}')
    assert later.next_json() == ("cab/v1/catalog", {"marker": 1})


def test_status_is_tracked(refplatform: RefPlatformFactory,
        peer: Callable[[str], RawPeer]) -> None:
    platform = refplatform(CAB)
    agent = peer("agent")
    agent.publish(platform.status_topic, json.dumps({"online": True, "cabinet": CAB, "last_seq": 0}).encode())
    agent.publish(platform.status_topic, json.dumps({"online": False, "cabinet": CAB}).encode())
    platform.wait_for(lambda: len(platform.statuses) == 2, 5, "two statuses")
    assert platform.status == {"online": False, "cabinet": CAB}
    assert platform.errors == 0

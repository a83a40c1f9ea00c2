"""The link against NATS's MQTT gateway (MQTT 3.1.1 only, sessions and retained messages in
JetStream): MQTT 5 is refused at CONNECT, 3.1.1 works, including the persistent session, held
commands and a reconnect that does not download the retained snapshot again."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.events import LinkDown, LinkUp
from agent.sim.nats import PrivateNats
from agent.sim.tcpproxy import TcpProxy
from helpers import wait_until
from linkkit import CMD, RECORDS, SNAPSHOT, LinkRig, Peer, platform_config

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[PrivateNats]:
    # NATS delivers an unacknowledged QoS 1 message again when its ack_wait runs out (30 s by
    # default), not at a reconnect: 1 s here so that the redelivery is quick to see
    n = PrivateNats(log_dir=tmp_path / "nats-log", ack_wait_s=1.0)
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def peer(nats: PrivateNats) -> Iterator[Peer]:
    p = Peer(nats.host, nats.port)
    try:
        yield p
    finally:
        p.close()


def test_mqtt5_is_refused_with_a_hint(nats: PrivateNats, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.mqtt_link")
    rig = LinkRig(platform_config(nats.host, nats.port, mqtt_version="5"))
    rig.link.start()
    try:
        wait_until(lambda: sum(r.name == "agent.mqtt_link" and r.levelno >= logging.WARNING
                               for r in caplog.records) >= 2, 10, "two refused attempts")
        assert rig.link.stats.connects == 0
    finally:
        rig.stop()


def test_commands_records_and_held_commands_over_nats(nats: PrivateNats, peer: Peer) -> None:
    cfg = platform_config(nats.host, nats.port, mqtt_version="3.1.1")
    peer.subscribe(RECORDS)
    first = LinkRig(cfg).start()
    peer.publish(CMD, b"open door")
    assert first.inbound(CMD).payload == b"open door"
    assert first.link.publish(RECORDS, b"batch") is not None
    assert peer.message(RECORDS).payload == b"batch"
    first.stop()  # never acked

    second = LinkRig(cfg).start()
    assert second.link.stats.session_present
    again = second.inbound(CMD)  # within ack_wait
    assert again.payload == b"open door"
    second.link.ack(again)
    peer.publish(CMD, b"barrier")
    barrier = second.inbound(CMD)
    second.link.ack(barrier)
    second.stop()

    third = LinkRig(cfg).start()
    peer.publish(CMD, b"barrier 2")
    assert third.inbound(CMD).payload == b"barrier 2"
    third.stop()
    assert [m.payload for m in third.inbounds(CMD)] == [b"barrier 2"]


def test_a_reconnect_into_the_session_does_not_download_the_snapshot_again(nats: PrivateNats, peer: Peer) -> None:
    snapshot = b"[" + b"5" * (3 << 20) + b"]"
    peer.publish(SNAPSHOT, snapshot, retain=True)
    with TcpProxy(nats.host, nats.port) as proxy:
        rig = LinkRig(platform_config(proxy.host, proxy.port, mqtt_version="3.1.1")).start()
        try:
            doc = rig.doc(timeout=20)
            assert len(doc) == len(snapshot)
            doc.finish()
            peer.subscribe(RECORDS)
            assert rig.link.publish(RECORDS, b"barrier") is not None
            peer.message(RECORDS)
            before = proxy.down_bytes
            proxy.cut()
            rig.next(LinkDown)
            rig.next(LinkUp)
            assert rig.link.stats.session_present
            peer.publish(CMD, b"barrier")
            assert rig.inbound(CMD).payload == b"barrier"
            assert proxy.down_bytes - before < len(snapshot) // 100
            assert rig.docs.empty()
        finally:
            rig.stop()

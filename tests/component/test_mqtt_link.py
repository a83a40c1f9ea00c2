"""agent.mqtt_link against a real Mosquitto: versions, acknowledgements, subscriptions, sizes,
and the one-owner rule for the socket (mqtt.md v1.1)."""

from __future__ import annotations

import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.events import Inbound, LinkDown, LinkUp
from agent.mqtt_client import LinkClient
from agent.sim.broker import PrivateBroker
from agent.sim.tcpproxy import TcpProxy
from helpers import wait_until
from linkkit import ACK, CMD, DELTA, RECORDS, SNAPSHOT, STATUS, LinkRig, Peer, platform_config

pytestmark = pytest.mark.timeout(60)
VERSIONS = ["5", "3.1.1"]
MB = 1 << 20


@pytest.fixture
def peer(broker: PrivateBroker) -> Iterator[Peer]:
    p = Peer(broker.host, broker.port)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def proxy(broker: PrivateBroker) -> Iterator[TcpProxy]:
    with TcpProxy(broker.host, broker.port) as p:
        yield p


@pytest.mark.parametrize("version", VERSIONS)
def test_commands_in_records_out(broker: PrivateBroker, peer: Peer, version: str) -> None:
    peer.subscribe(RECORDS)
    rig = LinkRig(platform_config(broker.host, broker.port, mqtt_version=version)).start()
    try:
        peer.publish(CMD, b'{"id":"c1"}')
        msg = rig.inbound(CMD)
        assert msg.payload == b'{"id":"c1"}' and msg.ack is not None and msg.ack.qos == 1
        peer.publish(ACK, b'{"upto":1}')
        assert rig.inbound(ACK).ack is None  # the link acked it itself
        assert rig.link.publish(RECORDS, b"batch") is not None
        assert peer.message(RECORDS).payload == b"batch"
    finally:
        rig.stop()


def test_publish_while_offline_returns_none_and_stop_says_last_words(broker: PrivateBroker, peer: Peer) -> None:
    peer.subscribe(STATUS)
    rig = LinkRig(platform_config(broker.host, broker.port))
    assert rig.link.publish(RECORDS, b"x") is None  # not started: offline
    rig.start()
    rig.stop(last_words=(STATUS, b'{"online":false,"bye":true}'))
    assert peer.message(STATUS).payload == b'{"online":false,"bye":true}'
    assert not rig.link.connected
    assert rig.link.publish(RECORDS, b"x") is None


def test_every_read_and_write_of_the_socket_is_on_the_link_thread(broker: PrivateBroker, peer: Peer,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Publishing from three threads while commands arrive: paho only ever touches the socket
    from the link's own thread (the TLS drops came from two threads in one SSLSocket)."""
    threads: set[str] = set()
    for name in ("_sock_recv", "_sock_send", "_recv_into"):
        original = getattr(LinkClient, name)

        def spy(self: LinkClient, *args: object, _original: object = original) -> object:
            threads.add(threading.current_thread().name)
            return _original(self, *args)  # type: ignore[operator]

        monkeypatch.setattr(LinkClient, name, spy)
    peer.subscribe(RECORDS)
    rig = LinkRig(platform_config(broker.host, broker.port), held=()).start()
    try:
        def publisher(n: int) -> None:
            for i in range(200):
                assert rig.link.publish(RECORDS, f"{n}:{i}".encode()) is not None

        workers = [threading.Thread(target=publisher, args=(n,), name=f"core-{n}") for n in range(3)]
        for w in workers:
            w.start()
        for i in range(50):
            peer.client.publish(CMD, f"cmd {i}".encode(), qos=1)
        for w in workers:
            w.join()
        got = {peer.message(RECORDS).payload for _ in range(600)}
        assert len(got) == 600
        wait_until(lambda: len(rig.inbounds(CMD)) == 50, 10, "50 commands")
    finally:
        rig.stop()
    assert threads == {"mqtt"}


@pytest.mark.parametrize("version", VERSIONS)
def test_a_held_command_comes_back_until_it_is_acked(broker: PrivateBroker, peer: Peer, version: str) -> None:
    """The core acks a command once its outcome is committed; until then a restart gets it again."""
    cfg = platform_config(broker.host, broker.port, mqtt_version=version)
    first = LinkRig(cfg).start()
    peer.publish(CMD, b"open door 1")
    assert first.inbound(CMD).payload == b"open door 1"
    first.stop()  # like a crash before the journal commit: never acked

    second = LinkRig(cfg).start()
    again = second.inbound(CMD)
    assert again.payload == b"open door 1"
    second.link.ack(again)
    peer.publish(CMD, b"barrier 1")
    barrier = second.inbound(CMD)
    assert barrier.payload == b"barrier 1"
    second.link.ack(barrier)
    second.stop()  # the acks handed over before stop() go out before the DISCONNECT

    third = LinkRig(cfg).start()
    peer.publish(CMD, b"barrier 2")
    assert third.inbound(CMD).payload == b"barrier 2"  # the acked command did not come back
    third.stop()
    assert [m.payload for m in third.inbounds(CMD)] == [b"barrier 2"]


@pytest.mark.parametrize("version", VERSIONS)
def test_reconnect_into_the_session_while_a_command_is_held(broker: PrivateBroker, proxy: TcpProxy, peer: Peer,
                                                            version: str) -> None:
    """The broker resends an unacknowledged command after a reconnect: it is not handed to the core
    twice; an ack given while offline goes out after the reconnect, and then nothing comes back."""
    rig = LinkRig(platform_config(proxy.host, proxy.port, mqtt_version=version)).start()
    try:
        peer.publish(CMD, b"held")
        held = rig.inbound(CMD)
        proxy.cut()
        rig.next(LinkDown)
        rig.next(LinkUp)
        peer.publish(CMD, b"barrier 1")
        assert rig.inbound(CMD).payload == b"barrier 1"
        assert rig.link.stats.duplicates_dropped == 1  # mosquitto resent "held" with DUP set

        proxy.refusing = True
        proxy.cut()
        rig.next(LinkDown)
        rig.link.ack(held)  # committed while offline
        proxy.refusing = False
        rig.next(LinkUp)
        peer.publish(CMD, b"barrier 2")
        assert rig.inbound(CMD).payload == b"barrier 2"
        proxy.cut()
        rig.next(LinkUp)
        peer.publish(CMD, b"barrier 3")
        assert rig.inbound(CMD).payload == b"barrier 3"
        assert [m.payload for m in rig.inbounds(CMD)] == [b"held", b"barrier 1", b"barrier 2", b"barrier 3"]
    finally:
        rig.stop()


@pytest.mark.parametrize("version", VERSIONS)
def test_a_reconnect_into_the_session_does_not_download_the_snapshot_again(
        broker: PrivateBroker, proxy: TcpProxy, peer: Peer, version: str) -> None:
    snapshot = b"[" + b"7" * (3 * MB) + b"]"
    peer.publish(SNAPSHOT, snapshot, retain=True)
    rig = LinkRig(platform_config(proxy.host, proxy.port, mqtt_version=version)).start()
    try:
        doc = rig.doc()
        assert len(doc) == len(snapshot) and not doc.in_memory
        doc.finish()  # installed: acknowledged
        peer.subscribe(RECORDS)
        assert rig.link.publish(RECORDS, b"barrier") is not None  # written after the PUBACK
        peer.message(RECORDS)
        first_connection = proxy.down_bytes
        assert first_connection >= len(snapshot)
        subacks = rig.link.stats.subacks

        proxy.cut()
        rig.next(LinkDown)
        rig.next(LinkUp)
        if version == "5":  # subscribed again, with Retain Handling 1
            wait_until(lambda: rig.link.stats.subacks > subacks, 10, "the SUBACK of the reconnect")
        peer.publish(CMD, b"barrier")  # after the subscription: would come after the snapshot
        assert rig.inbound(CMD).payload == b"barrier"
        second_connection = proxy.down_bytes - first_connection
        assert second_connection < len(snapshot) // 100, second_connection
        assert rig.docs.empty()
    finally:
        rig.stop()


@pytest.mark.parametrize("version", VERSIONS)
def test_subscribed_again_after_a_broker_restart_without_persistence(
        broker: PrivateBroker, version: str) -> None:
    rig = LinkRig(platform_config(broker.host, broker.port, mqtt_version=version)).start()
    try:
        broker.restart()  # no persistence: our session and subscriptions are gone
        rig.next(LinkDown)
        rig.next(LinkUp, timeout=15)
        wait_until(lambda: rig.link.stats.subacks >= 2, 10, "subscribed again")
        peer = Peer(broker.host, broker.port)
        try:
            peer.publish(DELTA, b'{"delta":1}')
            peer.publish(CMD, b"after restart")
            doc = rig.doc()
            assert doc.topic == DELTA and doc.read() == b'{"delta":1}'
            doc.finish()
            assert rig.inbound(CMD).payload == b"after restart"
        finally:
            peer.close()
    finally:
        rig.stop()


@pytest.mark.parametrize("version", VERSIONS)
def test_resubscribe_brings_the_retained_snapshot_again_without_a_reconnect(
        broker: PrivateBroker, peer: Peer, version: str) -> None:
    peer.publish(SNAPSHOT, b'{"snapshot":1}', retain=True)
    rig = LinkRig(platform_config(broker.host, broker.port, mqtt_version=version)).start()
    try:
        rig.doc().finish()
        rig.link.resubscribe(SNAPSHOT)  # what the core does after a base_mismatch
        again = rig.doc()
        assert again.read() == b'{"snapshot":1}'
        again.finish()
        assert rig.link.stats.connects == 1
    finally:
        rig.stop()


@pytest.mark.parametrize("version", VERSIONS)
def test_a_message_above_max_message_mb_is_dropped_and_not_sent_again(
        broker: PrivateBroker, proxy: TcpProxy, peer: Peer, version: str) -> None:
    rig = LinkRig(platform_config(proxy.host, proxy.port, mqtt_version=version, max_message_mb=1)).start()
    try:
        peer.publish(DELTA, b"d" * (MB + MB // 2))
        peer.publish(CMD, b"barrier 1")
        assert rig.inbound(CMD).payload == b"barrier 1"
        # MQTT 5: the broker itself holds it back (our Maximum Packet Size); 3.1.1: read and discarded
        assert rig.link.stats.dropped_too_large == (0 if version == "5" else 1)
        # what the link sent before this reached the broker (one TCP stream through the proxy),
        # its PUBACK of the dropped message included: only then is the connection cut
        peer.subscribe("probe/ordered")
        rig.link.publish("probe/ordered", b"after the puback")
        assert peer.message("probe/ordered").payload == b"after the puback"
        proxy.cut()
        rig.next(LinkUp)
        peer.publish(CMD, b"barrier 2")
        assert rig.inbound(CMD).payload == b"barrier 2"
        assert rig.docs.empty()
        assert rig.link.stats.dropped_too_large == (0 if version == "5" else 1)  # acknowledged: not resent
    finally:
        rig.stop()


def test_a_large_document_is_streamed_to_a_file_not_held(broker: PrivateBroker, peer: Peer, tmp_path: Path) -> None:
    body = bytes(range(256)) * (24 * MB // 256)
    spool = tmp_path / "spool"
    spool.mkdir()
    peer.publish(SNAPSHOT, body, retain=True)  # before tracing: the publisher's copies are not ours
    rig = LinkRig(platform_config(broker.host, broker.port), spool_dir=spool)
    tracemalloc.start()
    rig.start()
    try:
        doc = rig.doc(timeout=30)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert not doc.in_memory and len(doc) == len(body)
        assert peak < len(body) // 8, f"{peak} bytes allocated while receiving {len(body)}"
        with doc.open() as f:
            assert f.read() == body
        doc.finish()
        assert list(spool.iterdir()) == []  # unnamed files: nothing left behind
    finally:
        rig.stop()


def test_a_large_command_reaches_the_core_as_bytes(broker: PrivateBroker, peer: Peer) -> None:
    rig = LinkRig(platform_config(broker.host, broker.port)).start()
    try:
        payload = b"{" + b" " * (2 * MB) + b"}"
        peer.publish(CMD, payload)
        msg = rig.inbound(CMD)
        assert isinstance(msg, Inbound) and msg.payload == payload and msg.ack is not None
        rig.link.ack(msg)
    finally:
        rig.stop()


def test_without_a_catalog_sink_documents_go_to_the_inbox(broker: PrivateBroker, peer: Peer) -> None:
    rig = LinkRig(platform_config(broker.host, broker.port), held=(), sink=False).start()
    try:
        peer.publish(SNAPSHOT, b'{"v":1}', retain=True)
        msg = rig.inbound(SNAPSHOT)
        assert msg.payload == b'{"v":1}' and msg.ack is None
    finally:
        rig.stop()

"""What the platform-link tests share: a link on an inbox, a platform-side peer, waiting on the inbox.

``from linkkit import Peer, LinkRig, ...`` (tests/ is on sys.path, like ``helpers``).
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import PlatformConfig
from agent.events import Inbound, LinkUp
from agent.mqtt_link import MqttLink
from agent.mqtt_payload import Document
from agent.protocol import public_key_b64
from helpers import wait_until

T = TypeVar("T")
CAB = "CAB-LK"
CMD = f"cab/v1/{CAB}/cmd"
ACK = f"cab/v1/{CAB}/records/ack"
RECORDS = f"cab/v1/{CAB}/records"
STATUS = f"cab/v1/{CAB}/status"
SNAPSHOT = "cab/v1/catalog"
DELTA = "cab/v1/catalog/delta"
SUBSCRIPTIONS = [ACK, CMD, SNAPSHOT, DELTA, f"cab/v1/{CAB}/catalog"]
PUBLIC_KEY = public_key_b64(Ed25519PrivateKey.generate())


def platform_config(host: str, port: int, **kw: Any) -> PlatformConfig:
    kw.setdefault("public_key", PUBLIC_KEY)
    kw.setdefault("connect_timeout_s", 5.0)
    kw.setdefault("reconnect_spread_s", 0.2)    # one link, no fleet: reconnect as quickly as the tests want
    return PlatformConfig(host=host, port=port, **kw)


class LinkRig:
    """An MqttLink with the inbox the core would read and the documents the catalog worker would get."""

    def __init__(self, cfg: PlatformConfig, *, held: Iterable[str] = (CMD,),
                 sink: bool | Callable[[Document], None] = True, spool_dir: Path | None = None, **kw: Any) -> None:
        """``sink``: True collects catalog documents in ``docs``, a callable gets them, False: the inbox."""
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.docs: queue.Queue[Document] = queue.Queue()
        kw.setdefault("backoff_base_s", 0.05)
        kw.setdefault("backoff_cap_s", 0.5)
        catalog_sink = sink if callable(sink) else (self.docs.put if sink else None)
        self.link = MqttLink(cfg, CAB, self.inbox, SUBSCRIPTIONS, b'{"online":false}', STATUS,
                             held_topics=held, catalog_sink=catalog_sink, spool_dir=spool_dir, **kw)
        self.seen: list[Any] = []

    def start(self, timeout: float = 10.0) -> LinkRig:
        """Start and return once subscribed (LinkUp comes before the SUBACK: a message published
        in between would find no subscription yet in a new session)."""
        self.link.start()
        self.next(LinkUp, timeout)
        self.wait_subscribed(0, timeout)
        return self

    def wait_subscribed(self, subacks_before: int, timeout: float = 10.0) -> None:
        """Until the subscriptions of the current connection are confirmed (none are sent by MQTT
        3.1.1 into an existing session)."""
        stats, v5 = self.link.stats, self.link._v5
        wait_until(lambda: stats.subacks > subacks_before or (stats.session_present and not v5), timeout,
                   "subscribed")

    def stop(self, **kw: Any) -> None:
        self.link.stop(**kw)

    def next(self, kind: type[T], timeout: float = 10.0, where: Callable[[T], bool] | None = None) -> T:
        """The next inbox item of ``kind`` (and matching ``where``); others are kept in ``seen``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind.__name__} within {timeout} s; seen {self.seen[-5:]!r}")
            try:
                item = self.inbox.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(item)
            if isinstance(item, kind) and (where is None or where(item)):
                return item

    def inbound(self, topic: str, timeout: float = 10.0) -> Inbound:
        return self.next(Inbound, timeout, lambda m: m.topic == topic)

    def doc(self, timeout: float = 10.0) -> Document:
        try:
            return self.docs.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no catalog document within {timeout} s") from None

    def inbounds(self, topic: str) -> list[Inbound]:
        """Every Inbound on ``topic`` seen or still waiting in the inbox (drains the inbox)."""
        while True:
            try:
                self.seen.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        return [m for m in self.seen if isinstance(m, Inbound) and m.topic == topic]


class Peer:
    """The platform side: a plain paho client (MQTT 3.1.1, or 5) that publishes and collects."""

    def __init__(self, host: str, port: int, *, version: str = "3.1.1", username: str | None = None,
                 password: str | None = None, client_id: str | None = None) -> None:
        v5 = version == "5"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"peer-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        if username:
            self.client.username_pw_set(username, password)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._subacks: queue.Queue[list[Any]] = queue.Queue()
        self._connected = threading.Event()
        self.client.on_message = lambda _c, _u, m: self.messages.put(m)
        self.client.on_subscribe = lambda _c, _u, _mid, codes, _p: self._subacks.put(list(codes))
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self._connected.set() if not rc.is_failure else None
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._connected.wait(10):
            self.client.loop_stop()
            raise AssertionError(f"peer could not connect to {host}:{port}")

    def subscribe(self, topic: str, timeout: float = 10.0) -> list[Any]:
        self.client.subscribe(topic, qos=1)
        try:
            return self._subacks.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no SUBACK for {topic}") from None

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1, timeout: float = 30) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise AssertionError(f"publish to {topic} not acknowledged")

    def message(self, topic: str, timeout: float = 10.0) -> mqtt.MQTTMessage:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no message on {topic} within {timeout} s")
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if msg.topic == topic:
                return msg

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

"""One-shot platform actions over MQTT: send a signed command and wait for its reply, publish
a signed catalog (platform.md, ``command`` and ``publish-catalog``).

Each action opens its own short clean session, waits for every acknowledgement it depends on
(CONNACK, SUBACK before the command goes out so the reply cannot be missed, PUBACK) and
closes it again; nothing stays queued on the broker for a tool that has exited.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol
from agent.errors import AgentError
from agent.platform import signing
from agent.platform.brokers import BrokerUrl, TlsFiles, new_client

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0


class BrokerUnreachable(AgentError):
    """The broker did not accept a connection (or a subscription) in time."""


class _Session:
    """A connected clean-session client whose callbacks feed a condition."""

    def __init__(self, broker: BrokerUrl, tls: TlsFiles | None, purpose: str) -> None:
        self.broker = broker
        self._cond = threading.Condition()
        self._connected = False
        self._refused: str | None = None
        self._subacks: dict[int, bool] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.client = new_client(f"cabinet-platform-{purpose}-{os.getpid()}-{time.monotonic_ns() % 10**9}",
                                 broker, tls)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def __enter__(self) -> _Session:
        try:
            self.client.connect(self.broker.host, self.broker.port, keepalive=30, clean_start=True)
        except (OSError, ValueError) as exc:
            raise BrokerUnreachable(f"cannot connect to {self.broker}: {exc}") from None
        self.client.loop_start()
        try:
            self.wait(lambda: self._connected or self._refused is not None, CONNECT_TIMEOUT_S)
        except TimeoutError:
            self.__exit__()
            raise BrokerUnreachable(
                f"{self.broker} did not answer the connect within {CONNECT_TIMEOUT_S:g} s") from None
        if self._refused is not None:
            self.__exit__()
            raise BrokerUnreachable(f"{self.broker} refused the connection: {self._refused}")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def wait(self, predicate: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self._cond.wait(remaining)

    def subscribe(self, topic: str) -> None:
        rc, mid = self.client.subscribe(topic, qos=1)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerUnreachable(f"subscribe to {topic} failed: {mqtt.error_string(rc)}")
        try:
            self.wait(lambda: mid in self._subacks, CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise BrokerUnreachable(f"{self.broker} did not confirm the subscription to {topic}") from None
        if not self._subacks[mid]:
            raise BrokerUnreachable(f"{self.broker} refused the subscription to {topic}")

    def publish(self, topic: str, payload: bytes, retain: bool, timeout: float) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise BrokerUnreachable(f"{self.broker} did not acknowledge the publish to {topic} within {timeout:g} s")

    # paho callbacks (network thread): record and notify, never raise
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        with self._cond:
            if reason_code.is_failure:
                self._refused = str(reason_code)
            else:
                self._connected = True
            self._cond.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        with self._cond:
            self._subacks[mid] = not any(rc.is_failure for rc in reason_codes)
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()


def send_command(broker: BrokerUrl, key: Ed25519PrivateKey, cabinet: str, type_: str, args: Mapping[str, Any],
                 *, wait_s: float = 10.0, ttl_s: float = signing.DEFAULT_TTL_S,
                 tls: TlsFiles | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Send one signed command; returns (the command, its reply or None if none came in ``wait_s``)."""
    topics = protocol.Topics(cabinet)
    command = signing.make_command(key, type_, args, ttl_s=ttl_s)
    with _Session(broker, tls, "command") as session:
        session.subscribe(topics.reply)
        session.publish(topics.cmd, protocol.canonical(command), retain=False, timeout=CONNECT_TIMEOUT_S)
        log.info("command %s %s sent to %s", type_, command["id"], cabinet)
        found: list[dict[str, Any]] = []

        def replied() -> bool:
            for _topic, payload in session.messages:
                try:
                    reply = json.loads(payload)
                except ValueError:
                    continue
                if isinstance(reply, dict) and reply.get("id") == command["id"]:
                    found.append(reply)
                    return True
            return False

        try:
            session.wait(replied, wait_s)
        except TimeoutError:
            return command, None
        return command, found[0]


def publish_catalog(broker: BrokerUrl, key: Ed25519PrivateKey, doc: Mapping[str, Any], *,
                    tls: TlsFiles | None = None, timeout_s: float = 60.0) -> tuple[dict[str, Any], str]:
    """Sign and publish a snapshot (retained) or a delta; returns (the signed document, its topic)."""
    signed = signing.sign(doc, key)
    topic, retain = signing.catalog_route(signed)
    with _Session(broker, tls, "catalog") as session:
        session.publish(topic, protocol.canonical(signed), retain=retain, timeout=timeout_s)
    return signed, topic

"""The platform link: one paho-mqtt 2.x client on its own network thread.

Guards against the paho pitfalls named in design.md:
- callbacks only enqueue for the core and never raise (a callback exception would kill the
  network thread while ``is_connected()`` still says True); ``suppress_exceptions`` is set too;
- nothing is published while we know we are offline (paho would queue it and deliver it
  later anyway, making duplicates of what the core resends after reconnecting);
- MQTT 5 with ``clean_start=False`` and an explicit session expiry (7 days + 1 h), so the
  broker keeps our session and subscriptions across outages;
- a PUBACK with a failure reason code is reported as a failed publish, not as delivered;
- reconnects use exponential backoff with full jitter, so a fleet does not reconnect in sync.
Durability never depends on paho: the core resends from the ledger until the platform acks.
"""

from __future__ import annotations

import logging
import queue
import random
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import PlatformConfig
from agent.events import Inbound, LinkDown, LinkUp, PublishFailed

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600 + 3600


def set_no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Disable Nagle: a command reply or an unlock must not wait 40 ms for a delayed ACK."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


def backoff_delay(attempt: int, base_s: float = 0.5, cap_s: float = 60.0, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    rng = rng or random
    return rng.uniform(0, min(cap_s, base_s * (2 ** min(attempt, 20))))


class MqttLink:
    def __init__(self, platform: PlatformConfig, cabinet_id: str, inbox: "queue.Queue[Any]",
                 subscriptions: list[str], will: bytes, will_topic: str, max_inflight: int = 200) -> None:
        self._cfg = platform
        self._inbox = inbox
        self._subs = subscriptions
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self.client_id = f"cab-{cabinet_id}"
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        c.suppress_exceptions = True
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)
        c.will_set(will_topic, will, qos=1, retain=True)
        if platform.username:
            password = None
            if platform.password_file:
                password = Path(platform.password_file).read_text().strip()
            c.username_pw_set(platform.username, password)
        if platform.tls:
            c.tls_set(
                ca_certs=platform.ca_file or None,
                certfile=platform.cert_file or None,
                keyfile=platform.key_file or None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        c.on_socket_open = set_no_delay
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        self._client = c

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._thread.start()

    def stop(self, last_words: tuple[str, bytes] | None = None, timeout_s: float = 2.0) -> None:
        """Publish ``last_words`` (the offline status) if connected, then disconnect cleanly."""
        if last_words and self.connected:
            try:
                info = self._client.publish(last_words[0], last_words[1], qos=1, retain=True)
                info.wait_for_publish(timeout_s)
            except (RuntimeError, ValueError, OSError) as exc:
                log.warning("could not publish the offline status: %s", exc)
        self._stop.set()
        try:
            self._client.disconnect()
        except OSError:
            pass
        if self._thread:
            self._thread.join(timeout_s + 1)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        """Publish if connected; returns the mid, or None when offline (the caller resends later)."""
        if not self.connected:
            return None
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            log.debug("publish to %s not sent now: %s", topic, mqtt.error_string(info.rc))
            return None
        return info.mid

    def resubscribe(self, topic: str) -> None:
        """Subscribe again, e.g. to receive the retained catalog snapshot after a base mismatch."""
        if self.connected:
            self._client.subscribe(topic, qos=1)

    # -- network thread ------------------------------------------------------------------------
    def _run(self) -> None:
        attempt = 0
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        while not self._stop.is_set():
            try:
                self._client.connect(self._cfg.host, self._cfg.port, keepalive=self._cfg.keepalive_s,
                                     clean_start=False, properties=props)
            except (OSError, ValueError, ssl.SSLError) as exc:
                delay = backoff_delay(attempt)
                attempt += 1
                log.warning("cannot connect to %s:%d (%s); retrying in %.1f s", self._cfg.host, self._cfg.port, exc, delay)
                self._stop.wait(delay)
                continue
            while not self._stop.is_set():
                rc = self._client.loop(timeout=0.2)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    break
                if self.connected:
                    attempt = 0
            if self._connected.is_set():
                self._set_down("network loop ended")
            if self._stop.is_set():
                break
            delay = backoff_delay(attempt)
            attempt += 1
            log.info("reconnecting to the platform in %.1f s", delay)
            self._stop.wait(delay)
        try:
            self._client.loop(timeout=0.1)
        except (OSError, ValueError):
            pass

    def _set_down(self, reason: str) -> None:
        if self._connected.is_set():
            self._connected.clear()
            self._put(LinkDown(reason))

    def _put(self, item: Any) -> None:
        try:
            self._inbox.put_nowait(item)
        except Exception:  # noqa: BLE001 - a callback must never raise into paho
            log.exception("cannot enqueue %r", item)

    # -- paho callbacks: enqueue only, never raise ----------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            if reason_code.is_failure:
                log.error("broker refused the connection: %s", reason_code)
                return
            for topic in self._subs:
                client.subscribe(topic, qos=1)
            self._connected.set()
            log.info("connected to the platform at %s:%d (session present: %s)",
                     self._cfg.host, self._cfg.port, getattr(flags, "session_present", "?"))
            self._put(LinkUp())
        except Exception:  # noqa: BLE001
            log.exception("error in on_connect")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            log.warning("disconnected from the platform: %s", reason_code)
            self._set_down(str(reason_code))
        except Exception:  # noqa: BLE001
            log.exception("error in on_disconnect")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._put(Inbound(msg.topic, bytes(msg.payload)))
        except Exception:  # noqa: BLE001
            log.exception("error in on_message")

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        try:
            if getattr(reason_code, "is_failure", False):
                log.warning("broker refused publish %d: %s", mid, reason_code)
                self._put(PublishFailed(mid, str(reason_code)))
        except Exception:  # noqa: BLE001
            log.exception("error in on_publish")

"""The platform link (mqtt.md v1.1): one paho-mqtt 2.x client, owned by one thread.

**One owner for the socket.** Every read and write of the MQTT connection happens on the link's
thread: ``publish``, ``ack`` and ``resubscribe`` from other threads only queue a request and
wake the thread (a socketpair in its ``select``). paho writes to the socket from whichever
thread calls ``publish``; with TLS two threads in one ``SSLSocket`` corrupt its state ("bad
record mac" at the broker, a dropped link, a re-downloaded catalog), so nobody else may call it.

**Acknowledgements** (``Client(manual_ack=True)``): who acks what --

- records/ack and anything else not listed below: the link, as soon as it is in the inbox (a lost
  ack only causes a resend);
- ``held_topics`` (the daemon passes the command topic): the core, with ``link.ack(inbound)``
  once the outcome is committed, so a crash in between leaves the command in the persistent
  session and the broker delivers it again;
- catalog documents, when a ``catalog_sink`` is given: the catalog worker, once the document
  is installed, rejected or superseded (``Document.finish``); without a sink they go to the core
  in the inbox like any message and the link acks them.
``agent.mqtt_acks`` keeps the held packet ids right across reconnects.

**Subscriptions** (v1.1): MQTT 5 subscribes in every ``on_connect`` with Retain Handling 1 (the
retained snapshot only for a subscription that did not exist); MQTT 3.1.1 subscribes when the
CONNACK says no session is present. A reconnect into the session therefore costs no snapshot.

**Size**: a message above ``max_message_mb`` is discarded as it is read (MQTT 5 also announces
the limit as Maximum Packet Size), and acknowledged so it does not come back; a large one is
streamed to a spool file by ``agent.mqtt_client`` and handed over as a file.

Also: callbacks only enqueue and never raise (``suppress_exceptions`` too); nothing is
published while offline (the ledger resends after reconnecting instead of paho's queue
duplicating); a PUBACK with a failure reason code is a failed publish; reconnects use
exponential backoff with full jitter, spread over ``reconnect_spread_s`` after the broker ended an
established connection (``reconnect_delay``: a fleet must not come back in one second); TCP_NODELAY,
and TCP_QUICKACK after every read and write
(``agent.mqtt_client``). Durability never depends on paho: the core resends until acked.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import random
import select
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import paho.mqtt.client as mqtt
from paho.mqtt.client import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import PlatformConfig
from agent.errors import ConfigError
from agent.events import Inbound, LinkDown, LinkUp, PublishFailed
from agent.mqtt_acks import AckBook, AckToken
from agent.mqtt_client import LargePublish, LinkClient
from agent.mqtt_payload import Document

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600 + 3600
MAX_PACKET = 268_435_455        # the largest Maximum Packet Size paho lets us announce (256 MiB - 1)
HEADER_ALLOWANCE = 65_536 + 1024  # topic, packet id and properties on top of the payload limit
STABLE_S = 10.0                 # a connection that lasted this long resets the backoff
_POLL_S = 0.5
# Connected and idle, the thread wakes for the keepalive only (every request wakes it through the
# socketpair, the broker's bytes through the socket): a quarter of the keepalive, at most this.
# A PINGREQ is then at most this late (the broker allows 1.5 x keepalive); a fleet of 1,000 links
# in one process spent a fifth of a core waking every 0.5 s for nothing.
IDLE_WAKE_MAX_S = 5.0


def catalog_topics(cabinet_id: str) -> tuple[str, ...]:
    """The three catalog topics of mqtt.md."""
    return ("cab/v1/catalog", "cab/v1/catalog/delta", f"cab/v1/{cabinet_id}/catalog")


def set_no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Disable Nagle: a command reply or an unlock must not wait 40 ms for a delayed ACK."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


def backoff_delay(attempt: int, base_s: float = 0.5, cap_s: float = 60.0, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    source: Any = rng if rng is not None else random
    return float(source.uniform(0, min(cap_s, base_s * (2 ** min(attempt, 20)))))


def reconnect_delay(attempt: int, *, after_loss: bool, base_s: float = 0.5, cap_s: float = 60.0,
                    spread_s: float = 20.0, rng: random.Random | None = None) -> float:
    """The wait before reconnect attempt ``attempt`` (0: the first since the link was last stable).

    Normally full-jitter exponential backoff (``backoff_delay``): a cabinet that never got
    through yet, or whose connection died of a keepalive timeout (the silence was noticed on
    this side, at a moment of its own keepalive phase), retries within ``base_s`` first.

    ``after_loss``: the broker ended an established connection (it closed the socket or sent
    DISCONNECT). Then every cabinet on that broker lost it in the same instant, usually a
    broker restart, and full jitter over 0.5 s would bring them all back within a second.
    So every attempt until the link is stable again waits uniformly over a window of at least
    ``spread_s`` (wider once the exponential window is): N cabinets arrive at about N / spread_s
    a second, and while the broker is still away each retries on average every spread_s / 2.
    The price: a cabinet comes back on average ``spread_s / 2`` (at most about ``spread_s``)
    after the broker does, even one whose own connection was all that blipped.
    """
    source: Any = rng if rng is not None else random
    window = min(cap_s, base_s * (2 ** min(attempt, 20)))
    if after_loss:
        window = max(window, spread_s)
    return float(source.uniform(0, window))


@dataclass
class LinkStats:
    """Counters for tests and diagnostics (written by the link's thread only)."""

    connects: int = 0
    session_present: bool = False  # in the last CONNACK
    subacks: int = 0
    subscriptions_refused: int = 0
    spooled: int = 0
    dropped_too_large: int = 0
    duplicates_dropped: int = 0


@dataclass(frozen=True)
class _Publish:
    token: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True)
class _Ack:
    token: AckToken


@dataclass(frozen=True)
class _Resubscribe:
    topic: str


@dataclass
class _LargePlan:
    """What to do with a large PUBLISH once read: ``deliver`` it, ack a ``drop``, or ignore a ``dup``."""

    action: str
    token: AckToken | None = None


def tls_context(cfg: PlatformConfig) -> ssl.SSLContext:
    """Verify the broker against ``ca_file`` (else the system CAs) and its name; TLS 1.2 at least."""
    try:
        ca = cfg.resolve_path("ca_file")
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"platform.ca_file: cannot load {cfg.ca_file}: {exc}"]) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, key = cfg.resolve_path("cert_file"), cfg.resolve_path("key_file")
    if cert is not None:
        try:
            ctx.load_cert_chain(str(cert), str(key) if key else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([f"platform.cert_file: cannot load {cfg.cert_file} / {cfg.key_file}: {exc}"]) from None
    return ctx


class MqttLink:
    """The link's public face: thread-safe calls that hand work to the link's thread."""

    def __init__(self, platform: PlatformConfig, cabinet_id: str, inbox: queue.Queue[Any],
                 subscriptions: list[str], will: bytes, will_topic: str, max_inflight: int = 200, *,
                 held_topics: Iterable[str] = (), catalog_sink: Callable[[Document], None] | None = None,
                 spool_dir: str | Path | None = None, backoff_base_s: float = 0.5,
                 backoff_cap_s: float = 60.0, reconnect_spread_s: float | None = None) -> None:
        """``reconnect_spread_s`` overrides ``platform.reconnect_spread_s`` (see ``reconnect_delay``)."""
        self._cfg = platform
        self._inbox = inbox
        self._subs = list(subscriptions)
        self._held = frozenset(held_topics)
        self._catalog_topics = frozenset(catalog_topics(cabinet_id))
        self._catalog_sink = catalog_sink
        self._spool_dir = str(spool_dir) if spool_dir is not None else None
        self._backoff = (backoff_base_s, backoff_cap_s)
        self._spread_s = platform.reconnect_spread_s if reconnect_spread_s is None else reconnect_spread_s
        self._lost_to_keepalive = False   # the connection ended by our keepalive timeout (link thread only)
        self._v5 = platform.mqtt_version == "5"
        self._limit = platform.max_message_bytes
        self.client_id = f"cab-{cabinet_id}"
        self.stats = LinkStats()

        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._requests: collections.deque[_Publish | _Ack | _Resubscribe] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self._tokens = itertools.count(1)
        self._token_of_mid: dict[int, int] = {}
        self._book = AckBook()
        self._large_plan: _LargePlan | None = None
        self._resubscribe_later: set[str] = set()
        self._last_words: tuple[str, bytes] | None = None
        self._last_words_mid: int | None = None
        self._last_words_acked = threading.Event()
        self._stop_timeout_s = 2.0

        for warning in platform.warnings():
            log.warning("%s", warning)
        self._client = self._make_client(platform, will, will_topic, max_inflight)

    def _make_client(self, cfg: PlatformConfig, will: bytes, will_topic: str, max_inflight: int) -> LinkClient:
        c = LinkClient(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                       protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
                       clean_session=None if self._v5 else False, manual_ack=True,
                       begin_large=self._begin_large, end_large=self._end_large)
        c.suppress_exceptions = True
        c.connect_timeout = cfg.connect_timeout_s
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)
        c.will_set(will_topic, will, qos=1, retain=True)
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password())
        if cfg.tls:
            c.tls_set_context(tls_context(cfg))
        c.on_socket_open = set_no_delay
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        return c

    # -- the thread-safe API ------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._thread.start()

    def stop(self, last_words: tuple[str, bytes] | None = None, timeout_s: float = 2.0) -> None:
        """Publish ``last_words`` (the offline status, retained) if connected, then disconnect cleanly."""
        self._last_words = last_words
        self._stop_timeout_s = timeout_s
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout_s + self._cfg.connect_timeout_s + 1.0)
            if self._thread.is_alive():
                log.warning("the mqtt thread did not stop in time")

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def held(self) -> int:
        """Messages received and handed over whose owner has not acknowledged them yet."""
        return self._book.pending

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        """Hand a message to the link's thread if connected; returns a handle, or None when offline.

        The handle identifies the message in a later ``PublishFailed``. A message handed over
        just before the link drops is not sent (the caller resends after ``LinkUp``).
        """
        if not self.connected:
            return None
        token = next(self._tokens)
        self._requests.append(_Publish(token, topic, payload, qos, retain))
        self._wake()
        return token

    def ack(self, msg: Inbound) -> None:
        """Acknowledge a held message (its outcome is committed); a no-op for any other message."""
        if msg.ack is not None:
            self._release(msg.ack)

    def resubscribe(self, topic: str) -> None:
        """Unsubscribe and subscribe again, e.g. to get the retained catalog snapshot after a base mismatch."""
        self._requests.append(_Resubscribe(topic))
        self._wake()

    def _release(self, token: AckToken | None) -> None:
        if token is not None:
            self._requests.append(_Ack(token))
            self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or we are closing

    # -- the link's thread --------------------------------------------------------------------------
    def _run(self) -> None:
        attempt = 0
        after_loss = False     # the broker ended our last established connection: spread the retries
        try:
            while not self._stopping.is_set():
                try:
                    self._client.connect(self._cfg.host, self._cfg.port, keepalive=self._cfg.keepalive_s,
                                         **self._connect_args())
                except (OSError, ValueError, ssl.SSLError) as exc:
                    delay = self._delay(attempt, after_loss)
                    attempt += 1
                    log.warning("cannot connect to %s:%d (%s); retrying in %.1f s",
                                self._cfg.host, self._cfg.port, exc or type(exc).__name__, delay)
                    self._idle(delay)
                    continue
                except Exception:  # noqa: BLE001 - a bug must not end the link for good: log, retry
                    delay = self._delay(attempt, after_loss)
                    attempt += 1
                    log.exception("connecting to %s:%d failed; retrying in %.1f s", self._cfg.host,
                                  self._cfg.port, delay)
                    self._idle(delay)
                    continue
                started = time.monotonic()
                connects = self.stats.connects
                self._lost_to_keepalive = False
                own_failure = False
                try:
                    reason = self._serve()
                except Exception:  # noqa: BLE001 - a bug in the network loop must not end the link for good
                    log.exception("the mqtt network loop failed; reconnecting")
                    self._close_socket()
                    reason, own_failure = "network loop failed", True
                self._set_down(reason)
                self._client.abort_large()
                if self._stopping.is_set():
                    break
                if own_failure:
                    # ours, not the broker's: plain backoff, growing while the bug recurs
                    delay = backoff_delay(attempt, *self._backoff)
                else:
                    if self.stats.connects and time.monotonic() - started >= STABLE_S:
                        attempt = 0
                    if self.stats.connects > connects:    # this connection was established (CONNACK)
                        after_loss = not self._lost_to_keepalive
                    delay = self._delay(attempt, after_loss)
                attempt += 1
                log.info("reconnecting to the platform in %.1f s (%s%s)", delay, reason,
                         f"; spread over {self._spread_s:g} s after the broker ended the connection"
                         if after_loss and self._spread_s > 0 else "")
                self._idle(delay)
        except Exception:  # noqa: BLE001 - the thread must say why it died
            log.exception("the mqtt thread failed")
            self._set_down("link thread failed")
        finally:
            self._close_socket()
            for s in (self._wake_r, self._wake_w):
                s.close()

    def _connect_args(self) -> dict[str, Any]:
        if not self._v5:
            return {}
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        props.MaximumPacketSize = min(MAX_PACKET, self._limit + HEADER_ALLOWANCE)
        return {"clean_start": False, "properties": props}

    def _delay(self, attempt: int, after_loss: bool) -> float:
        base_s, cap_s = self._backoff
        return reconnect_delay(attempt, after_loss=after_loss, base_s=base_s, cap_s=cap_s, spread_s=self._spread_s)

    def _idle(self, delay: float) -> None:
        """Wait out a backoff while answering requests (publishes are dropped: we are offline)."""
        deadline = time.monotonic() + delay
        while not self._stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            select.select([self._wake_r], [], [], min(left, _POLL_S))
            self._drain_wake()
            self._handle_requests()

    def _serve(self) -> str:
        """Run one connection until it ends; returns why it ended."""
        connack_deadline = time.monotonic() + self._cfg.connect_timeout_s
        closing_deadline: float | None = None
        idle_s = max(_POLL_S, min(IDLE_WAKE_MAX_S, self._cfg.keepalive_s / 4))
        while True:
            if self._stopping.is_set() and closing_deadline is None:
                closing_deadline = time.monotonic() + self._stop_timeout_s
                self._handle_requests()  # acks and replies handed over before stop() go out first
                self._say_last_words()
            if closing_deadline is not None and (self._last_words_acked.is_set() or not self.connected
                                                 or time.monotonic() > closing_deadline):
                return self._disconnect()
            rc = self._pump(0.05 if closing_deadline is not None else idle_s if self.connected else _POLL_S)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return mqtt.error_string(rc)
            if not self.connected and time.monotonic() > connack_deadline:
                log.warning("no CONNACK from %s:%d within %.1f s", self._cfg.host, self._cfg.port,
                            self._cfg.connect_timeout_s)
                self._close_socket()
                return "no CONNACK"

    def _pump(self, timeout: float) -> MQTTErrorCode:
        """One round of the network loop: read, requests, write, keepalive."""
        client = self._client
        sock = client.socket()
        if sock is None:
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
        try:
            readable, writable, _ = select.select([sock, self._wake_r], [sock] if client.want_write() else [], [],
                                                  0 if pending else timeout)
        except (OSError, ValueError):
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        if sock in readable or pending:
            rc = client.loop_read()
            client.quickack()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or client.socket() is None:
                return rc or MQTTErrorCode.MQTT_ERR_CONN_LOST
        if self._wake_r in readable:
            self._drain_wake()
        if self._handle_requests():
            client.quickack()
        if client.socket() is None:
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        if client.want_write() or sock in writable:
            rc = client.loop_write()
            client.quickack()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return rc
        return client.loop_misc()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _handle_requests(self) -> int:
        """Carry out what other threads handed over; returns how many requests there were."""
        done = 0
        while self._requests:
            req = self._requests.popleft()
            done += 1
            if isinstance(req, _Publish):
                self._do_publish(req)
            elif isinstance(req, _Ack):
                if self._book.release(req.token, self.connected):
                    self._client.ack(req.token.mid, req.token.qos)
            elif self.connected:
                self._do_resubscribe(req.topic)
            else:
                self._resubscribe_later.add(req.topic)  # after the next connect
        return done

    def _do_publish(self, req: _Publish) -> None:
        if not self.connected:
            log.debug("offline: %s not sent (resent after reconnecting)", req.topic)
            return
        info = self._client.publish(req.topic, req.payload, qos=req.qos, retain=req.retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.debug("publish to %s not sent now: %s", req.topic, mqtt.error_string(info.rc))
            self._put(PublishFailed(req.token, mqtt.error_string(info.rc)))
            return
        if req.qos:
            self._token_of_mid[info.mid] = req.token

    def _do_resubscribe(self, topic: str) -> None:
        log.info("subscribing to %s again", topic)
        self._client.unsubscribe(topic)
        # Retain Handling 0: the retained message comes with this subscription whatever the broker thinks
        self._subscribe([topic], SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE)

    def _subscribe(self, topics: list[str], retain_handling: int) -> None:
        if not topics:
            return
        if self._v5:
            self._client.subscribe([(t, SubscribeOptions(qos=1, retainHandling=retain_handling)) for t in topics])
        else:
            self._client.subscribe([(t, 1) for t in topics])

    def _say_last_words(self) -> None:
        if self._last_words is None or not self.connected:
            self._last_words_acked.set()
            return
        topic, payload = self._last_words
        info = self._client.publish(topic, payload, qos=1, retain=True)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.warning("could not publish the offline status: %s", mqtt.error_string(info.rc))
            self._last_words_acked.set()
            return
        self._last_words_mid = info.mid

    def _disconnect(self) -> str:
        if self.connected and not self._last_words_acked.is_set():
            log.warning("the offline status was not acknowledged in time")
        try:
            self._client.disconnect()
            deadline = time.monotonic() + 0.5
            while self._client.socket() is not None and time.monotonic() < deadline:
                if self._pump(0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
        except (OSError, ValueError):
            pass
        return "stopped"

    def _close_socket(self) -> None:
        try:
            self._client._sock_close()  # paho's own close: also runs on_socket_close
        except (OSError, AttributeError):
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

    # -- paho callbacks (on the link's thread): enqueue only, never raise ------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            if reason_code.is_failure:
                hint = ' (does the broker speak only MQTT 3.1.1? mqtt_version = "3.1.1")' \
                    if self._v5 and "protocol" in str(reason_code).lower() else ""
                log.error("broker refused the connection: %s%s", reason_code, hint)
                return
            present = bool(getattr(flags, "session_present", False))
            for mid in self._book.on_connect(present):
                client.ack(mid, 1)  # acknowledged by their owner while we were offline
            if self._v5:
                self._subscribe(self._subs, SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
            elif not present:
                self._subscribe(self._subs, SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE)
            later, self._resubscribe_later = self._resubscribe_later, set()
            for topic in sorted(later) if present else ():  # a new session gets the retained message anyway
                self._do_resubscribe(topic)
            self.stats.connects += 1
            self.stats.session_present = present
            self._connected.set()
            log.info("connected to the platform at %s:%d with MQTT %s (session present: %s)",
                     self._cfg.host, self._cfg.port, self._cfg.mqtt_version, present)
            self._put(LinkUp())
        except Exception:  # noqa: BLE001
            log.exception("error in on_connect")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            if self.connected and not self._stopping.is_set():
                log.warning("disconnected from the platform: %s", reason_code)
            else:
                log.debug("connection closed: %s", reason_code)
            if str(reason_code) == "Keep alive timeout":   # paho's own: no PINGRESP in time
                self._lost_to_keepalive = True
            self._set_down(str(reason_code))
        except Exception:  # noqa: BLE001
            log.exception("error in on_disconnect")

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        try:
            self.stats.subacks += 1
            failed = [str(rc) for rc in reason_codes if getattr(rc, "is_failure", False)]
            if failed:
                self.stats.subscriptions_refused += len(failed)
                log.error("the broker refused a subscription: %s", ", ".join(failed))
        except Exception:  # noqa: BLE001
            log.exception("error in on_subscribe")

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        try:
            if mid == self._last_words_mid:
                self._last_words_acked.set()
            token = self._token_of_mid.pop(mid, mid)
            if getattr(reason_code, "is_failure", False):
                log.warning("broker refused publish %d: %s", mid, reason_code)
                self._put(PublishFailed(token, str(reason_code)))
        except Exception:  # noqa: BLE001
            log.exception("error in on_publish")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            try:
                topic = msg.topic
            except UnicodeDecodeError:
                log.warning("message on a topic that is not UTF-8 dropped")
                client.ack(msg.mid, msg.qos)
                return
            wanted, token = self._admit(topic, msg.mid, msg.qos, msg.dup)
            if not wanted:
                return
            self._deliver(topic, msg.mid, msg.qos, token, data=bytes(msg.payload))
        except Exception:  # noqa: BLE001
            log.exception("error in on_message")

    # -- delivery ---------------------------------------------------------------------------------
    def _owned_elsewhere(self, topic: str) -> bool:
        """Whether another thread acks messages on ``topic`` (see the module docstring)."""
        return topic in self._held or (self._catalog_sink is not None and topic in self._catalog_topics)

    def _admit(self, topic: str, mid: int, qos: int, dup: bool) -> tuple[bool, AckToken | None]:
        """(deliver it?, the ack token if another thread acks it, None if the link does)."""
        if not qos or not self._owned_elsewhere(topic):
            return True, None
        if not self._book.admit(mid, dup):
            self.stats.duplicates_dropped += 1
            log.info("redelivery of message %d on %s dropped: its first delivery is still being handled", mid, topic)
            return False, None
        return True, self._book.token(mid, qos)

    def _deliver(self, topic: str, mid: int, qos: int, token: AckToken | None, *,
                 data: bytes | None = None, spool: BinaryIO | None = None, size: int = 0) -> None:
        """Hand a complete message to its owner; the link acks it now unless another owner does."""
        if self._catalog_sink is not None and topic in self._catalog_topics:
            doc = (Document.from_bytes(topic, data, release=lambda: self._release(token)) if data is not None
                   else Document(topic, file=spool, size=size, release=lambda: self._release(token)))
            if not len(doc):
                log.info("empty payload on %s (a cleared retained catalog) ignored", topic)
                doc.finish()
                return
            self._catalog_sink(doc)
            return
        if data is None:
            assert spool is not None
            with spool:
                spool.seek(0)
                data = spool.read()
        log.debug("message on %s (%d bytes) to the core", topic, len(data))
        self._put(Inbound(topic, data, ack=token))
        if token is None and qos:
            self._client.ack(mid, qos)

    def _begin_large(self, msg: LargePublish) -> BinaryIO | None:
        """A large PUBLISH: where to stream it (a spool file), or None to discard it as it is read."""
        self._large_plan = None
        if msg.topic is None:
            log.warning("a %d-byte message on a topic that is not UTF-8 is dropped", msg.size)
            self._large_plan = _LargePlan("drop")
            return None
        if msg.size > self._limit:
            self.stats.dropped_too_large += 1
            log.warning("message of %d bytes on %s dropped: larger than max_message_mb = %d",
                        msg.size, msg.topic, self._cfg.max_message_mb)
            self._large_plan = _LargePlan("drop")
            return None
        wanted, token = self._admit(msg.topic, msg.mid, msg.qos, msg.dup)
        if not wanted:
            self._large_plan = _LargePlan("dup")
            return None
        self._large_plan = _LargePlan("deliver", token)
        try:
            return tempfile.TemporaryFile(dir=self._spool_dir, prefix=".mqtt-spool-")
        except OSError as exc:
            log.error("cannot spool a %d-byte message on %s: %s; it is dropped", msg.size, msg.topic, exc)
            self._large_plan = _LargePlan("drop", token)
            return None

    def _end_large(self, msg: LargePublish, spool: BinaryIO | None, write_failed: bool) -> None:
        plan, self._large_plan = self._large_plan, None
        try:
            if plan is None or plan.action == "dup":
                return
            if plan.action == "drop" or spool is None or write_failed:
                # dropped for good: acknowledged, or the broker would send it again at every reconnect
                if plan.token is not None:
                    self._release(plan.token)
                elif msg.qos:
                    self._client.ack(msg.mid, msg.qos)
                return
            assert msg.topic is not None
            spool.flush()
            self.stats.spooled += 1
            log.info("received %d bytes on %s (spooled)", msg.size, msg.topic)
            self._deliver(msg.topic, msg.mid, msg.qos, plan.token, spool=spool, size=msg.size)
        except Exception:  # noqa: BLE001 - called from the read path of paho's loop
            log.exception("error delivering a large message on %s", msg.topic)

"""The platform side of ``spec/mqtt.md`` for one cabinet: the demo, the tests and the benchmarks use it.

It is a strict checker as much as a peer: every records batch is verified (hashes, the
chain, the batch rules) and problems are counted rather than tolerated, so a test can
assert that an agent spoke the contract exactly. It acks only records it holds
contiguously from seq 1, which is what "durably stored" means for a platform that
deduplicates by seq.

Threading: paho's network thread runs the callbacks and updates the state under one
``threading.Condition``; callers read the state through ``wait_for()`` (notified on every
message) or the copying accessors (``sales()``, ``events()``). A callback never lets an
exception escape, since that would kill paho's network thread while ``is_connected()``
still says True (design.md, "what the anchors' users got burned by").
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from agent import protocol
from agent.mqtt_link import set_no_delay
from agent.platform import signing
from agent.platform.chain import malformed_reason
from agent.protocol import CABINET_ID_RE, CATALOG_DELTA_TOPIC, CATALOG_TOPIC, MAX_BATCH_BYTES, ZERO_HASH, record_hash_of

log = logging.getLogger(__name__)

_MAX_ERROR_MESSAGES = 1000
# wait_for() re-checks at least this often, so a predicate may also look at state
# outside the platform (an agent's ledger); platform state changes notify at once.
_RECHECK_S = 0.1


def record_hash(record: Mapping[str, Any]) -> str:
    """The ``hash`` of a record (mqtt.md): SHA-256 of the canonical JSON of exactly five keys."""
    return record_hash_of(record)


@dataclass(frozen=True)
class ChainError:
    """A record that breaks the chain and is therefore not stored (nor acked).

    ``reason``: ``bad_hash`` (hash does not match the content), ``bad_prev`` (prev is
    not the stored hash of seq-1, or the stored seq+1 does not point at this one),
    ``conflict`` (a different record for an already stored seq).
    """

    seq: int
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"seq {self.seq}: {self.reason} ({self.detail})"


def _encode(payload: bytes | str | Mapping[str, Any]) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class ReferencePlatform:
    """The platform for one cabinet, over its own persistent MQTT session."""

    def __init__(
        self,
        host: str,
        port: int,
        cabinet_id: str,
        private_key: Ed25519PrivateKey | None = None,
        auto_ack: bool = True,
        client_id: str | None = None,
        *,
        keepalive: int = 30,
    ) -> None:
        if not CABINET_ID_RE.match(cabinet_id):
            raise ValueError(f"cabinet id {cabinet_id!r} does not match {CABINET_ID_RE.pattern}")
        self.host = host
        self.port = port
        self.cabinet_id = cabinet_id
        self.private_key = private_key if private_key is not None else Ed25519PrivateKey.generate()
        self.client_id = client_id or f"refplatform-{cabinet_id}"
        self.keepalive = keepalive

        prefix = f"cab/v1/{cabinet_id}"
        self.topic_prefix = prefix
        self.records_topic = f"{prefix}/records"
        self.ack_topic = f"{prefix}/records/ack"
        self.status_topic = f"{prefix}/status"
        self.cmd_topic = f"{prefix}/cmd"
        self.reply_topic = f"{prefix}/cmd/reply"
        self.cabinet_catalog_topic = f"{prefix}/catalog"

        self._cond = threading.Condition()
        # State below is written by paho's thread under self._cond.
        self.auto_ack = auto_ack
        self.records: dict[int, dict[str, Any]] = {}  # live; copy under wait_for() if needed
        self.contiguous_upto = 0
        self.chain_errors: list[ChainError] = []
        self.duplicates = 0
        self.errors = 0  # malformed messages/records and batch-rule violations
        self.error_messages: list[str] = []
        self.batches = 0
        self.largest_batch = 0
        self.largest_batch_bytes = 0
        self.acks_sent: list[int] = []
        self.status: dict[str, Any] | None = None
        self.statuses: list[dict[str, Any]] = []
        self.replies: dict[str, dict[str, Any]] = {}  # command id -> latest reply
        self.reply_log: list[dict[str, Any]] = []  # every reply, in arrival order
        self.messages = 0
        self.connected = False
        self.connections = 0  # successful connects so far: a test can wait for a reconnect
        self.ready = False  # connected and subscribed on the current connection
        self._sub_mid: int | None = None
        self._started = False

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        client.suppress_exceptions = True  # second line of defence; callbacks catch their own
        client.reconnect_delay_set(min_delay=0.05, max_delay=2)  # type: ignore[arg-type]
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.on_socket_open = set_no_delay
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client

    # -- lifecycle ------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> ReferencePlatform:
        """Connect and return once the SUBACK arrived, so nothing published after it is missed."""
        if self._started:
            return self
        try:
            self._client.connect(self.host, self.port, keepalive=self.keepalive)
        except OSError as exc:
            raise ConnectionError(f"reference platform cannot reach {self.host}:{self.port}: {exc}") from exc
        self._client.loop_start()
        self._started = True
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Disconnect cleanly (the persistent session stays on the broker) and stop paho's thread."""
        if not self._started:
            return
        self._started = False
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
        with self._cond:
            self.connected = self.ready = False
            self._cond.notify_all()

    def __enter__(self) -> ReferencePlatform:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def public_key_b64(self) -> str:
        """The value for the agent's ``[platform] public_key``."""
        return protocol.public_key_b64(self.private_key)

    # -- waiting --------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Block until ``predicate()`` holds (evaluated under the state lock); TimeoutError naming ``what``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{what}: not reached within {timeout:g} s ({self._summary()})")
                self._cond.wait(min(remaining, _RECHECK_S))

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Until connected and subscribed (e.g. after ``PrivateBroker.restart()``)."""
        self.wait_for(lambda: self.ready, timeout, f"platform {self.client_id} connected and subscribed")

    def wait_contiguous(self, upto: int, timeout: float = 10.0) -> None:
        """Until every record 1..upto is stored."""
        self.wait_for(lambda: self.contiguous_upto >= upto, timeout, f"records 1..{upto} received")

    def wait_reply(self, command_id: str, timeout: float = 10.0, nth: int = 1) -> dict[str, Any]:
        """The ``nth`` reply to a command (a replayed id gets a second, rejecting reply)."""

        def matching() -> list[dict[str, Any]]:
            return [r for r in self.reply_log if r.get("id") == command_id]

        self.wait_for(lambda: len(matching()) >= nth, timeout, f"reply #{nth} to command {command_id}")
        with self._cond:
            return matching()[nth - 1]

    def _summary(self) -> str:
        status = self.status
        return (
            f"connected={self.connected}, ready={self.ready}, contiguous_upto={self.contiguous_upto}, "
            f"stored={len(self.records)}, duplicates={self.duplicates}, chain_errors={len(self.chain_errors)}, "
            f"errors={self.errors}, last error={self.error_messages[-1] if self.error_messages else None!r}, "
            f"replies={len(self.reply_log)}, status={status!r}"
        )

    # -- records --------------------------------------------------------------------

    def records_in_order(self) -> list[dict[str, Any]]:
        """A copy of the stored records by seq; iterating the live ``records`` races paho's thread."""
        with self._cond:
            return [self.records[s] for s in sorted(self.records)]

    def sales(self) -> list[dict[str, Any]]:
        """Bodies of the stored sale records, in seq order."""
        with self._cond:
            return [self.records[s]["body"] for s in sorted(self.records) if self.records[s]["type"] == "sale"]

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Bodies of the stored event records (of one ``kind`` if given), in seq order."""
        with self._cond:
            return [
                rec["body"]
                for rec in (self.records[s] for s in sorted(self.records))
                if rec["type"] == "event" and (kind is None or rec["body"].get("kind") == kind)
            ]

    def set_auto_ack(self, on: bool) -> None:
        """Switch auto-acking; switching it on acks what is held at once (withheld acks are released)."""
        with self._cond:
            self.auto_ack = on
            upto = self.contiguous_upto
            pending = on and upto > 0 and (not self.acks_sent or self.acks_sent[-1] < upto)
        if pending:
            self.ack(upto)

    def ack(self, upto: int | None = None, wait: bool = True, timeout: float = 10.0) -> int:
        """Publish ``{"upto": upto}`` (default: what is held contiguously); returns the value sent.

        Any value may be sent on purpose (tests ack beyond the agent's last seq).
        """
        with self._cond:
            value = self.contiguous_upto if upto is None else upto
            self.acks_sent.append(value)
        self._publish(self.ack_topic, _encode({"upto": value}), retain=False, wait=wait, timeout=timeout)
        return value

    def _on_records(self, payload: bytes) -> None:
        """Verify a batch outside the lock (the expensive part), then store it under the lock."""
        try:
            batch = json.loads(payload)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            self._error(f"records: not JSON: {exc}")
            return
        if not isinstance(batch, dict) or not isinstance(batch.get("records"), list):
            self._error("records: not an object with a records list")
            return
        if batch.get("cabinet") != self.cabinet_id:
            self._error(f"records: cabinet {batch.get('cabinet')!r} is not {self.cabinet_id!r}")
            return
        records: list[Any] = batch["records"]

        problems: list[str] = []
        if len(payload) > MAX_BATCH_BYTES:
            problems.append(f"records: batch of {len(payload)} bytes exceeds {MAX_BATCH_BYTES}")
        verified: list[dict[str, Any]] = []
        chain_errors: list[ChainError] = []
        previous_seq: int | None = None
        in_order = True
        for rec in records:
            why = malformed_reason(rec)
            if why is not None:
                problems.append("records: " + why)
                continue
            seq = rec["seq"]
            if in_order and previous_seq is not None and seq != previous_seq + 1:
                in_order = False  # one violation per batch
                problems.append(f"records: seq {seq} follows {previous_seq} in one batch (must be consecutive)")
            previous_seq = seq
            digest = record_hash(rec)
            if digest != rec["hash"]:
                chain_errors.append(ChainError(seq, "bad_hash",
                                               f"claims {rec['hash'][:12]}…, content hashes to {digest[:12]}…"))
                continue
            verified.append(rec)

        with self._cond:
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(records))
            self.largest_batch_bytes = max(self.largest_batch_bytes, len(payload))
            before = self.contiguous_upto
            resent = self._store(verified, chain_errors)
            self.chain_errors.extend(chain_errors)
            for problem in problems:
                self._error_locked(problem)
            upto = self.contiguous_upto
            # Re-ack on a resend of records we hold: the agent's copy of our last ack may be lost.
            send_ack = self.auto_ack and upto > 0 and (upto > before or resent)
        for err in chain_errors:
            log.warning("cabinet %s: chain error %s", self.cabinet_id, err)
        if send_ack:
            self.ack(upto, wait=False)  # on paho's thread: must not wait for our own PUBACK

    def _store(self, verified: list[dict[str, Any]], chain_errors: list[ChainError]) -> bool:
        """Store hash-verified records that fit the chain; True if any was a resend of a held record."""
        records = self.records
        resent = False
        for rec in verified:
            seq, digest = rec["seq"], rec["hash"]
            held = records.get(seq)
            if held is not None:
                if held["hash"] == digest:
                    self.duplicates += 1
                    resent = resent or seq <= self.contiguous_upto
                else:
                    chain_errors.append(ChainError(seq, "conflict", f"holds {held['hash'][:12]}…, got {digest[:12]}…"))
                continue
            if seq == 1:
                expected_prev: str | None = ZERO_HASH
            else:
                before = records.get(seq - 1)
                expected_prev = before["hash"] if before is not None else None
            if expected_prev is not None and rec["prev"] != expected_prev:
                chain_errors.append(ChainError(seq, "bad_prev",
                                               f"prev {rec['prev'][:12]}…, seq {seq - 1} is {expected_prev[:12]}…"))
                continue
            after = records.get(seq + 1)
            if after is not None and after["prev"] != digest:
                chain_errors.append(ChainError(
                    seq, "bad_prev", f"held seq {seq + 1} points at {after['prev'][:12]}…, not at {digest[:12]}…"))
                continue
            records[seq] = rec
        upto = self.contiguous_upto
        while upto + 1 in records:
            upto += 1
        self.contiguous_upto = upto
        return resent

    # -- commands -------------------------------------------------------------------

    def make_command(
        self,
        type: str,  # noqa: A002 - the wire field's name
        args: Mapping[str, Any],
        ttl_s: float = 60,
        issued_at: dt.datetime | str | None = None,
        expires_at: dt.datetime | str | None = None,
        command_id: str | None = None,
    ) -> dict[str, Any]:
        """A signed command; timestamps may be datetimes or verbatim strings (to test bad ones)."""
        return signing.make_command(self.private_key, type, args, ttl_s=ttl_s, issued_at=issued_at,
                                    expires_at=expires_at, command_id=command_id)

    def send_command(self, type: str, args: Mapping[str, Any], **kw: Any) -> str:  # noqa: A002
        """Sign and publish a command (QoS 1, waits for the broker's PUBACK); returns its id."""
        command = self.make_command(type, args, **kw)
        self._publish(self.cmd_topic, _encode(command), retain=False, wait=True, timeout=10.0)
        return str(command["id"])

    def publish_raw(
        self,
        topic: str,
        payload: bytes | str | Mapping[str, Any],
        retain: bool = False,
        *,
        qos: int = 1,
        timeout: float = 10.0,
    ) -> None:
        """Publish anything; ``topic`` is a full topic (``cab/...``) or relative to ``cab/v1/{id}/``."""
        full = topic if topic.startswith("cab/") else f"{self.topic_prefix}/{topic}"
        self._publish(full, _encode(payload), retain=retain, qos=qos, wait=True, timeout=timeout)

    def _on_reply(self, payload: bytes) -> None:
        try:
            reply = json.loads(payload)
        except ValueError as exc:
            self._error(f"cmd/reply: not JSON: {exc}")
            return
        if not isinstance(reply, dict) or "id" not in reply or not isinstance(reply["id"], (str, type(None))):
            self._error("cmd/reply: not an object with a string or null id")
            return
        with self._cond:
            command_id = reply["id"]
            if command_id is not None:   # v1.1: a refused command without a usable id is answered with null
                self.replies[command_id] = reply
            self.reply_log.append(reply)

    # -- catalog --------------------------------------------------------------------

    def make_catalog(
        self,
        version: int,
        products: Iterable[Mapping[str, Any]],
        base_version: int | None = None,
        revoked: Iterable[str] = (),
        issued_at: dt.datetime | str | None = None,
    ) -> dict[str, Any]:
        """A signed catalog document: a snapshot, or a delta when ``base_version`` is given."""
        return signing.make_catalog(self.private_key, version, products, base_version=base_version,
                                    revoked=revoked, issued_at=issued_at)

    def publish_catalog(
        self,
        doc: Mapping[str, Any] | bytes,
        topic: str = "snapshot",
        retain: bool | None = None,
        timeout: float = 60.0,
    ) -> None:
        """Publish to ``snapshot`` (cab/v1/catalog, retained by default), ``delta`` or ``cabinet``."""
        topics = {"snapshot": CATALOG_TOPIC, "delta": CATALOG_DELTA_TOPIC, "cabinet": self.cabinet_catalog_topic}
        if topic not in topics:
            raise ValueError(f"topic must be one of {sorted(topics)}, not {topic!r}")
        keep = (topic == "snapshot") if retain is None else retain
        self._publish(topics[topic], _encode(doc), retain=keep, wait=True, timeout=timeout)

    def clear_retained_catalog(self) -> None:
        """Remove the retained snapshot (an empty retained payload), so tests start from none."""
        self._publish(CATALOG_TOPIC, b"", retain=True, wait=True, timeout=10.0)

    # -- status ---------------------------------------------------------------------

    def _on_status(self, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained status: nothing to record
        try:
            status = json.loads(payload)
        except ValueError as exc:
            self._error(f"status: not JSON: {exc}")
            return
        if not isinstance(status, dict):
            self._error("status: not an object")
            return
        with self._cond:
            self.status = status
            self.statuses.append(status)

    # -- MQTT plumbing --------------------------------------------------------------

    def _publish(self, topic: str, payload: bytes, retain: bool, wait: bool, timeout: float, qos: int = 1) -> None:
        """Publish; with ``wait``, only when subscribed-ready, and return after the broker's PUBACK.

        Waiting for ready first avoids paho's offline-queue trap (a publish while
        disconnected reports failure yet is sent later, so a retry would duplicate it).
        """
        if wait:
            self.wait_ready(timeout)
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if not wait:
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                log.warning("publish to %s refused by paho: %s", topic, mqtt.error_string(info.rc))
            return
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise TimeoutError(f"publish to {topic} not acknowledged by the broker within {timeout:g} s")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            if reason_code.is_failure:
                self._error(f"connect refused: {reason_code}")
                return
            topics = [(self.records_topic, 1), (self.status_topic, 1), (self.reply_topic, 1)]
            # Subscribe on every connect: a broker restart without persistence forgets us.
            rc, mid = client.subscribe(topics)
            with self._cond:
                self.connected = True
                self.connections += 1
                self._sub_mid = mid
                self._cond.notify_all()
            log.info("platform %s connected (session present %s), subscribe rc %s", self.client_id,
                     flags.session_present, rc)
        except Exception:  # noqa: BLE001 - must not kill paho's network thread
            log.exception("platform on_connect failed")
            self._error("on_connect raised")

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        try:
            failed = [str(rc) for rc in reason_codes if rc.is_failure]
            with self._cond:
                if mid != self._sub_mid:
                    return
                if failed:
                    self._error_locked("subscribe refused: " + ", ".join(failed))
                else:
                    self.ready = True
                self._cond.notify_all()
        except Exception:  # noqa: BLE001
            log.exception("platform on_subscribe failed")
            self._error("on_subscribe raised")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            with self._cond:
                self.connected = self.ready = False
                self._cond.notify_all()
            log.info("platform %s disconnected: %s", self.client_id, reason_code)
        except Exception:  # noqa: BLE001
            log.exception("platform on_disconnect failed")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic, payload = msg.topic, bytes(msg.payload)
            if topic == self.records_topic:
                self._on_records(payload)
            elif topic == self.status_topic:
                self._on_status(payload)
            elif topic == self.reply_topic:
                self._on_reply(payload)
            else:
                log.debug("platform ignores a message on %s", topic)
        except Exception:  # noqa: BLE001 - a bad message must not stop the platform
            log.exception("platform failed on a message")
            self._error("handler raised on a message")
        finally:
            with self._cond:
                self.messages += 1
                self._cond.notify_all()

    def _error(self, message: str) -> None:
        with self._cond:
            self._error_locked(message)

    def _error_locked(self, message: str) -> None:
        self.errors += 1
        if len(self.error_messages) < _MAX_ERROR_MESSAGES:
            self.error_messages.append(message)
        log.warning("platform %s: %s", self.cabinet_id, message)

"""The reference ingest worker (platform.md, Ingest): MQTT 5 shared subscriptions into a store.

Threads: one paho network thread per broker (cabinets are sharded over brokers, and every
worker serves every shard) only queue what arrives; the worker's own thread takes
everything queued, verifies it, applies it to the store in one transaction
(``agent.platform.intake``) and only then publishes the record acks and PUBACKs the
messages. While a transaction runs, the next messages queue up, so batches grow with the
load and the database's commit rate, not round trips, bounds the throughput.

A shared subscription gets no retained messages, and what cabinets publish while no worker is
subscribed (a broker restart: they are often back first) is lost until they resend on their
own ack timeout. So after every (re)subscription a worker also reads the retained statuses for
a few seconds (a plain subscription): each says how far its cabinet's ledger goes
(``last_seq``), and what is missing is asked for like any gap.

Gaps are asked for (signed ``resend``) only while no worker of the group drains a backlog: a
record missing here is then most likely queued at a peer that is behind, and a resend repeats a
cabinet's whole window. A worker that is catching up says so in the store (``mark_busy``).

QoS 1 PUBACKs are manual and sent after the commit: with the Receive Maximum the worker
announces, the broker never has more than that many messages outstanding at a worker, so
its memory stays bounded; if it dies, nothing it had not stored was acked, and the cabinet
sends it again.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import protocol
from agent.platform import intake, signing
from agent.platform.brokers import BrokerUrl, TlsFiles, new_client
from agent.platform.chain import Batch, BatchError, parse_batch
from agent.platform.store import StatusUpdate, Store, StoreError

log = logging.getLogger(__name__)

RECORDS_TOPIC = "cab/v1/+/records"
STATUS_TOPIC = "cab/v1/+/status"

RECEIVE_MAXIMUM = 100          # QoS 1 messages a broker may have outstanding at this worker (a deeper queue
                               # only delays acks and makes in-flight batches look like gaps)
MAX_FLUSH_MESSAGES = 200       # messages applied in one transaction at most
CATCHING_UP_BATCHES = RECEIVE_MAXIMUM // 4   # records messages in one flush that say "a backlog is draining":
                               # the broker only sends as we PUBACK, so our own queue is often empty while
                               # it still holds thousands for us; asking for resends then only adds load
CATCHUP_S = 5.0                # after (re)subscribing, how long the retained statuses are read
TICK_S = 1.0                   # how often gaps are looked at
BUSY_EVERY_S = 1.0             # how often a worker with a backlog says so in the store (its peers hold resends)
KEEPALIVE_S = 30
RETRY_S = 1.0                  # after a failed transaction, before the next one


@dataclass(frozen=True)
class Arrival:
    broker: int
    topic: str
    payload: bytes
    mid: int
    qos: int


@dataclass
class Stats:
    messages: int = 0
    flushes: int = 0
    stored: int = 0
    duplicates: int = 0
    anomalies: int = 0
    malformed: int = 0
    acks: int = 0
    resends: int = 0
    failed_flushes: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        return (f"{self.messages} messages in {self.flushes} transactions: {self.stored} records stored, "
                f"{self.duplicates} duplicates, {self.anomalies} anomalies, {self.malformed} malformed, "
                f"{self.acks} acks, {self.resends} resends asked, {self.failed_flushes} failed transactions")


class IngestWorker:
    def __init__(self, brokers: list[BrokerUrl], store: Store, *, group: str = "ingest",
                 key: Ed25519PrivateKey | None = None, resend_after_s: float = 30.0,
                 gap_grace_s: float = intake.GAP_GRACE_S, tls: TlsFiles | None = None,
                 client_id: str | None = None) -> None:
        if not brokers:
            raise ValueError("at least one broker")
        self.brokers = brokers
        self.store = store
        self.group = group
        self.key = key
        self.resend_after_s = resend_after_s
        self.gap_grace_s = gap_grace_s
        self.stats = Stats()
        self._queue: queue.Queue[Arrival] = queue.Queue()
        self._route: dict[str, int] = {}          # cabinet -> broker it was last heard on
        self._stop = threading.Event()
        base = client_id or f"ingest-{group}-{socket.gethostname()}-{os.getpid()}"
        self._clients = [self._make_client(f"{base}-{i}", i, b, tls) for i, b in enumerate(brokers)]
        self._subscribed = [threading.Event() for _ in brokers]
        self._shared_mid: list[int | None] = [None] * len(brokers)
        self._backlogged_at = -1e9    # monotonic: the last time messages waited behind a transaction
        self._busy_told_at = -1e9     # monotonic: the last time the store was told (mark_busy)
        self._catchup_until: list[float | None] = [None] * len(brokers)   # written by paho's threads

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Connect to every broker (paho keeps reconnecting in its own thread)."""
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        for broker, client in zip(self.brokers, self._clients, strict=True):
            client.connect_async(broker.host, broker.port, keepalive=KEEPALIVE_S, clean_start=True,
                                 properties=props)
            client.loop_start()

    def wait_subscribed(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(ev.wait(max(0.0, deadline - time.monotonic())) for ev in self._subscribed)

    def request_stop(self) -> None:
        """Safe from a signal handler: the run loop finishes its transaction and returns."""
        self._stop.set()

    def run(self) -> None:
        """Apply what arrives until ``request_stop``; then what was already received, and disconnect."""
        last_tick = time.monotonic()
        try:
            while not self._stop.is_set():
                arrivals = self._take(timeout=0.2)
                if arrivals:
                    self._flush(arrivals)
                now = time.monotonic()
                if now - last_tick >= TICK_S:
                    last_tick = now
                    self._tick()
            # what was received before the stop is applied and acked, so nothing waits for a resend
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                arrivals = self._take(timeout=0)
                if not arrivals:
                    break
                self._flush(arrivals)
        finally:
            for client in self._clients:
                client.disconnect()
                client.loop_stop()
            log.info("ingest worker stopped: %s", self.stats.line())

    # -- the worker's thread -------------------------------------------------------------------
    def _take(self, timeout: float) -> list[Arrival]:
        try:
            first = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return []
        out = [first]
        while len(out) < MAX_FLUSH_MESSAGES:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                break
        else:
            self._note_backlog()
        return out

    def _flush(self, arrivals: list[Arrival]) -> None:
        # Parsing a flush makes hundreds of thousands of objects, none in a reference cycle (JSON data):
        # the cyclic garbage collector would only scan them again and again (measured: 68 -> 59 us of
        # the worker's CPU a record). Reference counting frees them as usual; the collector runs after.
        paused = gc.isenabled()
        if paused:
            gc.disable()
        try:
            failed = not self._apply(arrivals)
        finally:
            if paused:
                gc.enable()
        if failed:
            self._stop.wait(RETRY_S)

    def _apply(self, arrivals: list[Arrival]) -> bool:
        """Verify, store, ack; False when the transaction failed."""
        batches: list[Batch] = []
        statuses: list[StatusUpdate] = []
        now = time.time()
        received_at = protocol.ts_from_epoch(now)
        for a in arrivals:
            cabinet, kind = _cabinet_of(a.topic)
            if cabinet is None:
                self.stats.malformed += 1
                continue
            self._route[cabinet] = a.broker
            if kind == "records":
                try:
                    batches.append(parse_batch(a.payload, cabinet))
                except BatchError as exc:
                    self.stats.malformed += 1
                    log.warning("records of %s ignored: %s", cabinet, exc)
            else:
                update = _status_update(cabinet, a.payload, received_at)
                if update is not None:
                    statuses.append(update)
        try:
            result = intake.apply_flush(self.store, batches, statuses, now)
        except StoreError as exc:
            # Nothing is acked; the PUBACKs still go out (the broker must not hold the messages
            # against our Receive Maximum): the cabinets resend, as after any loss.
            self.stats.failed_flushes += 1
            log.error("transaction failed, %d messages dropped (the cabinets resend them): %s", len(arrivals), exc)
            self._puback(arrivals)
            return False
        if not self._queue.empty() or len(batches) >= CATCHING_UP_BATCHES:
            self._note_backlog()
        self.stats.messages += len(arrivals)
        self.stats.flushes += 1
        self.stats.stored += result.stored
        self.stats.duplicates += result.duplicates
        self.stats.anomalies += len(result.anomalies)
        for cabinet, upto in result.acks.items():
            if upto > 0:
                self._publish_ack(cabinet, upto)
        self._puback(arrivals)
        return True

    def _note_backlog(self) -> None:
        """Messages wait behind our transactions: hold our resends, and tell the group's other workers
        (the records they miss are most likely queued here), at most once per ``BUSY_EVERY_S``."""
        now = time.monotonic()
        self._backlogged_at = now
        if now - self._busy_told_at < BUSY_EVERY_S:
            return
        self._busy_told_at = now
        try:
            self.store.mark_busy(self.group, time.time())
        except StoreError as exc:
            log.warning("could not tell the group about our backlog: %s", exc)

    def _group_busy(self, now: float) -> bool:
        """True while a worker of the group (this one told the store too) drained a backlog within the
        gap grace; ``now`` is wall-clock time."""
        busy_at = self.store.busy_at(self.group)
        return busy_at is not None and now - busy_at < self.gap_grace_s

    def _publish_ack(self, cabinet: str, upto: int) -> None:
        broker = self._route.get(cabinet)
        if broker is None:
            return
        self._clients[broker].publish(protocol.Topics(cabinet).ack, b'{"upto":%d}' % upto, qos=1)
        self.stats.acks += 1

    def _puback(self, arrivals: list[Arrival]) -> None:
        for a in arrivals:
            if a.qos > 0:
                self._clients[a.broker].ack(a.mid, a.qos)

    def _tick(self) -> None:
        """Gaps: ask for them (signed ``resend``) or accept a chain that starts late."""
        for index, until in enumerate(self._catchup_until):
            if until is not None and time.monotonic() >= until:
                self._catchup_until[index] = None
                self._clients[index].unsubscribe(STATUS_TOPIC)
        if time.monotonic() - self._backlogged_at < self.gap_grace_s:
            return    # still catching up: what looks missing is most likely queued, and asking adds load
        now = time.time()
        try:
            actions = intake.due_gaps(self.store, now, self.resend_after_s, self.gap_grace_s)
            if actions and self._group_busy(now):
                return    # a peer is catching up: what we miss is most likely queued there
            for act in actions:
                if act.cabinet not in self._route:
                    continue   # never heard from it: another worker will ask
                if act.action == "starts_late":
                    upto = intake.accept_late_start(self.store, act.cabinet, now)
                    if upto:
                        self._publish_ack(act.cabinet, upto)
                elif self.store.claim_resend(act.cabinet, now, self.resend_after_s):
                    self._ask_resend(act.cabinet, act.from_seq)
        except StoreError as exc:
            log.error("looking at gaps failed: %s", exc)

    def _ask_resend(self, cabinet: str, from_seq: int) -> None:
        if self.key is None:
            log.info("cabinet %s: records wait above missing seq %d (no --key: waiting for the cabinet's own"
                     " resend)", cabinet, from_seq)
            return
        command = signing.make_command(self.key, "resend", {"from_seq": from_seq})
        self._clients[self._route[cabinet]].publish(protocol.Topics(cabinet).cmd, protocol.canonical(command), qos=1)
        self.stats.resends += 1
        log.info("cabinet %s: asked for a resend from seq %d (command %s)", cabinet, from_seq, command["id"])

    # -- paho (network threads): queue and notify only, never raise --------------------------------
    def _make_client(self, client_id: str, index: int, broker: BrokerUrl, tls: TlsFiles | None) -> mqtt.Client:
        client = new_client(client_id, broker, tls, manual_ack=True)
        client.max_inflight_messages_set(1000)      # our acks and resend commands
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.user_data_set(index)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _on_connect(self, client: mqtt.Client, index: int, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            if reason_code.is_failure:
                log.error("%s refused the connection: %s", self.brokers[index], reason_code)
                return
            # a clean session: the subscriptions are made again on every connect
            _rc, mid = client.subscribe([(f"$share/{self.group}/{RECORDS_TOPIC}", 1),
                                         (f"$share/{self.group}/{STATUS_TOPIC}", 1)])
            self._shared_mid[index] = mid
            log.info("connected to %s", self.brokers[index])
        except Exception:  # noqa: BLE001 - must not kill paho's network thread
            log.exception("on_connect failed")

    def _on_subscribe(self, client: mqtt.Client, index: int, mid: int, reason_codes: Any, properties: Any) -> None:
        try:
            if mid != self._shared_mid[index]:
                return    # the retained-status catch-up
            failed = [str(rc) for rc in reason_codes if rc.is_failure]
            if failed:
                log.error("%s refused the shared subscriptions: %s", self.brokers[index], ", ".join(failed))
                return
            self._subscribed[index].set()
            log.info("subscribed to %s as group %s", self.brokers[index], self.group)
            self._catchup_until[index] = time.monotonic() + CATCHUP_S
            client.subscribe(STATUS_TOPIC, qos=1)
        except Exception:  # noqa: BLE001
            log.exception("on_subscribe failed")

    def _on_disconnect(self, client: mqtt.Client, index: int, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            self._subscribed[index].clear()
            if not self._stop.is_set():
                log.warning("disconnected from %s: %s", self.brokers[index], reason_code)
        except Exception:  # noqa: BLE001
            log.exception("on_disconnect failed")

    def _on_message(self, client: mqtt.Client, index: int, msg: mqtt.MQTTMessage) -> None:
        try:
            self._queue.put(Arrival(index, msg.topic, bytes(msg.payload), msg.mid, msg.qos))
        except Exception:  # noqa: BLE001
            log.exception("on_message failed")


def _cabinet_of(topic: str) -> tuple[str | None, str]:
    """(cabinet, "records" | "status") of ``cab/v1/{id}/records`` or ``cab/v1/{id}/status``."""
    parts = topic.split("/")
    if len(parts) == 4 and parts[0] == "cab" and parts[1] == "v1" and parts[3] in ("records", "status") \
            and protocol.CABINET_ID_RE.match(parts[2]):
        return parts[2], parts[3]
    return None, ""


def _status_update(cabinet: str, payload: bytes, received_at: str) -> StatusUpdate | None:
    if not payload:
        return None   # a cleared retained status
    try:
        obj = json.loads(payload)
        text = protocol.canonical(obj).decode("utf-8")
    except (ValueError, UnicodeEncodeError, RecursionError):
        log.warning("status of %s ignored: not JSON text", cabinet)
        return None
    if not isinstance(obj, dict):
        log.warning("status of %s ignored: not an object", cabinet)
        return None
    online = obj.get("online")
    last_seq = obj.get("last_seq")
    return StatusUpdate(cabinet, text, online if isinstance(online, bool) else None, received_at,
                        last_seq if type(last_seq) is int and last_seq >= 0 else None)


class BackgroundIngest:
    """An ingest worker on a thread of this process, for the demo and tests::

        with BackgroundIngest(["mqtt://127.0.0.1:1883"], "sqlite:///platform.db") as ingest:
            ...                      # cabinets run; ingest.store is the worker's store
        report.build(open_store("sqlite:///platform.db"))
    """

    def __init__(self, brokers: list[str], dsn: str, *, subscribe_timeout_s: float = 10.0, **kw: Any) -> None:
        from agent.platform.dsn import open_store

        self.store = open_store(dsn)
        try:
            self.worker = IngestWorker([BrokerUrl.parse(b) for b in brokers], self.store, **kw)
        except BaseException:
            self.store.close()
            raise
        self._timeout = subscribe_timeout_s
        self._thread = threading.Thread(target=self.worker.run, name="ingest", daemon=True)

    def __enter__(self) -> BackgroundIngest:
        self.worker.start()
        if not self.worker.wait_subscribed(self._timeout):
            self.worker.request_stop()
            self._thread.start()
            self.close()
            raise TimeoutError(f"the ingest worker did not subscribe within {self._timeout:g} s")
        self._thread.start()
        return self

    def close(self) -> None:
        self.worker.request_stop()
        if self._thread.is_alive():
            self._thread.join(15)
        self.store.close()

    def __exit__(self, *exc: object) -> None:
        self.close()

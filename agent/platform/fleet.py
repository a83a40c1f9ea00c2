"""A fleet of simulated cabinets (platform.md, ``fleet``): the agent's own ledger, sync and link
code, with only the hardware and the shoppers simulated.

Each cabinet is a real ``Ledger`` (its own SQLite file), a real ``Syncer`` and a real
``MqttLink`` (its own client id ``cab-{id}``, persistent session, Last Will, jittered
reconnects). What a cabinet's core thread would do for them -- apply acks, pump the syncer,
publish the status, append a record when a session ends, answer ``resend`` and ``status``
commands -- one thread per process does for all the cabinets of that process
(``CabinetGroup``): between sessions a cabinet's core only waits.

``Fleet`` spreads N cabinets over a few processes (``multiprocessing``, spawn). A process
holds at most ``MAX_PER_PROCESS`` cabinets: each link and ledger keeps several file
descriptors open and both paho and the link wait in ``select()``, which cannot watch a
descriptor numbered 1024 or more.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import queue
import random
import resource
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent import __version__, protocol
from agent.config import Config, parse_config
from agent.errors import AgentError
from agent.events import Inbound, LinkDown, LinkUp, PublishFailed
from agent.mqtt_link import MqttLink
from agent.platform.brokers import BrokerUrl, TlsFiles
from agent.rules.commands import Rejected, parse_payload, validate
from agent.store.ledger import Ledger
from agent.sync import Syncer

log = logging.getLogger(__name__)

MAX_PER_PROCESS = 100
ACK_FLUSH_S = 1.0      # as the agent's core: the ack watermark is written once a second
SWEEP_S = 1.0          # statuses due, ack timeouts
CLOCK_SKEW_S = 300.0

# A small certified catalog for the simulated sales (GTIN-14 with valid check digits).
PRODUCTS: tuple[tuple[str, str, str, int, float], ...] = (
    ("06901234560016", "Dried shiitake 250 g", "PA-2026-000123", 1590, 250.0),
    ("06901234560023", "Wild mountain honey 500 g", "PA-2026-000456", 4800, 520.0),
    ("06901234560030", "Black tea 100 g", "PA-2026-000789", 2600, 110.0),
    ("06901234560047", "Red dates 500 g", "PA-2026-001011", 3200, 505.0),
)


class FleetError(AgentError):
    """A fleet process failed or did not answer."""


@dataclass(frozen=True)
class FleetSpec:
    """Everything a fleet process needs (picklable: it crosses the spawn)."""

    brokers: tuple[str, ...]              # cabinet i uses brokers[i % len]: cabinets sharded over brokers
    cabinet_ids: tuple[str, ...]
    data_dir: str
    public_key: str                       # the platform key the cabinets trust (base64)
    sessions_per_min: float = 1.0         # per cabinet
    status_interval_s: float = 60.0
    ack_timeout_s: float = 30.0
    max_batch: int = 100
    backlog: int = 0                      # records each cabinet holds before it first connects
    hold: bool = False                    # connect, but send nothing (no status either) until go()
    seed: int = 1
    tls: TlsFiles = field(default_factory=TlsFiles)
    count_connects: bool = False          # record every TCP connect attempt (fleet processes only)


@dataclass
class GroupStats:
    cabinets: int = 0
    connected: int = 0
    last_seq: int = 0                     # sum over cabinets
    acked: int = 0                        # sum over cabinets
    undrained: int = 0                    # cabinets with unacked records
    published: int = 0                    # records handed to the link (resends included)
    appended: int = 0                     # records appended since start (backlog excluded)
    latencies: list[float] = field(default_factory=list)   # append -> covering ack, s (since last take)
    drained_at: float | None = None       # time.time() when every cabinet had everything acked (after go())
    connect_attempts: list[float] = field(default_factory=list)   # time.time() of each TCP connect (since last take)

    def add(self, other: GroupStats) -> None:
        """Sum another group's counters in (``drained_at`` is combined by ``Fleet.stats``)."""
        for name in ("cabinets", "connected", "last_seq", "acked", "undrained", "published", "appended"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latencies += other.latencies
        self.connect_attempts += other.connect_attempts


class _TaggedInbox(queue.Queue[Any]):
    """A cabinet's inbox as its link sees it: items go to the group's one queue, tagged."""

    def __init__(self, shared: queue.Queue[tuple[int, Any]], index: int) -> None:
        super().__init__()
        self._shared = shared
        self._index = index

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self._shared.put((self._index, item))

    def put_nowait(self, item: Any) -> None:
        self._shared.put((self._index, item))


def cabinet_config(cabinet_id: str, broker: BrokerUrl, spec: FleetSpec) -> Config:
    """The agent config a simulated cabinet would have: one door, two lanes, the platform settings."""
    platform: dict[str, Any] = {"host": broker.host, "port": broker.port, "tls": broker.tls,
                                "public_key": spec.public_key, "status_interval_s": spec.status_interval_s,
                                "ack_timeout_s": spec.ack_timeout_s, "max_batch": spec.max_batch}
    for name in ("ca_file", "cert_file", "key_file"):
        value = getattr(spec.tls, name)
        if value:
            platform[name] = value
    return parse_config({
        "cabinet": {"id": cabinet_id, "data_dir": str(Path(spec.data_dir) / cabinet_id)},
        "platform": platform,
        "doors": [{"door": 1, "lock": 1}],
        "lanes": [{"lane": "A1", "door": 1, "channel": 1}, {"lane": "A2", "door": 1, "channel": 2}],
    })


class SimCabinet:
    """One cabinet's ledger, syncer and link; driven by its group's thread."""

    def __init__(self, index: int, cfg: Config, inbox: queue.Queue[Any], rng: random.Random) -> None:
        self.index = index
        self.cfg = cfg
        self.id = cfg.cabinet.id
        self.topics = protocol.Topics(self.id)
        self.key = protocol.load_public_key(cfg.platform.public_key)
        self.rng = rng
        self.ledger = Ledger(cfg.data_dir / "ledger.db")
        self.syncer = Syncer(self.ledger, self.id, self._publish_batch, cfg.platform.max_batch,
                             cfg.platform.ack_timeout_s)
        self.link = MqttLink(cfg.platform, self.id, inbox, [self.topics.ack, self.topics.cmd],
                             will=self.offline_status(), will_topic=self.topics.status)
        self.pending: deque[tuple[int, float]] = deque()    # (seq, monotonic append time) awaiting an ack
        self.next_status = 0.0
        self.ack_dirty = False

    def _publish_batch(self, payload: bytes) -> int | None:
        return self.link.publish(self.topics.records, payload, qos=1)

    # -- records ------------------------------------------------------------------------------
    def append_session(self, now_wall: float) -> int:
        """One ended shopping session: a sale mostly, sometimes an empty session or an uncertified scan."""
        draw = self.rng.random()
        at = protocol.ts_from_epoch(now_wall)
        if draw < 0.03:
            rec = self.ledger.append("event", {
                "kind": "uncertified_scan", "code": "6971234500019", "gtin": "06971234500019", "symbology": "ean13",
                "context": "idle", "reason": "unknown"}, at)
        elif draw < 0.12:
            rec = self.ledger.append("event", {
                "kind": "session_empty", "session_id": str(uuid.uuid4()),
                "shopper": f"shopper-{self.rng.randrange(10**6)}", "door": 1,
                "opened_at": protocol.ts_from_epoch(now_wall - 20), "closed_at": at}, at)
        else:
            rec = self.ledger.append("sale", self._sale_body(now_wall, at), at)
        return rec.seq

    def _sale_body(self, now_wall: float, at: str) -> dict[str, Any]:
        items: list[dict[str, Any]] = []
        flags: list[str] = []
        for lane, (gtin, name, cert, price, unit_g) in zip(("A1", "A2"), self.rng.sample(PRODUCTS, 2), strict=True):
            qty = self.rng.choice((0, 1, 1, 2))
            if not qty and items:
                continue
            qty = qty or 1
            item_flags = ["weight_mismatch"] if self.rng.random() < 0.02 else []
            flags += item_flags
            items.append({"gtin": gtin, "name": name, "lane": lane, "qty": qty, "unit_price_cents": price,
                          "cert_id": cert, "weight_g": round(-qty * unit_g + self.rng.uniform(-2, 2), 1),
                          "flags": item_flags})
        return {"sale_id": str(uuid.uuid4()), "session_id": str(uuid.uuid4()), "door": 1,
                "shopper": f"shopper-{self.rng.randrange(10**6)}", "opened_at": protocol.ts_from_epoch(now_wall - 25),
                "closed_at": protocol.ts_from_epoch(now_wall - 2), "items": items,
                "total_cents": sum(i["qty"] * i["unit_price_cents"] for i in items), "flags": sorted(set(flags))}

    def prefill(self, n: int, now_wall: float) -> None:
        """A backlog of ``n`` records made while offline (one transaction, as a restore would)."""
        t = now_wall - n * 60.0
        with self.ledger.transaction() as tx:
            for _ in range(n):
                t += 60.0
                tx.append("sale", self._sale_body(t, protocol.ts_from_epoch(t)), protocol.ts_from_epoch(t))

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> bytes:
        return protocol.canonical({
            "online": True, "at": protocol.ts_from_epoch(time.time()), "cabinet": self.id,
            "agent_version": __version__, "catalog_version": 0, "unsynced": self.ledger.unsynced,
            "last_seq": self.ledger.last_seq, "mode": "ready",
            "doors": [{"door": 1, "open": False, "locked": True}], "alarms": []})

    def offline_status(self) -> bytes:
        return protocol.canonical({"online": False, "at": protocol.ts_from_epoch(time.time()), "cabinet": self.id})

    def publish_status(self, now: float) -> None:
        if self.link.publish(self.topics.status, self.status(), qos=1, retain=True) is not None:
            self.next_status = now + self.cfg.platform.status_interval_s

    # -- commands --------------------------------------------------------------------------------
    def on_command(self, payload: bytes, now: float) -> None:
        """``resend`` and ``status`` as the agent does them; anything else is refused (no hardware)."""
        try:
            obj = parse_payload(payload)
            cmd = validate(obj, key=self.key, now=time.time(), skew_s=CLOCK_SKEW_S, config=self.cfg,
                           seen=self.ledger.command_seen)
        except Rejected as rej:
            if rej.command_id is not None:
                self.reply(rej.command_id, False, error=rej.reason)
            return
        with self.ledger.transaction() as tx:
            tx.remember_command(cmd.id, cmd.expires_at + CLOCK_SKEW_S)
        if cmd.type == "resend":
            self.syncer.rewind(now, cmd.args["from_seq"] - 1)
            self.reply(cmd.id, True, result={"from_seq": cmd.args["from_seq"], "last_seq": self.ledger.last_seq})
        elif cmd.type == "status":
            self.publish_status(now)
            self.reply(cmd.id, True, result={"published": True})
        else:
            self.reply(cmd.id, False, error=f"not_allowed: a simulated fleet cabinet does not do {cmd.type}")

    def reply(self, command_id: str, ok: bool, *, error: str | None = None,
              result: dict[str, Any] | None = None) -> None:
        body = {"id": command_id, "ok": ok, "at": protocol.ts_from_epoch(time.time()), "error": error,
                "result": result or {}}
        self.link.publish(self.topics.reply, protocol.canonical(body), qos=1)


class CabinetGroup:
    """The cabinets of one process and the one thread that drives them."""

    def __init__(self, spec: FleetSpec, first_index: int = 0) -> None:
        self.spec = spec
        self._shared: queue.Queue[tuple[int, Any]] = queue.Queue()
        self._lock = threading.Lock()          # guards the counters read by snapshot()
        self._stats = GroupStats(cabinets=len(spec.cabinet_ids))
        self._rate = spec.sessions_per_min
        self._held = spec.hold
        self._measuring = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sessions: list[tuple[float, int]] = []     # heap of (monotonic due, cabinet index)
        self._go_at: float | None = None
        self._dirty: set[int] = set()
        self._undrained: set[int] = set()      # cabinets holding records not acked yet
        brokers = [BrokerUrl.parse(b) for b in spec.brokers]
        self.cabinets: list[SimCabinet] = []
        try:
            for i, cid in enumerate(spec.cabinet_ids):
                cfg = cabinet_config(cid, brokers[(first_index + i) % len(brokers)], spec)
                rng = random.Random(f"{spec.seed}-{cid}")
                self.cabinets.append(SimCabinet(i, cfg, _TaggedInbox(self._shared, i), rng))
        except BaseException:
            self.close()
            raise

    # -- control (any thread) ------------------------------------------------------------------
    def prefill(self) -> None:
        now = time.time()
        for cab in self.cabinets:
            if self.spec.backlog and cab.ledger.last_seq == 0:
                cab.prefill(self.spec.backlog, now)

    def start(self) -> None:
        self._undrained = {c.index for c in self.cabinets if c.ledger.acked_upto < c.ledger.last_seq}
        for cab in self.cabinets:
            cab.link.start()
        if not self._held:
            self._shared.put((-1, "go"))
        self._thread = threading.Thread(target=self._run, name="fleet-group", daemon=True)
        self._thread.start()

    def go(self) -> None:
        """Start sending (a group made with ``hold`` connects but sends nothing before this)."""
        self._shared.put((-1, "go"))

    def set_rate(self, sessions_per_min: float) -> None:
        self._shared.put((-1, ("rate", sessions_per_min)))

    def take_stats(self) -> GroupStats:
        """The counters now; latencies and connect attempts are handed over once (and cleared)."""
        with self._lock:
            st = GroupStats(**{k: v for k, v in asdict(self._stats).items()
                               if k not in ("latencies", "connect_attempts")})
            st.latencies, self._stats.latencies = self._stats.latencies, []
        cabs = list(self.cabinets)
        st.connected = sum(1 for c in cabs if c.link.connected)
        st.last_seq = sum(c.ledger.last_seq for c in cabs)
        st.acked = sum(c.ledger.acked_upto for c in cabs)
        st.undrained = sum(1 for c in cabs if c.ledger.acked_upto < c.ledger.last_seq)
        st.connect_attempts = take_connect_attempts()
        return st

    def stop(self) -> None:
        """Publish each cabinet's offline status, disconnect, flush the ledgers."""
        self._stop.set()
        self._shared.put((-1, None))
        if self._thread is not None:
            self._thread.join(10)
        self.close()

    def close(self) -> None:
        threads = []
        for cab in self.cabinets:
            t = threading.Thread(target=cab.link.stop, kwargs={"last_words": (cab.topics.status, cab.offline_status())},
                                 daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join(15)
        for cab in self.cabinets:
            try:
                cab.ledger.close()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                log.exception("closing the ledger of %s", cab.id)
        self.cabinets = []

    # -- the group's thread ------------------------------------------------------------------------
    def _run(self) -> None:
        last_sweep = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                timeout = min(0.05, max(0.0, (self._sessions[0][0] - now) if self._sessions else 0.05))
                try:
                    item = self._shared.get(timeout=timeout)
                    self._handle(*item)
                    for _ in range(1000):
                        self._handle(*self._shared.get_nowait())
                except queue.Empty:
                    pass
                now = time.monotonic()
                self._due_sessions(now)
                if now - last_sweep >= SWEEP_S:
                    last_sweep = now
                    self._sweep(now)
                self._pump(now)
        except Exception:  # noqa: BLE001 - say why the simulation stopped
            log.exception("fleet group thread failed")
        finally:
            for cab in self.cabinets:
                try:
                    cab.ledger.flush_acked()
                except Exception:  # noqa: BLE001
                    log.exception("flushing the acks of %s", cab.id)

    def _handle(self, index: int, item: Any) -> None:
        if index < 0:
            self._control(item)
            return
        cab = self.cabinets[index]
        now = time.monotonic()
        if isinstance(item, Inbound):
            if item.topic == cab.topics.ack:
                self._on_ack(cab, item.payload, now)
            elif item.topic == cab.topics.cmd:
                cab.on_command(item.payload, now)
            cab.link.ack(item)
        elif isinstance(item, LinkUp):
            cab.syncer.rewind(now)
            if not self._held:
                cab.publish_status(now)
        elif isinstance(item, PublishFailed):
            cab.syncer.rewind(now)
        elif isinstance(item, LinkDown):
            return
        self._dirty.add(index)

    def _control(self, item: Any) -> None:
        if item == "go":
            self._held = False
            self._go_at = time.time()
            now = time.monotonic()
            for cab in self.cabinets:      # what a cabinet does as it comes online: its status first
                if cab.link.connected:
                    cab.publish_status(now)
            self._dirty.update(range(len(self.cabinets)))
            self._reschedule()
        elif isinstance(item, tuple) and item[0] == "rate":
            self._rate = float(item[1])
            if not self._held:
                self._reschedule()

    def _reschedule(self) -> None:
        self._sessions = []
        now = time.monotonic()
        for cab in self.cabinets:
            self._schedule(cab.index, now)

    def _schedule(self, index: int, now: float) -> None:
        if self._rate > 0:
            heapq.heappush(self._sessions, (now + self.cabinets[index].rng.expovariate(self._rate / 60.0), index))

    def _due_sessions(self, now: float) -> None:
        wall = time.time()
        while self._sessions and self._sessions[0][0] <= now:
            _, index = heapq.heappop(self._sessions)
            cab = self.cabinets[index]
            seq = cab.append_session(wall)
            cab.pending.append((seq, now))
            self._undrained.add(index)
            with self._lock:
                self._stats.appended += 1
                self._stats.drained_at = None
            self._dirty.add(index)
            self._schedule(index, now)

    def _on_ack(self, cab: SimCabinet, payload: bytes, now: float) -> None:
        try:
            upto = json.loads(payload)["upto"]
            if type(upto) is not int or upto < 0:
                raise ValueError("upto is not an integer >= 0")
        except (ValueError, KeyError, TypeError):
            log.warning("%s: malformed ack ignored: %r", cab.id, payload[:100])
            return
        if not cab.syncer.on_ack(upto, now):
            return
        cab.ack_dirty = True
        if cab.ledger.acked_upto >= cab.ledger.last_seq and cab.index in self._undrained:
            self._undrained.discard(cab.index)
            if not self._undrained and self._go_at is not None:
                with self._lock:
                    self._stats.drained_at = time.time()
        done: list[float] = []
        while cab.pending and cab.pending[0][0] <= upto:
            done.append(now - cab.pending.popleft()[1])
        if done:
            with self._lock:
                self._stats.latencies += done

    def _sweep(self, now: float) -> None:
        for cab in self.cabinets:
            if cab.ack_dirty:
                cab.ack_dirty = False
                cab.ledger.flush_acked()
            if cab.link.connected and not self._held and now >= cab.next_status:
                cab.publish_status(now)
            self._dirty.add(cab.index)    # the syncer's own ack timeout
        if not self._undrained and self._go_at is not None:
            with self._lock:
                if self._stats.drained_at is None:
                    self._stats.drained_at = time.time()

    def _pump(self, now: float) -> None:
        if self._held or not self._dirty:
            return
        sent = 0
        for index in self._dirty:
            cab = self.cabinets[index]
            sent += cab.syncer.pump(now, cab.link.connected)
        self._dirty.clear()
        if sent:
            with self._lock:
                self._stats.published += sent


# -- connection attempts (a fleet process counts its own TCP connects) ---------------------------------------
_attempts: list[float] = []
_attempts_lock = threading.Lock()


def count_connect_attempts() -> None:
    """Wrap ``socket.create_connection`` (what paho connects with) to record every attempt, refused
    ones included: the reconnect storm after a broker restart is measured where it starts."""
    original: Callable[..., socket.socket] = socket.create_connection

    def counting(*args: Any, **kwargs: Any) -> socket.socket:
        with _attempts_lock:
            _attempts.append(time.time())
        return original(*args, **kwargs)

    socket.create_connection = counting


def take_connect_attempts() -> list[float]:
    with _attempts_lock:
        out = list(_attempts)
        _attempts.clear()
    return out


# -- a fleet over processes ----------------------------------------------------------------------------------
def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))


def _group_main(conn: multiprocessing.connection.Connection, spec: FleetSpec, first_index: int,
                log_level: int) -> None:
    """A fleet process: one CabinetGroup, commanded over ``conn``."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s fleet[%(process)d] %(name)s: %(message)s")
    _raise_fd_limit()
    if spec.count_connects:
        count_connect_attempts()
    group: CabinetGroup | None = None
    try:
        group = CabinetGroup(spec, first_index)
        group.prefill()
        group.start()
        conn.send(("ready", None))
        while True:
            cmd, arg = conn.recv()
            if cmd == "stats":
                conn.send(("stats", group.take_stats()))
            elif cmd == "go":
                group.go()
                conn.send(("ok", None))
            elif cmd == "rate":
                group.set_rate(arg)
                conn.send(("ok", None))
            elif cmd == "stop":
                group.stop()
                group = None
                conn.send(("ok", None))
                return
    except (EOFError, KeyboardInterrupt):
        return
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        log.exception("fleet process failed")
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
    finally:
        if group is not None:
            group.stop()


class Fleet:
    """N cabinets in ``ceil(N / MAX_PER_PROCESS)`` processes (or ``processes``, if more)."""

    def __init__(self, spec: FleetSpec, processes: int | None = None, log_level: int = logging.WARNING) -> None:
        n = len(spec.cabinet_ids)
        count = max(processes or 1, math.ceil(n / MAX_PER_PROCESS), 1)
        count = min(count, max(n, 1))
        ctx = multiprocessing.get_context("spawn")
        self._conns: list[multiprocessing.connection.Connection] = []
        self._procs: list[Any] = []
        per = math.ceil(n / count) if n else 0
        for p in range(count):
            ids = spec.cabinet_ids[p * per:(p + 1) * per]
            if not ids:
                continue
            parent, child = ctx.Pipe()
            sub = FleetSpec(**{**asdict(spec), "cabinet_ids": ids, "tls": spec.tls})
            proc = ctx.Process(target=_group_main, args=(child, sub, p * per, log_level), daemon=True,
                               name=f"fleet-{p}")
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    @property
    def pids(self) -> list[int]:
        """The fleet processes (to measure their CPU)."""
        return [p.pid for p in self._procs if p.pid is not None]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for conn in self._conns:
            self._expect(conn, "ready", max(0.1, deadline - time.monotonic()))

    def _expect(self, conn: multiprocessing.connection.Connection, what: str, timeout: float) -> Any:
        if not conn.poll(timeout):
            raise FleetError(f"a fleet process did not answer within {timeout:.0f} s")
        kind, value = conn.recv()
        if kind == "error":
            raise FleetError(f"a fleet process failed: {value}")
        if kind != what:
            raise FleetError(f"a fleet process answered {kind!r}, expected {what!r}")
        return value

    def _all(self, cmd: str, arg: Any = None, expect: str = "ok", timeout: float = 60.0) -> list[Any]:
        for conn in self._conns:
            conn.send((cmd, arg))
        return [self._expect(conn, expect, timeout) for conn in self._conns]

    def go(self) -> None:
        self._all("go")

    def set_rate(self, sessions_per_min: float) -> None:
        self._all("rate", sessions_per_min)

    def stats(self) -> GroupStats:
        """The whole fleet's counters; ``drained_at`` is when the last group drained (None if one has not)."""
        total = GroupStats()
        groups = self._all("stats", expect="stats")
        for st in groups:
            total.add(st)
        drained = [st.drained_at for st in groups]
        done = [d for d in drained if d is not None]
        total.drained_at = max(done) if done and len(done) == len(drained) else None
        return total

    def stop(self) -> None:
        try:
            self._all("stop", timeout=60)
        except (FleetError, OSError) as exc:
            log.warning("stopping the fleet: %s", exc)
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def cabinet_ids(n: int, prefix: str = "FLEET") -> tuple[str, ...]:
    width = max(4, len(str(n)))
    return tuple(f"{prefix}-{i:0{width}d}" for i in range(1, n + 1))

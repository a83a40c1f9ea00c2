#!/usr/bin/env python3
"""Crash points (issue 8, "nothing lost, nothing forged, under every fault").

The real daemon runs as a subprocess against the lock-board and scale simulators on ptys, a
private Mosquitto and the reference platform (which verifies every record's hash and the chain,
and acks). A scripted shopper runs sessions one after the other, alternating the doors, driven
only through the contract: a signed ``open_door`` over MQTT, the door pulled open the moment
the board releases its latch, items taken off the scales, the door pushed shut.

For every session one crash point is drawn (seeded): a category and a random delay after a
trigger the harness *observes* — no hook in the product:

  command  the open_door was published: it may still be in the broker, in the agent's memory
           (received, acknowledged to the broker, parked for stable lanes) or already journaled
  unlock   the unlock frame reached the board                  [session steps]
  opened   the shopper pulled the door open                    [session steps]
  shut     the shopper pushed the door shut (settling, the sale commit, its publication)
  commit   a ledger commit of this session, read from the ledger with a read-only SQLite
           connection: the journal row, opened_at, closed_at or the ended session with its sale
  publish  the first records batch to reach the platform after the session was journaled
  ack      the first ack the platform published after the session was journaled (the agent
           writes its ack watermark once a second)             [ack handling]
  startup  a random moment after the journal commit, then once more while the daemon starts
  random   a uniformly random moment after the unlock

Every category but ``command`` strikes once the session is journaled. ``command`` lands before
that now and then (an open_door received but not yet journaled, or parked in memory while the
lanes settle after a start): the agent acknowledges a command's PUBLISH only once its outcome is
committed (mqtt.md v1.1), so the broker delivers it again after the restart.
tests/e2e/test_e2e_crashpoints.py also holds each of those windows open deterministically.

The daemon is SIGKILLed there and started again at once (the simulators, the broker and the
platform stay up, as they would), and the shopper carries on. At the end of each session and
of the run the harness checks what the platform ends with:

  * every session exactly once (after dedup by seq): one sale, session_empty or
    session_timeout record carrying its session_id, with the items the shopper took;
  * a gap-free chain that verifies, equal to the agent's ledger record for record;
  * no second unlock frame for any session (``8A addr lock 11 bcc`` counted per session in
    the board simulator's received-frame log);
  * no loss: a session whose open_door never got a reply nor a record (the command was lost),
    a session that unlocked but never got its record, a ledger record the platform lacks.

Figures printed: points, sessions, records, duplicate deliveries, losses (must be 0), second
unlocks (must be 0). Exit status 0 when losses, second unlocks and wrong records are all 0.

    .venv/bin/python scripts/crashpoints.py --points 100 --seed 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.control import request  # noqa: E402
from agent.sim.cabinet import DEMO_LANES, SimulatedCabinet, Timings  # noqa: E402
from agent.store.ledger import Ledger  # noqa: E402
from drivers.lockboard.codec import UnlockRequest  # noqa: E402

log = logging.getLogger("crashpoints")

CATEGORIES = ("command", "unlock", "opened", "shut", "commit", "publish", "ack", "startup", "random")
# CI runs every category ("command" lands before the journal commit: the command is redelivered
# because it is acknowledged only once its outcome is committed).
CI_CATEGORIES = CATEGORIES
COMMITS = ("journal", "opened", "closed", "ended")

# The same rules as Timings.fast(), with an open timeout well above a restart (a session whose
# door was pulled open while the daemon was down must not time out before the first poll) and
# no left-open alarm for a door held open across a restart.
TIMINGS = Timings(latch_release_s=0.15, settle_s=0.3, open_timeout_s=6.0, door_open_alarm_s=60.0, ack_timeout_s=3.0)
LOST_AFTER_S = 6.0       # the daemon up this long without answering a command: the command is lost
SESSION_END_S = 45.0     # from the shopper's last move to the session's record on the platform
STOCK = 150              # units per lane: enough for hundreds of sessions without restocking

TAKES = {
    1: [{}, {"A1": 1}, {"A1": 2}, {"A2": 1}, {"A1": 1, "A2": 1}],
    2: [{}, {"B1": 1}, {"B2": 1}, {"B1": 2}, {"B1": 1, "B2": 2}],
}


class HarnessError(RuntimeError):
    """The harness itself could not go on (the daemon would not start, a step timed out)."""


def wait(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.005) -> Any:
    """Poll ``predicate`` until it returns something truthy; HarnessError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise HarnessError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class LedgerProbe:
    """Reads the agent's ledger with a read-only SQLite connection (what ``cabinetctl sales`` does)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]] | None:
        with self._lock:
            try:
                if self._conn is None:
                    if not self.path.exists():
                        return None
                    self._conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                                 isolation_level=None, check_same_thread=False, timeout=0.5)
                return self._conn.execute(sql, args).fetchall()
            except sqlite3.Error:
                return None   # busy during the daemon's recovery of its WAL after a kill: try again

    def last_seq(self) -> int | None:
        rows = self._query("SELECT max(seq) FROM records")
        return None if rows is None else int(rows[0][0] or 0)

    def session(self, session_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT state, opened_at, closed_at, ended_at FROM sessions WHERE session_id = ?",
                           (session_id,))
        if not rows:
            return None
        state, opened_at, closed_at, ended_at = rows[0]
        return {"state": state, "opened_at": opened_at, "closed_at": closed_at, "ended_at": ended_at}

    def commit_reached(self, session_id: str, which: str) -> bool:
        row = self.session(session_id)
        if row is None:
            return False
        return bool({"journal": True, "opened": row["opened_at"] is not None, "closed": row["closed_at"] is not None,
                     "ended": row["state"] == "ended"}[which])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


@dataclass
class Track:
    """One shopping session as the shopper and the harness saw it."""

    n: int
    door: int
    takes: dict[str, int]
    session_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    command_id: str | None = None
    publishing_at: float | None = None   # monotonic: just before the open_door was published
    sent_at: float | None = None         # monotonic: the open_door is in the broker (its PUBACK came)
    opened_at: float | None = None       # the shopper pulled the door open (after an unlock)
    shut_at: float | None = None
    outcome: str = "running"             # sale | session_empty | session_timeout | refused | lost_* | wrong
    detail: str = ""
    record_seq: int | None = None
    kills: list[str] = field(default_factory=list)
    opened: threading.Event = field(default_factory=threading.Event)

    @property
    def lock(self) -> int:
        return self.door


@dataclass
class Point:
    category: str
    delay_s: float
    track: Track
    commit: str | None = None
    base_batches: int = 0
    base_acks: int = 0
    base_frames: int = 0
    journaled_at: float | None = None    # when the harness first saw the session's journal row
    second_kill_s: float | None = None   # startup: the kill during the restart
    fired: bool = False
    cancelled: bool = False

    def describe(self) -> str:
        what = self.category + (f":{self.commit}" if self.commit else "")
        return f"{what}+{self.delay_s * 1000:.0f}ms"


@dataclass
class Figures:
    points: int = 0
    sessions: int = 0
    records: int = 0
    duplicates: int = 0
    losses: int = 0
    second_unlocks: int = 0
    wrong: int = 0
    refused: int = 0
    timeouts: int = 0
    restarts: int = 0
    seconds: float = 0.0
    by_category: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.losses == 0 and self.second_unlocks == 0 and self.wrong == 0 and not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("points", "sessions", "records", "duplicates", "losses",
                                              "second_unlocks", "wrong", "refused", "timeouts", "restarts",
                                              "seconds", "by_category", "outcomes", "problems")}

    def text(self) -> str:
        lines = [
            f"points (SIGKILLs)     {self.points}",
            f"sessions              {self.sessions}",
            f"records               {self.records}",
            f"duplicate deliveries  {self.duplicates}",
            f"losses                {self.losses}   (must be 0)",
            f"second unlocks        {self.second_unlocks}   (must be 0)",
            f"wrong records         {self.wrong}   (must be 0)",
            f"refused commands      {self.refused}",
            f"sessions timed out    {self.timeouts}   (killed between the journal and the unlock frame)",
            f"daemon starts         {self.restarts}",
            f"wall time             {self.seconds:.1f} s",
            "kills by category     " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_category.items())),
            "session outcomes      " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())),
        ]
        lines += [f"PROBLEM: {p}" for p in self.problems]
        return "\n".join(lines)


class CrashHarness:
    def __init__(self, workdir: Path, *, points: int, seed: int, categories: Iterable[str] = CATEGORIES,
                 say: Callable[[str], None] = print) -> None:
        self.workdir = Path(workdir)
        self.target = points
        self.rng = random.Random(seed)
        self.categories = tuple(categories)
        unknown = set(self.categories) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"unknown categories {sorted(unknown)}")
        self.say = say
        lanes = [dataclasses.replace(ln, stock=STOCK) for ln in DEMO_LANES]
        self.cab = SimulatedCabinet(self.workdir / "cab", cabinet_id="CAB-CRASH", timings=TIMINGS, lanes=lanes,
                                    on_unlock=self._on_unlock, log_level="info")
        self.probe = LedgerProbe(self.workdir / "cab" / "data" / "ledger.db")
        self.tracks: list[Track] = []
        self.current: Track | None = None
        self.figures = Figures()
        self.kills: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._point: Point | None = None
        self._busy = False                 # a kill and restart are under way
        self._up_since = time.monotonic()  # when the daemon last came up (online)
        self._stop = threading.Event()
        self._killer_error: BaseException | None = None
        self._killer = threading.Thread(target=self._killer_loop, name="killer", daemon=True)
        self._stock: dict[str, int] = {}

    # -- lifecycle ----------------------------------------------------------------------------------
    def run(self) -> Figures:
        t0 = time.monotonic()
        self.cab.start()
        self.figures.restarts = 1
        self._stock = {ln.lane: ln.stock for ln in self.cab.lane_specs}
        self._up_since = time.monotonic()
        self._killer.start()
        try:
            n = 0
            while self.figures.points < self.target:
                self._check_killer()
                track = Track(n, 1 + n % 2, self.rng.choice(TAKES[1 + n % 2]))
                self._session(track)
                n += 1
            self._disarm()
            self._final_checks()
        finally:
            self._stop.set()
            self._killer.join(30)
            self.figures.seconds = round(time.monotonic() - t0, 1)
            self.probe.close()
            self.cab.stop()
        return self.figures

    def _check_killer(self) -> None:
        if self._killer_error is not None:
            raise HarnessError(f"the killer failed: {self._killer_error!r}") from self._killer_error

    # -- the shopper --------------------------------------------------------------------------------------
    def _on_unlock(self, lock: int) -> None:
        """The board released a latch: the shopper in front of that door pulls it open at once."""
        track = self.current
        if track is None or track.lock != lock or track.shut_at is not None or self.cab.lockboard is None:
            return
        if self.cab.lockboard.open_door(lock):
            if track.opened_at is None:
                track.opened_at = time.monotonic()
            track.opened.set()

    def _session(self, track: Track) -> None:
        cab, platform = self.cab, self.cab.platform
        assert platform is not None and cab.lockboard is not None and cab.scales is not None
        self.tracks.append(track)
        self.current = track
        self._arm(track)
        track.publishing_at = time.monotonic()   # the agent may unlock before send_command returns
        track.command_id = platform.send_command(
            "open_door", {"door": track.door, "session_id": track.session_id, "shopper": f"shopper-{track.n}",
                          "auth": "qr" if track.n % 3 else "face"})
        track.sent_at = time.monotonic()

        # 1. what became of the command: the door unlocked, a refusal, a journal row, or nothing
        first = wait(lambda: self._command_outcome(track), SESSION_END_S + LOST_AFTER_S,
                     f"session {track.n}: an answer to open_door {track.command_id}")
        if first in ("refused", "lost_command"):
            track.outcome = first
            self._finish(track)
            return
        if first == "opened":
            # 2. the agent counts the door opened (journaled), then the shopper takes and shuts
            wait(lambda: self._seen_open(track) or self._end_record(track), SESSION_END_S,
                 f"session {track.n}: door {track.door} seen open")
            for lane, qty in track.takes.items():
                if self._stock[lane] < qty:
                    raise HarnessError(f"lane {lane} is empty: run fewer points or raise STOCK")
                cab.take(lane, qty)
                self._stock[lane] -= qty
        cab.lockboard.close_door(track.lock)
        track.shut_at = time.monotonic()
        # 3. its record, whatever the kills did meanwhile
        wait(lambda: self._end_record(track), SESSION_END_S + TIMINGS.open_timeout_s,
             f"session {track.n}: its record on the platform")
        self._judge(track)
        self._finish(track)

    def _command_outcome(self, track: Track) -> str | None:
        if track.opened.is_set():
            return "opened"
        if self._end_record(track):
            return "ended"
        platform = self.cab.platform
        assert platform is not None
        journaled = self.probe.session(track.session_id) is not None
        reply = platform.replies.get(track.command_id or "")
        if journaled:
            # killed between the journal commit and the unlock frame: the agent never unlocks again
            # (rule 1/6), so the session runs into open_timeout_s and ends as session_timeout
            return "journaled" if self._up_for(TIMINGS.open_timeout_s + 1) else None
        replay = reply is not None and str(reply.get("error", "")).startswith("replay")
        if reply is not None and reply.get("ok") is False and not replay:
            track.detail = str(reply.get("error"))
            return "refused"
        if (reply is None or replay) and self._up_for(LOST_AFTER_S, since=track.sent_at or 0.0):
            # a redelivery refused as a replay of an id that was never journaled is a loss too
            track.detail = ("refused as a replay, never served" if replay
                            else "no reply, no unlock, no journal, no record")
            return "lost_command"
        return None

    def _up_for(self, seconds: float, since: float = 0.0) -> bool:
        """The daemon has been up (no kill under way) for ``seconds``, counted from ``since`` at the earliest."""
        with self._cond:
            return not self._busy and time.monotonic() - max(self._up_since, since) >= seconds

    def _seen_open(self, track: Track) -> bool:
        row = self.probe.session(track.session_id)
        return row is not None and row["opened_at"] is not None

    def _end_records(self, track: Track) -> list[dict[str, Any]]:
        platform = self.cab.platform
        assert platform is not None
        return [rec for rec in platform.records_in_order()
                if rec["body"].get("session_id") == track.session_id
                and (rec["type"] == "sale" or rec["body"].get("kind") in ("session_empty", "session_timeout"))]

    def _end_record(self, track: Track) -> dict[str, Any] | None:
        found = self._end_records(track)
        return found[0] if found else None

    def _judge(self, track: Track) -> None:
        """Is the one record of the session the session the shopper had?"""
        records = self._end_records(track)
        rec = records[0]
        track.record_seq = rec["seq"]
        if len(records) > 1:
            track.outcome, track.detail = "wrong", f"{len(records)} records: seqs {[r['seq'] for r in records]}"
            return
        kind = "sale" if rec["type"] == "sale" else rec["body"]["kind"]
        if track.opened_at is None:
            # never unlocked: nothing can have been taken (the door stayed latched)
            ok = kind == "session_timeout"
            track.outcome = kind if ok else "wrong"
            if not ok:
                track.detail = f"never unlocked, yet ended as {kind}: {json.dumps(rec['body'])[:300]}"
            return
        if not track.takes:
            ok = kind == "session_empty"
        else:
            items = [(i["lane"], i["qty"]) for i in rec["body"].get("items", [])] if kind == "sale" else []
            want = [(ln.lane, track.takes[ln.lane]) for ln in self.cab.lane_specs if ln.lane in track.takes]
            ok = kind == "sale" and items == want and rec["body"].get("flags") == []
        track.outcome = kind if ok else "wrong"
        if not ok:
            track.detail = f"took {track.takes}, recorded {kind}: {json.dumps(rec['body'])[:300]}"

    def _finish(self, track: Track) -> None:
        platform = self.cab.platform
        assert platform is not None
        if platform.chain_errors:
            self.figures.problems.append(f"after session {track.n}: chain errors {platform.chain_errors[:3]}")
        msg = (f"session {track.n:3d} door {track.door} {str(track.takes):22s} {track.outcome:15s} "
               f"kills: {', '.join(track.kills) or '-'}")
        if track.detail and track.outcome not in ("sale", "session_empty", "session_timeout"):
            msg += f"  ({track.detail})"
        self.say(msg)

    # -- the killer ---------------------------------------------------------------------------------------
    def _draw_point(self, track: Track) -> Point:
        rng = self.rng
        category = rng.choice(self.categories)
        platform = self.cab.platform
        assert platform is not None and self.cab.lockboard is not None
        delay = {
            "command": rng.uniform(0.0, 0.03), "unlock": rng.uniform(0.0, 0.15), "opened": rng.uniform(0.0, 0.9),
            "shut": rng.uniform(0.0, 0.8), "commit": rng.uniform(0.0, 0.004), "publish": rng.uniform(0.0, 0.02),
            "ack": rng.uniform(0.0, 1.2), "startup": rng.uniform(0.0, 1.3), "random": rng.uniform(0.0, 2.5),
        }[category]
        point = Point(category, delay, track, base_frames=self._unlock_frames(track.lock))
        if category == "commit":
            point.commit = rng.choice(COMMITS)
        if category == "startup":
            point.second_kill_s = rng.uniform(0.05, 0.8)
        return point

    def _arm(self, track: Track) -> None:
        """Draw this session's crash point once the previous one is done (or expired)."""
        with self._cond:
            previous = self._point
            if previous is not None and not previous.fired:
                # a publish/ack point may still fire an instant after its session's record arrived
                self._cond.wait_for(lambda: previous.fired or self._killer_error is not None, 1.0)
                if not previous.fired:
                    previous.cancelled = True
            self._cond.wait_for(lambda: not self._busy or self._killer_error is not None, 60)
            self._check_killer()
            self._point = self._draw_point(track)
            self._cond.notify_all()

    def _disarm(self) -> None:
        with self._cond:
            if self._point is not None and not self._point.fired:
                self._point.cancelled = True
            self._cond.wait_for(lambda: not self._busy or self._killer_error is not None, 60)

    def _triggered(self, p: Point) -> bool:
        t = p.track
        platform = self.cab.platform
        assert platform is not None
        now = time.monotonic()
        if t.sent_at is None:
            return False
        if p.category == "command":
            return True
        if p.category in ("publish", "ack", "startup") and p.journaled_at is None:
            if self.probe.session(t.session_id) is None:
                return False
            p.journaled_at, p.base_batches, p.base_acks = now, platform.batches, len(platform.acks_sent)
            return False
        if p.category == "startup":
            assert p.journaled_at is not None
            return now >= p.journaled_at + p.delay_s
        if p.category in ("unlock", "random"):
            frames = self._unlock_frame_times(t.lock)[p.base_frames:]
            return bool(frames) and (p.category == "unlock" or now >= frames[0] + p.delay_s)
        if p.category == "opened":
            return t.opened_at is not None
        if p.category == "shut":
            return t.shut_at is not None
        if p.category == "commit":
            assert p.commit is not None
            return self.probe.commit_reached(t.session_id, p.commit)
        if p.category == "publish":
            return platform.batches > p.base_batches
        if p.category == "ack":
            return len(platform.acks_sent) > p.base_acks
        raise AssertionError(p.category)

    def _killer_loop(self) -> None:
        try:
            while not self._stop.is_set():
                with self._cond:
                    p = self._point
                    if p is None or p.fired or p.cancelled:
                        self._cond.wait(0.05)
                        continue
                if not self._triggered(p):
                    time.sleep(0.001 if p.category == "commit" else 0.003)
                    continue
                with self._cond:
                    if p.cancelled:
                        continue
                    p.fired = True
                    self._busy = True
                    self._cond.notify_all()
                try:
                    if p.category not in ("startup", "random"):
                        time.sleep(p.delay_s)   # the random part of the crash point, not a synchronisation
                    self._kill(p.describe(), p.track)
                    self._start_agent(second_kill_s=p.second_kill_s, point=p)
                finally:
                    with self._cond:
                        self._busy = False
                        self._up_since = time.monotonic()
                        self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the driver
            log.exception("killer failed")
            with self._cond:
                self._killer_error = exc
                self._cond.notify_all()

    def _kill(self, what: str, track: Track) -> None:
        agent = self.cab.agent
        if agent is None:
            raise HarnessError("no daemon to kill")
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        self.cab.agent = None
        self.kills.append((time.monotonic(), what))
        track.kills.append(what)
        if track.outcome != "running":
            self.say(f"            kill {what} after session {track.n} ended")
        self.figures.points += 1
        cat = what.split(":")[0].split("+")[0]
        self.figures.by_category[cat] = self.figures.by_category.get(cat, 0) + 1

    def _start_agent(self, second_kill_s: float | None = None, point: Point | None = None) -> None:
        cab, platform = self.cab, self.cab.platform
        assert platform is not None
        if second_kill_s is not None and point is not None:
            cab.start_agent(wait=False)
            self.figures.restarts += 1
            time.sleep(second_kill_s)   # the random moment of the start-up to die in
            self._kill(f"startup:restart+{second_kill_s * 1000:.0f}ms", point.track)
        statuses = len(platform.statuses)
        cab.start_agent(wait=False)
        self.figures.restarts += 1
        agent = cab.agent
        assert agent is not None

        def online() -> bool:
            if agent.poll() is not None:
                raise HarnessError(f"the daemon exited with {agent.returncode} while starting; see {cab.agent_log}")
            status = platform.status or {}
            return len(platform.statuses) > statuses and status.get("online") is True

        wait(online, 60, "the daemon online again", interval=0.01)

    # -- the unlock frames ------------------------------------------------------------------------------
    def _unlock_frame_times(self, lock: int) -> list[float]:
        assert self.cab.lockboard is not None
        frame = UnlockRequest(1, lock).to_bytes()
        return [t for t, f in list(self.cab.lockboard.received) if f == frame]

    def _unlock_frames(self, lock: int) -> int:
        return len(self._unlock_frame_times(lock))

    # -- the end -----------------------------------------------------------------------------------------
    def _unsynced(self) -> int | None:
        """What the daemon reports over its control socket (the MQTT status is only sent on changes)."""
        try:
            answer = request(str(self.cab.workdir / "control.sock"), "status", timeout_s=5)
        except Exception:  # noqa: BLE001 - down or restarting: ask again
            return None
        return answer.get("result", {}).get("unsynced") if answer.get("ok") else None

    def _final_checks(self) -> None:
        cab, platform, fig = self.cab, self.cab.platform, self.figures
        assert platform is not None
        # everything the ledger holds reaches the platform, in a verified gap-free chain
        try:
            last = wait(lambda: self.probe.last_seq(), 10, "the ledger readable")
            wait(lambda: platform.contiguous_upto >= last, 60, f"records 1..{last} on the platform")
            wait(lambda: self._unsynced() == 0, 60, "the agent reporting 0 unsynced", interval=0.05)
        except HarnessError as exc:
            fig.problems.append(str(exc))
        last = self.probe.last_seq() or 0
        fig.records = last
        fig.duplicates = platform.duplicates
        held = {r["seq"]: r for r in platform.records_in_order()}
        ledger = Ledger(self.probe.path, readonly=True)
        try:
            bad, why = ledger.verify()
            if bad is not None:
                fig.problems.append(f"the agent's ledger does not verify: {why}")
            missing = [rec.seq for rec in ledger.records(newest_first=False)
                       if rec.seq not in held or held[rec.seq]["hash"] != rec.hash]
        finally:
            ledger.close()
        if missing:
            fig.losses += len(missing)
            fig.problems.append(f"ledger records missing or different on the platform: {missing[:20]}")
        if sorted(held) != list(range(1, len(held) + 1)) or platform.contiguous_upto != last:
            fig.problems.append(f"platform chain: holds {len(held)} records, contiguous up to "
                                f"{platform.contiguous_upto}, ledger last seq {last}")
        if platform.chain_errors:
            fig.problems.append(f"chain errors on the platform: {platform.chain_errors[:5]}")
        if platform.errors:
            fig.problems.append(f"contract errors on the platform: {platform.error_messages[:5]}")

        # unlock frames, attributed to the session of their door that was authorized last before them
        for lock in sorted({t.lock for t in self.tracks}):
            mine = [t for t in self.tracks if t.lock == lock and t.publishing_at is not None]
            counts: Counter[int] = Counter()
            for at in self._unlock_frame_times(lock):
                owner = max((t for t in mine if t.publishing_at is not None and t.publishing_at <= at),
                            key=lambda t: t.publishing_at or 0.0, default=None)
                if owner is None:
                    fig.problems.append(f"unlock frame for lock {lock} before any session")
                    continue
                counts[owner.n] += 1
            for t in mine:
                if counts[t.n] > 1:
                    fig.second_unlocks += counts[t.n] - 1
                    fig.problems.append(f"session {t.n}: {counts[t.n]} unlock frames (kills: {t.kills})")

        refused_ids = {b.get("command_id") for b in platform.events("command_rejected")}
        for t in self.tracks:
            fig.outcomes[t.outcome] = fig.outcomes.get(t.outcome, 0) + 1
            if t.outcome.startswith("lost"):
                fig.losses += 1
                fig.problems.append(f"session {t.n} lost ({t.outcome}: {t.detail}; kills: {t.kills})")
            elif t.outcome == "wrong":
                fig.wrong += 1
                fig.problems.append(f"session {t.n} wrong: {t.detail} (kills: {t.kills})")
            elif t.outcome == "refused":
                fig.refused += 1
                if t.command_id not in refused_ids:
                    fig.losses += 1
                    fig.problems.append(f"session {t.n}: refused ({t.detail}) without a command_rejected record")
            else:
                if t.outcome == "session_timeout":
                    fig.timeouts += 1
                ends = self._end_records(t)
                if len(ends) != 1:   # a later restart must not have ended it once more
                    fig.wrong += 1
                    seqs = [r["seq"] for r in ends]
                    fig.problems.append(f"session {t.n}: {len(ends)} records at the end, seqs {seqs}")
        fig.sessions = len(self.tracks)
        if cab.agent is not None and cab.agent.poll() is not None:
            fig.problems.append(f"the daemon exited with {cab.agent.returncode}")


def run(workdir: Path, points: int, seed: int, categories: Iterable[str] = CATEGORIES,
        say: Callable[[str], None] = print) -> Figures:
    return CrashHarness(workdir, points=points, seed=seed, categories=categories, say=say).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=100, help="SIGKILLs to deal (default 100)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--categories", default=",".join(CATEGORIES),
                        help=f"comma-separated subset of {','.join(CATEGORIES)}")
    parser.add_argument("--workdir", type=Path, default=None, help="keep everything here (default: a temp dir, "
                        "removed when the run is clean)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object too")
    parser.add_argument("-q", "--quiet", action="store_true", help="no line per session")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="crashpoints-"))
    say = (lambda _m: None) if args.quiet else (lambda m: print(m, flush=True))
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    print(f"crash points: {args.points} SIGKILLs, seed {args.seed}, categories {','.join(categories)}; "
          f"work dir {workdir}", flush=True)
    try:
        figures = run(workdir, args.points, args.seed, categories, say)
    except HarnessError as exc:
        print(f"harness failed: {exc}; everything is kept in {workdir}", file=sys.stderr)
        return 2
    print(figures.text())
    if args.json:
        print(json.dumps(figures.as_dict()))
    if figures.ok and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not figures.ok:
        print(f"kept for a post-mortem: {workdir} (agent log: {workdir / 'cab' / 'agent.log'})")
    return 0 if figures.ok else 1


if __name__ == "__main__":
    if os.environ.get("CRASHPOINTS_DEBUG"):
        logging.getLogger().setLevel(logging.DEBUG)
    sys.exit(main())

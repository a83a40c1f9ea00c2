"""The shopping-session state machine of one door (operations.md, Shopping sessions).

Functional core: ``DoorMachine.step`` takes the time, the door's latest feedback reading and
whether the lanes behind it are stable, and returns actions; it owns no thread, socket or
clock, so tests drive it with a fake clock. The imperative shell (agent.core) journals and
records what the actions say.

Door feedback reads open while the latch is released after a pulse *and* while the door
is open, so a reading only means "the door is open" more than ``latch_release_s + 0.5 s``
after the last pulse (serial.md).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class DoorBusy(Exception):
    """A session was begun on a door that already has one (a bug in the caller)."""


class Phase(enum.Enum):
    WAIT_OPEN = "unlocked"       # pulse sent, door not yet pulled open
    OPEN = "open"                # shopper has the door open
    SETTLING = "settling"        # door shut, waiting for stable weights
    TIMED_OUT = "timed_out"      # never opened within open_timeout_s: settle to be sure nothing was taken


@dataclass(frozen=True)
class Timing:
    latch_release_s: float = 0.5
    open_timeout_s: float = 30.0
    door_open_alarm_s: float = 120.0
    settle_s: float = 1.5
    give_up_s: float = 30.0   # past settle_s, stop waiting for stable lanes (a faulted or shaking scale)

    @property
    def ambiguous_s(self) -> float:
        """After a pulse, feedback 'open' may only be the released latch for this long."""
        return self.latch_release_s + 0.5


@dataclass
class ActiveSession:
    session_id: str
    door: int
    shopper: str
    unlock_at: float                 # monotonic time of the unlock pulse
    phase: Phase = Phase.WAIT_OPEN
    opened_at: float | None = None   # wall-clock epochs, journaled
    closed_at: float | None = None
    settle_from: float | None = None  # monotonic: weights must be stable for settle_s after this
    scans: list[str] = field(default_factory=list)
    door_read: bool = True   # False for a session resumed after a restart until its door was read



# -- actions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Opened:
    session_id: str
    at: float  # wall epoch


@dataclass(frozen=True)
class Closed:
    session_id: str
    at: float


@dataclass(frozen=True)
class Reopened:
    session_id: str


@dataclass(frozen=True)
class Settle:
    """Compute the weight changes now and end the session (sale, session_empty or session_timeout)."""

    session_id: str
    timed_out: bool
    weigh: bool = True   # False: end as session_timeout without looking at the weights


@dataclass(frozen=True)
class DoorForced:
    door: int


@dataclass(frozen=True)
class LeftOpen:
    door: int
    session_id: str | None
    open_s: float


@dataclass(frozen=True)
class LeftOpenCleared:
    door: int


Action = Opened | Closed | Reopened | Settle | DoorForced | LeftOpen | LeftOpenCleared


class DoorMachine:
    """Everything the agent decides about one door from its feedback over time."""

    def __init__(self, door: int, timing: Timing) -> None:
        self.door = door
        self.timing = timing
        self.session: ActiveSession | None = None
        self.last_pulse_at: float | None = None
        self.service_allowed = False      # a service unlock lets this door open without a session
        self._service_opened = False
        self.is_open: bool | None = None  # physical door state as last decided (None = unknown)
        self.open_since: float | None = None
        self.left_open_alarm = False
        self.forced_reported = False

    # -- inputs from the shell ------------------------------------------------------------
    def begin(self, session: ActiveSession) -> None:
        if self.session is not None:
            raise DoorBusy(f"door {self.door} already has session {self.session.session_id}")
        self.session = session
        self.last_pulse_at = session.unlock_at

    def service_unlock(self, now: float) -> None:
        self.last_pulse_at = now
        self.service_allowed = True
        self._service_opened = False

    def end_session(self) -> ActiveSession | None:
        session, self.session = self.session, None
        return session

    @property
    def busy(self) -> bool:
        return self.session is not None

    def _in_pulse(self, now: float) -> bool:
        return self.last_pulse_at is not None and now - self.last_pulse_at <= self.timing.ambiguous_s

    def reported(self, now: float, feedback_open: bool | None) -> tuple[bool | None, bool | None]:
        """(open, locked) as the status reports the door: unknown while the board is silent;
        a feedback "open" right after a pulse may only be the released latch, so it is not
        reported as an open door until the machine has decided so."""
        if feedback_open is None:
            return None, None
        if not feedback_open:
            return False, True
        return (not self._in_pulse(now) and bool(self.is_open)), False

    # -- the step ---------------------------------------------------------------------------
    def step(self, now: float, wall: float, feedback_open: bool | None, lanes_stable: bool) -> list[Action]:
        """Advance to ``now`` given the latest feedback (None: board not answering)."""
        actions: list[Action] = []
        if feedback_open is not None and self.session is not None:
            self.session.door_read = True
        if feedback_open is True and not self._in_pulse(now):
            self._door_open(now, wall, actions)
        elif feedback_open is False:
            self._door_shut(now, wall, actions)
        self._timers(now, wall, lanes_stable, actions)
        return actions

    def _door_open(self, now: float, wall: float, actions: list[Action]) -> None:
        if self.open_since is None:
            self.open_since = now
        self.is_open = True
        s = self.session
        if s is not None and s.phase is Phase.TIMED_OUT:
            # Rule 2: the session ended at the timeout and the latch has long re-engaged, so
            # this opening is not the shopper's: end the session as timed out, unweighed, and
            # treat the door as forced (rule 7).
            if s.settle_from is not None:
                s.settle_from = None
                actions.append(Settle(s.session_id, timed_out=True, weigh=False))
            s = None
        if s is not None:
            if s.phase is Phase.WAIT_OPEN:
                s.phase = Phase.OPEN
                s.opened_at = wall
                actions.append(Opened(s.session_id, wall))
            elif s.phase is Phase.SETTLING:
                s.phase = Phase.OPEN
                s.closed_at = None
                s.settle_from = None
                actions.append(Reopened(s.session_id))
        elif self.service_allowed:
            self._service_opened = True
        elif not self.forced_reported:
            self.forced_reported = True
            actions.append(DoorForced(self.door))
        if not self.left_open_alarm and now - self.open_since > self.timing.door_open_alarm_s:
            self.left_open_alarm = True
            actions.append(LeftOpen(self.door, s.session_id if s else None, round(now - self.open_since, 1)))

    def _door_shut(self, now: float, wall: float, actions: list[Action]) -> None:
        self.is_open = False
        self.open_since = None
        self.forced_reported = False
        if self.left_open_alarm:
            self.left_open_alarm = False
            actions.append(LeftOpenCleared(self.door))
        if self.service_allowed and (self._service_opened or not self._in_pulse(now)):
            # the operator's door is shut again, or was never pulled open while released
            self.service_allowed = False
            self._service_opened = False
        s = self.session
        if s is not None and s.phase is Phase.OPEN:
            s.phase = Phase.SETTLING
            s.closed_at = wall
            s.settle_from = now
            actions.append(Closed(s.session_id, wall))

    def _timers(self, now: float, wall: float, lanes_stable: bool, actions: list[Action]) -> None:
        s = self.session
        if s is None:
            return
        # A resumed session is not timed out before its door was read: the shopper may have
        # opened it while the agent was down (rule 6).
        if s.phase is Phase.WAIT_OPEN and s.door_read and now - s.unlock_at > self.timing.open_timeout_s:
            s.phase = Phase.TIMED_OUT
            s.settle_from = now
        if s.phase in (Phase.SETTLING, Phase.TIMED_OUT) and s.settle_from is not None:
            waited = now - s.settle_from
            timed_out = s.phase is Phase.TIMED_OUT
            if lanes_stable and waited >= self.timing.settle_s:
                actions.append(Settle(s.session_id, timed_out=timed_out))
            elif waited >= self.timing.settle_s + self.timing.give_up_s:
                # Never hang a door on a scale: a session that timed out ends unweighed; a shut
                # door's session is weighed with the readings there are.
                actions.append(Settle(s.session_id, timed_out=timed_out, weigh=not timed_out))


def resume_phase(opened_at: float | None, closed_at: float | None) -> Phase:
    """The phase a journaled session resumes in after a restart (sessions rule 6)."""
    if opened_at is None:
        return Phase.WAIT_OPEN
    if closed_at is None:
        return Phase.OPEN
    return Phase.SETTLING

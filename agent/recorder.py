"""Every ledger write of the core, with one policy for when the ledger fails.

The policy, held here once: a write that fails flags the ledger unwritable (alarm
``ledger_unwritable``, no new sessions) and is never silently lost: events that could not be
written wait in memory, in order and with their original time, and are written as soon as
housekeeping finds the ledger writable again. A unique-key clash (a session id used before)
is the caller's problem, not the ledger's, and does not flag it.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import sqlite3
from collections.abc import Iterator
from typing import Any

from agent.clock import Clock
from agent.errors import AgentError
from agent.protocol import RecordType, canonical
from agent.store.ledger import Ledger, Tx

log = logging.getLogger(__name__)

MAX_PENDING_EVENTS = 10_000   # events kept in memory while the ledger cannot accept them


class RecordFailed(AgentError):
    """The ledger did not accept a write; it is now flagged unwritable."""


class RecordConflict(AgentError):
    """A write clashed with a unique key (e.g. a session id used before); the ledger is fine."""


class Recorder:
    def __init__(self, ledger: Ledger, clock: Clock) -> None:
        self.ledger = ledger
        self.clock = clock
        self.writable = True
        self._pending: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self._dropped = 0

    # -- writes ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        """A ledger transaction; RecordConflict or RecordFailed (ledger flagged) on failure."""
        try:
            with self.ledger.transaction() as tx:
                yield tx
        except sqlite3.IntegrityError as exc:
            raise RecordConflict(str(exc)) from exc
        except (sqlite3.Error, OSError, AgentError) as exc:
            self.failed(exc)
            raise RecordFailed(str(exc)) from exc

    def event(self, kind: str, **fields: Any) -> bool:
        """Record an event now; while the ledger is unwritable it waits in memory."""
        body = {"kind": kind, **fields}
        at = self.clock.now_ts()
        try:
            canonical(body)
        except (TypeError, ValueError, RecursionError) as exc:   # incl. UnicodeEncodeError
            log.error("event %s cannot be recorded, its content is not JSON text: %s", kind, exc)
            return False
        if self.writable and not self._pending:
            try:
                with self.transaction() as tx:
                    tx.append(RecordType.EVENT, body, at)
            except (RecordFailed, RecordConflict):
                self._keep(at, body)
                return False
        else:
            self._keep(at, body)
            return False
        log.info("event %s", kind)
        log.debug("event %s %s", kind, json.dumps(fields, ensure_ascii=False))
        return True

    def journal(self, session_id: str, **fields: Any) -> bool:
        """Update a journaled session (phase changes, scans); False if the ledger failed."""
        try:
            with self.transaction() as tx:
                tx.update_session(session_id, **fields)
        except (RecordFailed, RecordConflict):
            return False
        return True

    def remember_command(self, command_id: str, until: float) -> bool:
        """Persist a command id (replay protection across restarts); False if the ledger failed."""
        try:
            with self.transaction() as tx:
                tx.remember_command(command_id, until)
        except (RecordFailed, RecordConflict):
            return False
        return True

    def failed(self, exc: BaseException) -> None:
        if self.writable:
            log.error("the ledger cannot accept records: %s", exc)
        self.writable = False

    # -- recovery ------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._pending)

    def recheck(self) -> None:
        """Housekeeping: is the ledger writable again? Then write what waited, in order."""
        if self.writable and not self._pending:
            return
        waiting = list(self._pending)
        try:
            with self.ledger.transaction() as tx:
                for at, body in waiting:
                    tx.append(RecordType.EVENT, body, at)
        except (sqlite3.Error, OSError, AgentError) as exc:
            self.failed(exc)   # nothing was written: every event still waits, in order
            return
        for _ in waiting:
            self._pending.popleft()
        if not self.writable:
            log.warning("the ledger accepts records again")
        self.writable = True
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            log.error("%d events could not be kept while the ledger was unwritable", dropped)

    def _keep(self, at: str, body: dict[str, Any]) -> None:
        if len(self._pending) >= MAX_PENDING_EVENTS:
            self._dropped += 1
            return
        self._pending.append((at, body))

    # -- reads the rules need ----------------------------------------------------------------------
    def lane_rows(self) -> dict[str, dict[str, Any]]:
        return self.ledger.lane_rows()

    def journaled(self, session_id: str) -> dict[str, Any] | None:
        return next((r for r in self.ledger.active_sessions() if r["session_id"] == session_id), None)

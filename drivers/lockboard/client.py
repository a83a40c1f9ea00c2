"""Device client of one "8A/80" lock board: unlock, query one lock, query all locks.

It turns raw feedback bits into "open" with the board's ``feedback_open`` polarity, and
enforces the spec's safety rule that an unlock is never re-sent blindly: a lost unlock reply
is followed by a query of the lock, and only a lock that reads shut is pulsed once more.
"""

from __future__ import annotations

import logging

from drivers.errors import LinkError, LinkTimeout
from drivers.lockboard.codec import (
    MAX_LOCKS,
    QueryAllRequest,
    QueryRequest,
    UnlockFailed,
    UnlockRequest,
    reply_extractor,
)
from drivers.serial_link import SerialLink

log = logging.getLogger(__name__)

__all__ = ["LockBoardClient", "UnlockFailed"]


class LockBoardClient:
    """Talks to the board at ``address`` over ``link``; the link is owned by the caller's thread.

    ``timeout_s`` is the reply timeout per request (None: the link's own ``timeout_s``).
    LinkTimeout / LinkError from the link propagate, except where unlock handles them.
    """

    def __init__(
        self, link: SerialLink, address: int, feedback_open: int = 1, timeout_s: float | None = None
    ) -> None:
        if isinstance(address, bool) or not isinstance(address, int) or not 1 <= address <= 255:
            raise ValueError(f"board address must be 1..255, got {address!r}")
        if feedback_open not in (0, 1) or isinstance(feedback_open, bool):
            raise ValueError(f"feedback_open must be 0 or 1, got {feedback_open!r}")
        self.link = link
        self.address = address
        self.feedback_open = feedback_open
        self.timeout_s = timeout_s

    def _is_open(self, raw_set: bool) -> bool:
        """Apply the wiring polarity: with feedback_open=0 a clear bit means open."""
        return raw_set == bool(self.feedback_open)

    @staticmethod
    def _check_lock(lock: int) -> None:
        if isinstance(lock, bool) or not isinstance(lock, int) or not 1 <= lock <= MAX_LOCKS:
            raise ValueError(f"lock must be 1..{MAX_LOCKS}, got {lock!r}")

    def _send_unlock(self, lock: int) -> bool:
        request = UnlockRequest(self.address, lock)
        reply = self.link.transact(request.to_bytes(), reply_extractor(request), self.timeout_s)
        return self._is_open(reply.raw_set)

    def unlock(self, lock: int) -> bool:
        """Pulse the latch of ``lock``; True when its feedback reads open right after the pulse.

        A lost reply does not mean the pulse was lost, and a second pulse on a door the shopper
        is already pulling is not harmless, so the lock is queried first: open means the first
        pulse worked; shut means it may be pulsed once more. UnlockFailed when the outcome
        cannot be confirmed (query unanswered, or the second pulse unanswered too).
        """
        self._check_lock(lock)
        log.info("board %d: unlock lock %d", self.address, lock)
        try:
            return self._send_unlock(lock)
        except (LinkTimeout, LinkError) as exc:
            log.warning("board %d: unlock reply for lock %d lost (%s); querying before any re-send",
                        self.address, lock, exc)
        try:
            if self.query(lock):
                log.info("board %d: lock %d reads open, the lost-reply unlock worked", self.address, lock)
                return True
        except (LinkTimeout, LinkError) as exc:
            log.error("board %d: no answer to the query after a lost unlock reply of lock %d", self.address, lock)
            raise UnlockFailed(f"board {self.address} lock {lock}: unlock unconfirmed, board silent") from exc
        log.warning("board %d: lock %d reads shut after a lost unlock reply; sending the unlock once more",
                    self.address, lock)
        try:
            return self._send_unlock(lock)
        except (LinkTimeout, LinkError) as exc:
            log.error("board %d: second unlock of lock %d unanswered too", self.address, lock)
            raise UnlockFailed(f"board {self.address} lock {lock}: no reply to the unlock, twice") from exc

    def query(self, lock: int) -> bool:
        """Feedback of one lock: True = open (latch released or door not shut)."""
        self._check_lock(lock)
        request = QueryRequest(self.address, lock)
        reply = self.link.transact(request.to_bytes(), reply_extractor(request), self.timeout_s)
        return self._is_open(reply.raw_set)

    def query_all(self) -> dict[int, bool]:
        """Feedback of locks 1..24 in one frame: {lock: open}; what the poller calls every cycle."""
        request = QueryAllRequest(self.address)
        reply = self.link.transact(request.to_bytes(), reply_extractor(request), self.timeout_s)
        return {lock: self._is_open(bit) for lock, bit in reply.raw_bits().items()}

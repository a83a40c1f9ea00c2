"""Bookkeeping of the QoS 1 messages the link has received but not yet acknowledged.

mqtt.md v1.1: a command's PUBACK goes out only once its outcome is committed, so the
acknowledgement of a message can come long after it arrived, on another connection or never
(a crash: the broker then delivers it again, which is the point). What has to be right:

- an ack belongs to the broker *session*, not to the TCP connection: after a reconnect into the
  same session the broker resends every unacknowledged PUBLISH with its original packet id
  and the DUP flag, so a late ack for that id is still the right ack;
- a session that is gone (CONNACK "session present" = 0) makes every old packet id meaningless:
  an ack for one of them must never be sent, it could acknowledge another message;
- a redelivery (DUP) of a message whose owner still holds it is not handed over a second time;
- an ack given while offline is sent right after the next CONNACK of the same session, and the
  redelivery that may already be on its way is then dropped, not delivered again.

Pure state, no I/O: the link calls it from its own thread only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AckToken:
    """What the owner of a message hands back to release it: its packet id in a session."""

    mid: int
    qos: int
    session: int


class AckBook:
    """Held packet ids of the current broker session (see the module docstring)."""

    def __init__(self) -> None:
        self.session = 0
        self._pending: set[int] = set()   # handed to their owner, not acked yet
        self._owed: set[int] = set()      # acked by their owner while offline
        self._acked_late: set[int] = set()  # PUBACK sent after a reconnect; a DUP may still come

    @property
    def pending(self) -> int:
        return len(self._pending)

    def on_connect(self, session_present: bool) -> list[int]:
        """A CONNACK arrived; returns the packet ids to acknowledge right now."""
        if not session_present:
            self.session += 1
            self._pending.clear()
            self._owed.clear()
            self._acked_late.clear()
            return []
        late = sorted(self._owed)
        self._acked_late = set(late)
        self._owed.clear()
        return late

    def admit(self, mid: int, dup: bool) -> bool:
        """A PUBLISH that its owner acknowledges arrived: hand it over (True) or drop it (False)."""
        if mid in self._acked_late:
            self._acked_late.discard(mid)
            if dup:
                return False  # the redelivery of what we acknowledged after the reconnect
        if dup and mid in self._pending:
            return False  # the owner still holds the first delivery; its ack covers this one
        self._pending.add(mid)
        return True

    def token(self, mid: int, qos: int) -> AckToken:
        return AckToken(mid, qos, self.session)

    def release(self, token: AckToken, connected: bool) -> bool:
        """The owner is done with a message: True when its PUBACK is to be sent now."""
        if token.session != self.session or token.mid not in self._pending:
            return False  # an old session's id, or acked already
        self._pending.discard(token.mid)
        if connected:
            return True
        self._owed.add(token.mid)
        return False

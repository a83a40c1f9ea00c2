"""Record delivery to the platform: batches from the ledger, resent until the platform acks.

Owned by the core thread. Delivery is at least once: after a reconnect, or ``ack_timeout_s``
without progress, everything from the first unacknowledged record is sent again; the platform
deduplicates by (cabinet, seq). At most ``window`` records are outstanding, and each batch is
read from SQLite when it is sent, so a backlog of weeks is streamed, never loaded whole.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from agent.protocol import MAX_BATCH_BYTES
from agent.store.ledger import Ledger

log = logging.getLogger(__name__)



class Syncer:
    def __init__(self, ledger: Ledger, cabinet_id: str, publish: Callable[[bytes], int | None],
                 max_batch: int = 100, ack_timeout_s: float = 30.0, window: int = 5000) -> None:
        self.ledger = ledger
        self.publish = publish
        self.max_batch = max_batch
        self.ack_timeout_s = ack_timeout_s
        self.window = max(window, max_batch)
        self._head = f'{{"cabinet":{json.dumps(cabinet_id, ensure_ascii=False)},"records":['.encode()
        self._record_budget = MAX_BATCH_BYTES - len(self._head) - 2
        self.sent_upto = ledger.acked_upto
        # the highest seq known to be with the platform since the last rewind: what is out in
        # flight is counted from here, also when a resend goes below the ack watermark
        self.confirmed = self.sent_upto
        self.last_progress = 0.0
        self.batches_sent = 0

    def rewind(self, now: float, to_seq: int | None = None) -> None:
        """Send again from ``to_seq + 1`` (default: from the first unacknowledged record)."""
        target = self.ledger.acked_upto if to_seq is None else max(0, to_seq)
        self.sent_upto = min(target, self.ledger.last_seq)  # a resend beyond the end must not skip new records
        self.confirmed = self.sent_upto
        self.last_progress = now

    def on_ack(self, upto: int, now: float) -> bool:
        """Apply a platform ack; returns True when it moved the watermark."""
        if upto > self.ledger.last_seq:
            log.warning("ignoring ack upto %d: the last seq is %d", upto, self.ledger.last_seq)
            return False
        if upto > self.confirmed:
            # also an ack that does not move the watermark answers a resend below it: the
            # platform has everything up to ``upto``, so sending that part again is pointless
            self.confirmed = upto
            self.sent_upto = max(self.sent_upto, upto)
        if not self.ledger.set_acked(upto):
            return False
        self.last_progress = now
        return True

    def pump(self, now: float, connected: bool) -> int:
        """Publish what the window allows; returns the number of records handed to the link."""
        if not connected:
            return 0
        acked = self.ledger.acked_upto
        if self.sent_upto > self.confirmed and now - self.last_progress > self.ack_timeout_s:
            log.info("no ack progress for %.0f s: resending from seq %d", now - self.last_progress, acked + 1)
            self.rewind(now)
        sent = 0
        last_seq = self.ledger.last_seq
        floor = self.confirmed
        while self.sent_upto < last_seq and self.sent_upto - floor < self.window:
            room = min(self.max_batch, self.window - max(0, self.sent_upto - floor))
            records, last = self.ledger.batch_from(self.sent_upto + 1, room, self._record_budget)
            if not records:
                nxt = self.ledger.first_seq_from(self.sent_upto + 1)
                if nxt is None:
                    break
                self.sent_upto = nxt - 1  # pruned records: continue at the next one kept
                continue
            payload = self._head + ",".join(records).encode() + b"]}"
            if self.publish(payload) is None:
                break
            if self.sent_upto <= floor:
                self.last_progress = now  # the ack clock starts when something is outstanding
            self.sent_upto = last
            self.batches_sent += 1
            sent += len(records)
        return sent

"""The catalog installer thread: installs can take seconds (a national catalog), so they run
off the core thread; the core is told the outcome and records the event.

Bounded: on the snapshot topic at most one document waits, the newest (a snapshot that arrives
while an older one waits replaces it: installing the older one first would be wasted work, and
holding both would hold two national catalogs). On the delta and per-cabinet topics up to
``max_waiting`` wait in order, because a newer delta does not make an older one useless: the
deltas queued in the session while a cabinet was offline arrive in a burst at the reconnect,
and keeping only the last would turn them into a base_mismatch and a full snapshot download;
beyond that the oldest waiting one is superseded. A waiting document larger than 1 MiB is a
spool file, not bytes (``agent.mqtt_payload``), so what waits costs disk, not memory. Documents
are installed in the order they were submitted. A file install from ``cabinetctl`` runs under
the same lock, so two installs never interleave.

Acknowledgement (mqtt.md v1.1): an MQTT document is acknowledged (``Document.finish``) once it
is installed or rejected, after its outcome is posted to the core; a superseded one when it is
replaced. One not yet handled when the daemon stops is not acknowledged: the broker delivers
it again at the next start.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

from agent.errors import CatalogError
from agent.events import CatalogOutcome
from agent.mqtt_payload import Document
from agent.store.catalog import CatalogStore

log = logging.getLogger(__name__)


SNAPSHOT_TOPIC = "cab/v1/catalog"


class CatalogWorker(threading.Thread):
    def __init__(self, store: CatalogStore, post: Callable[[Any], None], max_waiting: int = 4) -> None:
        super().__init__(name="catalog", daemon=True)
        self.store = store
        self.post = post
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._waiting: collections.deque[Document] = collections.deque()
        self._stopped = False
        self._lock = threading.Lock()

    def submit(self, doc: Document) -> None:
        """Queue a document from the link (any thread); see the module docstring for what it supersedes."""
        superseded: list[Document] = []
        with self._cond:
            if self._stopped:
                log.info("catalog worker stopped: %r left to the broker", doc)
                return  # not handled: not acknowledged, the broker keeps it
            same = [d for d in self._waiting if d.topic == doc.topic]
            keep = 0 if doc.topic == SNAPSHOT_TOPIC else self.max_waiting - 1
            superseded = same[:max(0, len(same) - keep)]
            for old in superseded:
                self._waiting.remove(old)
            self._waiting.append(doc)
            self._cond.notify()
        for old in superseded:
            log.info("catalog document on %s (%d bytes) superseded by a newer one before its install",
                     old.topic, len(old))
            old.finish()

    def submit_bytes(self, data: bytes, source: str) -> None:
        """Queue a document held in memory (the core's path when the link has no catalog sink)."""
        self.submit(Document.from_bytes(source, data))

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self.is_alive():
            self.join(5.0)

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                doc = self._waiting.popleft()
            self._install(doc)

    def _install(self, doc: Document) -> None:
        source = doc.topic
        try:
            with self._lock:
                if doc.in_memory:
                    result = self.store.install_bytes(doc.read())
                else:
                    result = self.store.install_stream(doc.open, len(doc))
            log.info("catalog from %s: %s version %s", source, result.outcome, result.version)
            self.post(CatalogOutcome(source, result=result))
        except CatalogError as exc:
            log.warning("catalog from %s rejected: %s (%s)", source, exc.reason, exc)
            self.post(CatalogOutcome(source, error=exc))
        except Exception as exc:  # noqa: BLE001 - never die on input
            log.exception("catalog install from %s failed", source)
            self.post(CatalogOutcome(source, error=CatalogError("invalid", str(exc))))
        doc.finish()

    def install_file(self, path: str, progress: Callable[[int, int], None] | None = None) -> Any:
        """Install from a file (cabinetctl); the outcome is also posted to the core for its event."""
        try:
            with self._lock:
                result = self.store.install_file(path, progress)
        except CatalogError as exc:
            self.post(CatalogOutcome(f"file {path}", error=exc))
            raise
        self.post(CatalogOutcome(f"file {path}", result=result))
        return result

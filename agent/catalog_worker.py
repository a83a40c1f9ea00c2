"""The catalog installer thread: installs can take seconds (a national catalog), so they run
off the core thread; the core is told the outcome and records the event.

Bounded: at most one document waits per topic, the newest (a snapshot that arrives while an
older one waits replaces it: installing the older one first would be wasted work, and holding
both would hold two national catalogs). A waiting MQTT document is a spool file, not bytes.
Documents are installed in the order their topics first got one waiting. A file install from
``cabinetctl`` runs under the same lock, so two installs never interleave.

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


class CatalogWorker(threading.Thread):
    def __init__(self, store: CatalogStore, post: Callable[[Any], None]) -> None:
        super().__init__(name="catalog", daemon=True)
        self.store = store
        self.post = post
        self._cond = threading.Condition()
        self._waiting: collections.OrderedDict[str, Document] = collections.OrderedDict()
        self._stopped = False
        self._lock = threading.Lock()

    def submit(self, doc: Document) -> None:
        """Queue a document from the link (any thread); it replaces one waiting on its topic."""
        with self._cond:
            if self._stopped:
                old: Document | None = doc  # not handled: not acknowledged, the broker keeps it
            else:
                old = self._waiting.get(doc.topic)
                self._waiting[doc.topic] = doc  # an existing key keeps its place in the order
                self._cond.notify()
        if old is doc:
            log.info("catalog worker stopped: %r left to the broker", doc)
        elif old is not None:
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
                _topic, doc = self._waiting.popitem(last=False)
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

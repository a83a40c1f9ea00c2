"""The catalog installer thread: installs can take seconds (a national catalog), so they run
off the core thread; the core is told the outcome and records the event.

MQTT documents are queued and installed in arrival order; a file install from ``cabinetctl``
runs under the same lock, so two installs never interleave.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from agent.store.catalog import CatalogStore
from agent.errors import CatalogError
from agent.events import CatalogOutcome

log = logging.getLogger(__name__)


class CatalogWorker(threading.Thread):
    def __init__(self, store: CatalogStore, post: Callable[[Any], None]) -> None:
        super().__init__(name="catalog", daemon=True)
        self.store = store
        self.post = post
        self._jobs: queue.Queue[tuple[bytes, str] | None] = queue.Queue()
        self._lock = threading.Lock()

    def submit_bytes(self, data: bytes, source: str) -> None:
        self._jobs.put((data, source))

    def stop(self) -> None:
        self._jobs.put(None)
        self.join(5.0)

    def run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            data, source = job
            try:
                with self._lock:
                    result = self.store.install_bytes(data)
                log.info("catalog from %s: %s version %s", source, result.outcome, result.version)
                self.post(CatalogOutcome(source, result=result))
            except CatalogError as exc:
                log.warning("catalog from %s rejected: %s (%s)", source, exc.reason, exc)
                self.post(CatalogOutcome(source, error=exc))
            except Exception as exc:  # noqa: BLE001 - never die on input
                log.exception("catalog install from %s failed", source)
                self.post(CatalogOutcome(source, error=CatalogError("invalid", str(exc))))

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

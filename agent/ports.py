"""The small interfaces the core and the sessions call out through.

The daemon plugs in the real threads (MQTT link, lock board, catalog installer); a unit test
plugs in fakes that record what they were asked, so ``Core`` runs in-process with no thread,
broker or serial port.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from agent.events import Inbound
from agent.rules.commands import Rejected


class Link(Protocol):
    """The platform link (agent.mqtt_link.MqttLink)."""

    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None: ...

    def resubscribe(self, topic: str) -> None: ...

    def ack(self, msg: Inbound) -> None: ...


class LockBoard(Protocol):
    """The lock board's owner thread (agent.devices.LockboardThread)."""

    def unlock(self, lock: int, token: str) -> None: ...

    def probe(self) -> None: ...


class CatalogInstaller(Protocol):
    """The catalog installer thread (agent.catalog_worker.CatalogWorker)."""

    def submit_bytes(self, data: bytes, source: str) -> None: ...


@dataclass
class Ports:
    """What the core talks to; any of them may be absent (a cabinet without a link yet)."""

    link: Link | None = None
    lockboard: LockBoard | None = None
    catalog: CatalogInstaller | None = None


class Outbox(Protocol):
    """What the sessions ask of the core: answers to the platform, unlocks, a status refresh."""

    def reply(self, command_id: str | None, ok: bool, *, error: str | None = None, result: Any = None) -> None: ...

    def reject(self, rej: Rejected) -> None: ...

    def unlock(self, door: int, token: str) -> None: ...

    def probe_lockboard(self) -> None: ...

    def status_changed(self) -> None: ...

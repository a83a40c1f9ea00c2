"""Messages other threads post to the core's inbox (besides the device and link messages
defined next to the threads that send them)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from agent.errors import CatalogError


@dataclass
class ControlCall:
    """A cabinetctl request executed on the core thread."""

    fn: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)


@dataclass(frozen=True)
class CatalogOutcome:
    """What a catalog install did: ``result`` (an InstallResult) or ``error``."""

    source: str
    result: Any = None
    error: CatalogError | None = None


@dataclass(frozen=True)
class ScanSeen:
    """A debounced code from the camera."""

    symbology: str
    text: str
    gtin: str | None

"""Every item other threads post to the core's inbox: devices, the platform link, the
control socket, the catalog installer and the camera. The core dispatches on their types."""

from __future__ import annotations

import enum
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from agent.errors import CatalogError
from agent.mqtt_acks import AckToken


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


# -- devices ----------------------------------------------------------------------------------
class DeviceKind(enum.StrEnum):
    """The devices that can fault; the values are mqtt.md's ``hardware_recovered.device``."""

    LOCKBOARD = "lockboard"
    SCALE = "scale"
    CAMERA = "camera"


@dataclass(frozen=True)
class DoorFeedback:
    """Raw feedback per lock (True = contact open), or None when the board did not answer."""

    states: dict[int, bool] | None
    at: float


@dataclass(frozen=True)
class UnlockDone:
    lock: int
    token: str
    ok: bool
    at: float
    detail: str = ""


@dataclass(frozen=True)
class CameraDegraded:
    """The camera runs without some of its barcode decoders (``missing``: "zbar", "zxing");
    an empty ``missing`` means it has all of them again."""

    missing: tuple[str, ...]
    detail: str = ""


@dataclass(frozen=True)
class LockProbed:
    """The answer to an extra query of a faulted lock board (sessions rule 8)."""

    ok: bool
    at: float


@dataclass(frozen=True)
class DeviceFault:
    device: DeviceKind
    unit: int | None     # board address or scale channel
    detail: str


@dataclass(frozen=True)
class DeviceRecovered:
    device: DeviceKind
    unit: int | None


@dataclass(frozen=True)
class ChannelState:
    gross_g: float | None   # raw transmitter reading; None while faulted
    stable: bool


@dataclass(frozen=True)
class ScaleCycle:
    channels: dict[int, ChannelState]
    at: float


# -- the platform link ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkUp:
    pass


@dataclass(frozen=True)
class LinkDown:
    reason: str


@dataclass(frozen=True)
class Inbound:
    """A message from the platform. ``ack`` is set when its owner must acknowledge it
    (``link.ack(msg)`` once its outcome is committed); None when the link already did."""

    topic: str
    payload: bytes
    ack: AckToken | None = None


@dataclass(frozen=True)
class PublishFailed:
    mid: int
    reason: str

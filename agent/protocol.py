"""mqtt.md in code: the one place for the contract's names, encodings and limits.

Canonical JSON, the record hash, RFC 3339 UTC timestamps, Ed25519 signatures, the topics,
the record types, event kinds, alarm names and the limits. The agent and the platform side
both use this module, so the two ends cannot drift apart.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import enum
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import SignatureError

# json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False) with the encoder
# built once: json.dumps builds one per call, a third of the cost of hashing a record.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(obj: Any) -> bytes:
    """The exact bytes hashed and signed everywhere (mqtt.md, Conventions)."""
    return _CANONICAL.encode(obj).encode("utf-8")


def record_hash(seq: int, type_: str, at: str, prev: str, body: Any) -> str:
    """SHA-256 (lowercase hex) of the canonical JSON of exactly {seq, type, at, prev, body}."""
    return hashlib.sha256(canonical({"seq": seq, "type": type_, "at": at, "prev": prev, "body": body})).hexdigest()


def record_hash_of(record: Mapping[str, Any]) -> str:
    """The hash a record as it travels (a dict with seq, type, at, prev, body) must carry."""
    return record_hash(record["seq"], record["type"], record["at"], record["prev"], record["body"])


def format_ts(when: dt.datetime) -> str:
    """RFC 3339 UTC with millisecond precision and a Z suffix."""
    when = when.astimezone(dt.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def ts_from_epoch(epoch_s: float) -> str:
    return format_ts(dt.datetime.fromtimestamp(epoch_s, dt.timezone.utc))


def parse_ts(text: str) -> dt.datetime:
    """Parse an RFC 3339 timestamp (Z or offset) into an aware datetime; ValueError if malformed."""
    if not isinstance(text, str) or "T" not in text.upper():
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    value = dt.datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"timestamp has no time zone: {text!r}")
    return value


def epoch_of(text: str) -> float:
    return parse_ts(text).timestamp()


def load_public_key(b64: str) -> Ed25519PublicKey:
    """The platform key from config: base64 of the 32 raw bytes."""
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not valid base64") from exc
    if len(raw) != 32:
        raise ValueError(f"must decode to 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def verify_signed(obj: dict[str, Any], key: Ed25519PublicKey) -> None:
    """Check ``obj['sig']`` over the canonical JSON of ``obj`` without ``sig``; SignatureError if not."""
    sig_b64 = obj.get("sig")
    if not isinstance(sig_b64, str):
        raise SignatureError("missing sig")
    try:
        sig = base64.b64decode(sig_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError("sig is not base64") from exc
    unsigned = {k: v for k, v in obj.items() if k != "sig"}
    verify_bytes(canonical(unsigned), sig, key)


def verify_bytes(message: bytes | memoryview, sig: bytes, key: Ed25519PublicKey) -> None:
    try:
        key.verify(sig, message)
    except InvalidSignature as exc:
        raise SignatureError("signature does not verify") from exc


def sign(obj: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """Return a copy of ``obj`` with ``sig`` set (used by the reference platform and tests)."""
    unsigned = {k: v for k, v in obj.items() if k != "sig"}
    signed = dict(unsigned)
    signed["sig"] = base64.b64encode(key.sign(canonical(unsigned))).decode("ascii")
    return signed


def public_key_b64(key: Ed25519PrivateKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


# -- limits and patterns ---------------------------------------------------------------------------
CABINET_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")   # \Z: "$" would accept a trailing newline
ZERO_HASH = "0" * 64                 # the prev of record 1
MAX_BATCH_BYTES = 256 * 1024         # a records batch is at most 256 KiB
MAX_COMMAND_TTL_S = 300.0            # expires_at at most 300 s after issued_at
MAX_COMMAND_ID_CHARS = 64            # v1.1: a longer (or non-string) id is answered with "id": null
MAX_ERROR_CHARS = 200                # v1.1: error texts of replies
REJECTIONS_PER_MINUTE = 60           # v1.1: refusals recorded singly per 60 s, beyond that counted
CLOCK_JUMP_S = 60.0                  # wall clock against monotonic beyond this: clock_jump
SESSION_EXPIRY_S = 7 * 24 * 3600 + 3600   # at least 7 days of persistent session (we add an hour)


# -- topics (mqtt.md, Topics) ------------------------------------------------------------------------
CATALOG_TOPIC = "cab/v1/catalog"
CATALOG_DELTA_TOPIC = "cab/v1/catalog/delta"


@dataclass(frozen=True)
class Topics:
    """The topics of one cabinet."""

    cabinet: str

    def _of(self, suffix: str) -> str:
        return f"cab/v1/{self.cabinet}/{suffix}"

    @property
    def status(self) -> str:
        return self._of("status")

    @property
    def records(self) -> str:
        return self._of("records")

    @property
    def ack(self) -> str:
        return self._of("records/ack")

    @property
    def cmd(self) -> str:
        return self._of("cmd")

    @property
    def reply(self) -> str:
        return self._of("cmd/reply")

    @property
    def catalog(self) -> str:
        return self._of("catalog")

    @property
    def catalog_topics(self) -> tuple[str, str, str]:
        """Where catalog documents arrive: the retained snapshot, deltas, this cabinet's own."""
        return (CATALOG_TOPIC, CATALOG_DELTA_TOPIC, self.catalog)

    def subscriptions(self) -> list[str]:
        """Everything the agent subscribes to."""
        return [self.ack, self.cmd, *self.catalog_topics]


# -- records -----------------------------------------------------------------------------------------
class RecordType(enum.StrEnum):
    SALE = "sale"
    EVENT = "event"


class EventKind(enum.StrEnum):
    """Event record kinds (mqtt.md, Record types and bodies)."""

    SESSION_EMPTY = "session_empty"
    SESSION_TIMEOUT = "session_timeout"
    DOOR_LEFT_OPEN = "door_left_open"
    DOOR_FORCED = "door_forced"
    LOCK_FAULT = "lock_fault"
    SCALE_FAULT = "scale_fault"
    CAMERA_FAULT = "camera_fault"
    HARDWARE_RECOVERED = "hardware_recovered"
    UNCERTIFIED_SCAN = "uncertified_scan"
    RESTOCK = "restock"
    CATALOG_INSTALLED = "catalog_installed"
    CATALOG_REJECTED = "catalog_rejected"
    COMMAND_REJECTED = "command_rejected"
    SERVICE_MODE = "service_mode"
    SERVICE_UNLOCK = "service_unlock"
    AGENT_STARTED = "agent_started"
    REJECTIONS_SUPPRESSED = "rejections_suppressed"
    CLOCK_JUMP = "clock_jump"
    TARE = "tare"
    CALIBRATE = "calibrate"
    PRICE_SET = "price_set"
    SET_LANE = "set_lane"


class Mode(enum.StrEnum):
    READY = "ready"
    SESSION = "session"
    SERVICE = "service"
    FAULT = "fault"


class Alarm:
    """Status alarm strings: ``kind`` or ``kind:detail`` (mqtt.md, Status)."""

    LOCK_FAULT = "lock_fault"
    CAMERA_FAULT = "camera_fault"
    CATALOG_STALE = "catalog_stale"
    STORAGE_LOW = "storage_low"
    LEDGER_CORRUPT = "ledger_corrupt"
    LEDGER_UNWRITABLE = "ledger_unwritable"

    @staticmethod
    def door_left_open(door: int) -> str:
        return f"door_left_open:{door}"

    @staticmethod
    def scale_fault(channel: int) -> str:
        return f"scale_fault:{channel}"

    @staticmethod
    def revoked_product(lane: str) -> str:
        return f"revoked_product:{lane}"

    @staticmethod
    def expired_product(lane: str) -> str:
        return f"expired_product:{lane}"

    @staticmethod
    def uncertified_product(lane: str) -> str:
        return f"uncertified_product:{lane}"

    @staticmethod
    def decoder_missing(name: str) -> str:
        return f"decoder_missing:{name}"

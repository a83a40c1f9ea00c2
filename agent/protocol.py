"""Wire conventions of mqtt.md: canonical JSON, RFC 3339 UTC timestamps, Ed25519 signatures."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
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

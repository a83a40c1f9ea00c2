"""Validation of signed platform commands (mqtt.md, Commands).

Pure checks in the order that gives the most useful reason: shape, signature, clock window,
replay, type, args. The cabinet-state check (service mode, door busy, ledger) is the core's,
because only it knows the state.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.config import Config
from agent.errors import CommandRejected, SignatureError
from agent.protocol import MAX_COMMAND_ID_CHARS, MAX_COMMAND_TTL_S, canonical, epoch_of, verify_signed

MAX_SQLITE_INT = 2**63 - 1    # the largest seq or price the ledger (SQLite INTEGER) can hold
MAX_PRICE_CENTS = MAX_SQLITE_INT
REMEMBER_UNPARSABLE_S = 86400.0  # how long a refused id without a readable expiry counts as seen
TYPES = ("open_door", "resend", "status", "set_lane")


class Rejected(CommandRejected):
    """A refused command with the fields its command_rejected event needs."""

    def __init__(self, reason: str, command_id: str | None = None, type_: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.command_id = command_id
        self.type = type_
        # set when the platform's signature verified: such an id counts as seen even though the
        # command was refused, so a re-signed copy with the same id is a replay
        self.remember_until: float | None = None


@dataclass(frozen=True)
class Command:
    id: str
    type: str
    issued_at: float
    expires_at: float
    args: dict[str, Any]


def _is_uuid(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _is_int(value: Any) -> TypeGuard[int]:
    """An integer, and not a bool (JSON ``true`` is not 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_price_cents(value: Any) -> TypeGuard[int]:
    """A price the ledger can hold: whole cents from 0 to MAX_PRICE_CENTS (set_lane, cabinetctl)."""
    return _is_int(value) and 0 <= value <= MAX_PRICE_CENTS


def parse_payload(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise Rejected(f"invalid: payload is not UTF-8 JSON ({exc})") from None
    except RecursionError:
        raise Rejected("invalid: payload is nested too deeply") from None
    if not isinstance(obj, dict):
        raise Rejected("invalid: payload is not a JSON object")
    try:
        canonical(obj)
    except (UnicodeEncodeError, RecursionError, ValueError):
        # e.g. a lone surrogate escape (\ud800): it cannot be signed, hashed or recorded;
        # still name the command in the reply and the event when its id and type are text.
        raise Rejected("invalid: payload holds text that is not valid Unicode",
                       _text_or_none(command_id_of(obj)), _text_or_none(obj.get("type"))) from None
    return obj


def command_id_of(obj: dict[str, Any]) -> str | None:
    """The command's id when it is one the contract allows (a string of at most 64 characters)."""
    value = obj.get("id")
    if isinstance(value, str) and 0 < len(value) <= MAX_COMMAND_ID_CHARS:
        return value
    return None


def _clipped_type(ctype: str | None) -> str | None:
    return ctype if ctype is None or len(ctype) <= MAX_COMMAND_ID_CHARS else ctype[:MAX_COMMAND_ID_CHARS] + "..."


def _text_or_none(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def validate(obj: dict[str, Any], *, key: Ed25519PublicKey, now: float, skew_s: float, config: Config,
             seen: Callable[[str], bool]) -> Command:
    """Return the command if every contract check passes, else raise Rejected with the reason."""
    cid = command_id_of(obj)
    ctype = obj.get("type") if isinstance(obj.get("type"), str) else None
    if "id" in obj and cid is None:
        # v1.1: not a string of at most 64 characters: refused, answered with "id": null
        raise Rejected(f"invalid_args: id is not a string of at most {MAX_COMMAND_ID_CHARS} characters", None,
                       _clipped_type(ctype))
    try:
        verify_signed(obj, key)
    except SignatureError as exc:
        raise Rejected(f"bad_signature: {exc}", cid, ctype) from None
    try:
        return _validate_signed(obj, cid, ctype, now=now, skew_s=skew_s, config=config, seen=seen)
    except Rejected as rej:
        if rej.command_id is not None and not rej.reason.startswith("replay"):
            try:
                rej.remember_until = max(epoch_of(obj["expires_at"]), now) + skew_s
            except (KeyError, ValueError, TypeError):
                rej.remember_until = now + REMEMBER_UNPARSABLE_S
        raise


def _validate_signed(obj: dict[str, Any], cid: str | None, ctype: str | None, *, now: float, skew_s: float,
                     config: Config, seen: Callable[[str], bool]) -> Command:
    """The checks after the signature verified."""
    if cid is None or not cid:
        raise Rejected("invalid: id is missing", None, ctype)
    if ctype is None:
        raise Rejected("invalid: type is missing", cid, None)
    try:
        issued = epoch_of(obj["issued_at"])
        expires = epoch_of(obj["expires_at"])
    except (KeyError, ValueError, TypeError):
        raise Rejected("invalid: issued_at/expires_at missing or not RFC 3339", cid, ctype) from None
    if expires - issued > MAX_COMMAND_TTL_S + 1e-6:
        raise Rejected("invalid: expires_at is more than 300 s after issued_at", cid, ctype)
    if expires + skew_s < now:
        raise Rejected("expired", cid, ctype)
    if issued - skew_s > now:
        raise Rejected("not_yet_valid: issued_at is in the future", cid, ctype)
    if seen(cid):
        raise Rejected("replay: command id seen before", cid, ctype)
    if ctype not in TYPES:
        raise Rejected(f"unknown_type: {ctype}", cid, ctype)
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise Rejected("invalid_args: args is not an object", cid, ctype)
    problem = _check_args(ctype, args, config)
    if problem:
        raise Rejected(f"invalid_args: {problem}", cid, ctype)
    return Command(cid, ctype, issued, expires, args)


def _check_args(ctype: str, args: dict[str, Any], config: Config) -> str | None:
    if ctype == "open_door":
        for name in ("door", "session_id", "shopper", "auth"):
            if name not in args:
                return f"{name} is missing"
        if not _is_int(args["door"]) or config.door(args["door"]) is None:
            return f"door {args['door']!r} is not in the config"
        if not _is_uuid(args["session_id"]):
            return "session_id is not a UUID"
        if not isinstance(args["shopper"], str):
            return "shopper must be a string"
        if args["auth"] not in ("face", "qr"):
            return "auth must be face or qr"
    elif ctype == "resend":
        if "from_seq" not in args:
            return "from_seq is missing"
        if not _is_int(args["from_seq"]) or not 1 <= args["from_seq"] <= MAX_SQLITE_INT:
            return "from_seq must be an integer >= 1"
    elif ctype == "set_lane":
        for name in ("lane", "gtin", "price_cents"):
            if name not in args:
                return f"{name} is missing"
        if not isinstance(args["lane"], str) or config.lane(args["lane"]) is None:
            return f"lane {args['lane']!r} is not in the config"
        if not isinstance(args["gtin"], str):
            return "gtin must be a string"
        if not is_price_cents(args["price_cents"]):
            return "price_cents must be an integer >= 0"
    return None

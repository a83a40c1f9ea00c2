"""Checking records as they arrive (mqtt.md, Records): shape, hash, and the links of the chain.

Pure functions, shared by the reference platform and the ingest: a record that fails here
is never stored, and what "verified" means is written down once.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from agent.protocol import CABINET_ID_RE, ZERO_HASH

# A JSON string as canonical JSON writes it (ensure_ascii=False): the C function json uses itself.
_STR = json.encoder.encode_basestring


def _not_json(obj: Any) -> Any:
    raise ValueError(f"{obj!r} is not JSON (RFC 8259)")


# protocol.canonical's encoder (a test holds them equal), giving text: the store keeps the text
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_not_json)
# Between the bodies of one batch when they are encoded in one call (a quarter cheaper than a call
# per body): random per process, so no sender can know it; a body that holds it anyway only makes
# the split come out wrong, which is seen (one piece too many) and then each body is encoded alone.
_SEPARATOR_TOKEN = secrets.token_hex(16)
_SEPARATOR = f',"{_SEPARATOR_TOKEN}",'


class _NotJson:
    """What ``NaN``, ``Infinity`` and ``-Infinity`` decode to: Python's json reads them, but they
    are not JSON (RFC 8259), the database refuses them, and encoding this marker fails, so the
    record is refused alone instead of failing the transaction of everything it arrived with."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _decode(payload: bytes | str) -> Any:
    return json.loads(payload, parse_constant=_NotJson)


class Rec(NamedTuple):
    """A record whose own hash verified; ``body_json`` is the canonical text of its body.

    A named tuple: one is made per record received, and a frozen dataclass costs three times more.
    """

    seq: int
    type: str
    at: str
    prev: str
    hash: str
    body_json: str


@dataclass(frozen=True)
class Rejection:
    """A record refused on arrival: ``kind`` is the anomaly (``broken_chain``), ``seq`` may be None."""

    seq: int | None
    detail: str
    kind: str = "broken_chain"


@dataclass
class Batch:
    """One records message: the cabinet, the records whose hash verified, and the refused ones."""

    cabinet: str
    records: list[Rec] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


class BatchError(ValueError):
    """A records message that names no valid cabinet or is not a batch at all: nothing to store."""


def malformed_reason(rec: Any) -> str | None:
    """Why a record does not have the shape of mqtt.md, or None if it does.

    ``prev`` and ``hash`` only need to be strings here: one that is not 64 hex digits can
    never equal a computed hash, so it surfaces as a chain error anyway.
    """
    if not isinstance(rec, dict):
        return f"record is {type(rec).__name__}, not an object"
    seq = rec.get("seq")
    if type(seq) is not int or seq < 1:  # bool is an int subclass: excluded on purpose
        return f"seq {seq!r} is not an integer >= 1"
    for key in ("type", "at", "prev", "hash"):
        if not isinstance(rec.get(key), str):
            return f"seq {seq}: {key} is not a string"
        if key != "hash" and "\0" in rec[key]:
            return f"seq {seq}: {key} holds a NUL character (no database stores it in text)"
    if not isinstance(rec.get("body"), dict):
        return f"seq {seq}: body is not an object"
    return None


def hash_and_body(seq: int, type_: str, at: str, prev: str, body: Any) -> tuple[str, str]:
    """(record hash, canonical body text), encoding the body once.

    The canonical JSON of ``{seq, type, at, prev, body}`` is its keys in sorted order (at,
    body, prev, seq, type), so it is assembled around the body's canonical text, which the
    store keeps as is; ``protocol.record_hash`` gives the same digest (a test holds them
    equal) at twice the cost, which the ingest pays per record.
    """
    return _hash_of(seq, type_, at, prev, _CANONICAL.encode(body))


def _hash_of(seq: int, type_: str, at: str, prev: str, body_json: str) -> tuple[str, str]:
    text = f'{{"at":{_STR(at)},"body":{body_json},"prev":{_STR(prev)},"seq":{seq},"type":{_STR(type_)}}}'
    return hashlib.sha256(text.encode("utf-8")).hexdigest(), body_json


def _bodies_json(bodies: list[Any]) -> list[str] | None:
    """The canonical text of each body, encoded in one call; None if that fails or splits wrong."""
    if len(bodies) < 2:
        return None
    spaced: list[Any] = [_SEPARATOR_TOKEN] * (2 * len(bodies) - 1)
    spaced[::2] = bodies
    try:
        text = _CANONICAL.encode(spaced)
    except (ValueError, TypeError, RecursionError):
        return None        # one body cannot be encoded: each alone says which
    pieces = text[1:-1].split(_SEPARATOR)
    return pieces if len(pieces) == len(bodies) else None


def parse_batch(payload: bytes, expected_cabinet: str | None = None) -> Batch:
    """Decode and verify a records message; BatchError when it has no usable cabinet or list.

    ``expected_cabinet`` is the cabinet of the topic: a batch naming another one is refused
    whole (a cabinet can only speak for itself).
    """
    try:
        obj = _decode(payload)
    except ValueError as exc:   # JSONDecodeError and UnicodeDecodeError
        raise BatchError(f"not JSON: {exc}") from None
    except RecursionError:
        raise BatchError("not JSON: nested too deeply") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("records"), list):
        raise BatchError("not an object with a records list")
    cabinet = obj.get("cabinet")
    if not isinstance(cabinet, str) or not CABINET_ID_RE.match(cabinet):
        raise BatchError(f"cabinet {cabinet!r} is not a cabinet id")
    if expected_cabinet is not None and cabinet != expected_cabinet:
        raise BatchError(f"cabinet {cabinet!r} arrived on the topic of {expected_cabinet!r}")
    batch = Batch(cabinet)
    shaped_records: list[tuple[int, str, str, str, str, Any]] = []
    for rec in obj["records"]:
        # the per-record path of the ingest: the shape test inlined, the reason worked out only on failure
        try:
            fields = (rec["seq"], rec["type"], rec["at"], rec["prev"], rec["hash"], rec["body"])
            seq, type_, at, prev, claimed, body = fields
            shaped = (type(seq) is int and seq >= 1 and type(type_) is str and type(at) is str
                      and type(prev) is str and type(claimed) is str and type(body) is dict
                      and "\0" not in type_ and "\0" not in at and "\0" not in prev)
        except (KeyError, TypeError):
            shaped = False
        if not shaped:
            why = malformed_reason(rec) or "not a record"
            seq = rec.get("seq") if isinstance(rec, dict) else None
            batch.rejected.append(Rejection(seq if type(seq) is int and seq >= 1 else None, f"malformed: {why}"))
            continue
        shaped_records.append(fields)
    texts = _bodies_json([f[5] for f in shaped_records])
    append = batch.records.append
    for i, (seq, type_, at, prev, claimed, body) in enumerate(shaped_records):
        try:
            digest, body_json = (_hash_of(seq, type_, at, prev, texts[i]) if texts is not None
                                 else hash_and_body(seq, type_, at, prev, body))
        except (ValueError, TypeError, UnicodeEncodeError, RecursionError) as exc:
            batch.rejected.append(Rejection(seq, f"body cannot be hashed: {exc}"))
            continue
        if digest != claimed:
            batch.rejected.append(Rejection(seq, f"bad_hash: claims {claimed[:16]}, content hashes to {digest[:16]}"))
            continue
        append(Rec(seq, type_, at, prev, digest, body_json))
    return batch


def link_problem(rec: Rec, before: tuple[str, str] | None, after: tuple[str, str] | None) -> str | None:
    """Why ``rec`` does not fit between its stored neighbours, or None.

    ``before``/``after`` are the (prev, hash) of the stored records ``seq - 1`` and ``seq + 1``
    (None when not stored). Record 1 must point at the zero hash.
    """
    if rec.seq == 1 and rec.prev != ZERO_HASH:
        return f"bad_prev: seq 1 points at {rec.prev[:16]}, not at the zero hash"
    if before is not None and rec.prev != before[1]:
        return f"bad_prev: points at {rec.prev[:16]}, stored seq {rec.seq - 1} is {before[1][:16]}"
    if after is not None and after[0] != rec.hash:
        return f"bad_next: stored seq {rec.seq + 1} points at {after[0][:16]}, not at {rec.hash[:16]}"
    return None

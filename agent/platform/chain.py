"""Checking records as they arrive (mqtt.md, Records): shape, hash, and the links of the chain.

Pure functions, shared by the reference platform and the ingest: a record that fails here
is never stored, and what "verified" means is written down once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from agent.protocol import CABINET_ID_RE, ZERO_HASH, canonical

# A JSON string as canonical JSON writes it (ensure_ascii=False): the C function json uses itself.
_STR = json.encoder.encode_basestring


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
    body_json = canonical(body).decode("utf-8")
    text = f'{{"at":{_STR(at)},"body":{body_json},"prev":{_STR(prev)},"seq":{seq},"type":{_STR(type_)}}}'
    return hashlib.sha256(text.encode("utf-8")).hexdigest(), body_json


def parse_batch(payload: bytes, expected_cabinet: str | None = None) -> Batch:
    """Decode and verify a records message; BatchError when it has no usable cabinet or list.

    ``expected_cabinet`` is the cabinet of the topic: a batch naming another one is refused
    whole (a cabinet can only speak for itself).
    """
    try:
        obj = json.loads(payload)
    except ValueError as exc:   # JSONDecodeError and UnicodeDecodeError
        raise BatchError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("records"), list):
        raise BatchError("not an object with a records list")
    cabinet = obj.get("cabinet")
    if not isinstance(cabinet, str) or not CABINET_ID_RE.match(cabinet):
        raise BatchError(f"cabinet {cabinet!r} is not a cabinet id")
    if expected_cabinet is not None and cabinet != expected_cabinet:
        raise BatchError(f"cabinet {cabinet!r} arrived on the topic of {expected_cabinet!r}")
    batch = Batch(cabinet)
    append = batch.records.append
    for rec in obj["records"]:
        # the per-record path of the ingest: the shape test inlined, the reason worked out only on failure
        try:
            seq, type_, at, prev, claimed, body = (rec["seq"], rec["type"], rec["at"], rec["prev"], rec["hash"],
                                                   rec["body"])
            shaped = (type(seq) is int and seq >= 1 and type(type_) is str and type(at) is str
                      and type(prev) is str and type(claimed) is str and type(body) is dict)
        except (KeyError, TypeError):
            shaped = False
        if not shaped:
            why = malformed_reason(rec) or "not a record"
            seq = rec.get("seq") if isinstance(rec, dict) else None
            batch.rejected.append(Rejection(seq if type(seq) is int and seq >= 1 else None, f"malformed: {why}"))
            continue
        try:
            digest, body_json = hash_and_body(seq, type_, at, prev, body)
        except (ValueError, UnicodeEncodeError, RecursionError) as exc:
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

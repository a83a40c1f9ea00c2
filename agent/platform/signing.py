"""Signed platform messages (mqtt.md, Commands and Catalog documents): built in one place.

The reference platform, ``cabinet-platform`` and the ingest worker's ``resend`` all make
their commands and catalogs here, so a test that passes with one speaks for all of them.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol
from agent.protocol import CATALOG_DELTA_TOPIC, CATALOG_TOPIC

DEFAULT_TTL_S = 60.0


def now_ms() -> dt.datetime:
    """Now, truncated to the millisecond the wire format carries (so a ttl stays exact)."""
    now = dt.datetime.now(dt.UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def wire_ts(value: dt.datetime | str) -> str:
    """A datetime in wire format; a string is passed through verbatim (tests send bad ones)."""
    return value if isinstance(value, str) else protocol.format_ts(value)


def sign(obj: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """``obj`` with ``sig`` set (an existing ``sig`` is replaced)."""
    return protocol.sign(dict(obj), key)


def signed_line(obj: Mapping[str, Any], key: Ed25519PrivateKey) -> str:
    """The signed object as one line of canonical JSON (what ``cabinet-platform sign`` prints)."""
    return protocol.canonical(sign(obj, key)).decode("utf-8")


def make_command(
    key: Ed25519PrivateKey,
    type_: str,
    args: Mapping[str, Any],
    *,
    ttl_s: float = DEFAULT_TTL_S,
    issued_at: dt.datetime | str | None = None,
    expires_at: dt.datetime | str | None = None,
    command_id: str | None = None,
) -> dict[str, Any]:
    """A signed command; timestamps may be datetimes or verbatim strings (to test bad ones)."""
    issued = issued_at if issued_at is not None else now_ms()
    if expires_at is None:
        base = protocol.parse_ts(issued) if isinstance(issued, str) else issued
        expires_at = base + dt.timedelta(seconds=ttl_s)
    command = {
        "id": command_id or str(uuid.uuid4()),
        "type": type_,
        "issued_at": wire_ts(issued),
        "expires_at": wire_ts(expires_at),
        "args": dict(args),
    }
    return protocol.sign(command, key)


def make_catalog(
    key: Ed25519PrivateKey,
    version: int,
    products: Iterable[Mapping[str, Any]],
    *,
    base_version: int | None = None,
    revoked: Iterable[str] = (),
    issued_at: dt.datetime | str | None = None,
) -> dict[str, Any]:
    """A signed catalog document: a snapshot, or a delta when ``base_version`` is given."""
    doc = {
        "version": version,
        "base_version": base_version,
        "issued_at": wire_ts(issued_at if issued_at is not None else now_ms()),
        "products": [dict(p) for p in products],
        "revoked": list(revoked),
    }
    return protocol.sign(doc, key)


def catalog_route(doc: Mapping[str, Any]) -> tuple[str, bool]:
    """Where a catalog document goes: (topic, retained). A snapshot is retained, a delta is not."""
    if doc.get("base_version") is None:
        return CATALOG_TOPIC, True
    return CATALOG_DELTA_TOPIC, False


def parse_arg(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` of ``cabinet-platform command``: VALUE as a JSON literal when it is one.

    ``door=1`` is the integer 1, ``shopper=alice`` the string "alice", ``shopper="1"`` the
    string "1". ValueError when there is no ``=`` or no name.
    """
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"argument {text!r} is not NAME=VALUE")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value

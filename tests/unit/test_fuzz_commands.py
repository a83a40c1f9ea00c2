"""Fuzzing the command path (issue 8): ``parse_payload`` and ``validate`` raise nothing but the
typed rejection, and every forged, tampered, expired, not-yet-valid, replayed, over-long or
oversized command is refused; the core answers whatever arrives on the command topic within
the contract (reply ids, error texts) and keeps its ledger chain intact.

The pure properties need no I/O; the last test drives an in-process ``Core`` (real SQLite in a
temporary directory, a fake link and a manual clock) with the same payloads.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent.config import Config, parse_config
from agent.protocol import canonical, epoch_of, public_key_b64, sign, ts_from_epoch
from agent.rules.commands import TYPES, Command, Rejected, parse_payload, validate

NOW = epoch_of("2026-11-29T08:00:00.000Z")
SKEW = 300.0
MAX_TTL = 300.0
MAX_ID = 64          # mqtt.md v1.1: a command id is a string of at most 64 characters
MAX_ERROR = 200      # mqtt.md v1.1: error texts are at most 200 characters
PRIVATE = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CONFIG_DATA: dict[str, Any] = {
    "cabinet": {"id": "CAB-FUZZ"},
    "platform": {"public_key": public_key_b64(PRIVATE)},
    "doors": [{"door": 1, "lock": 1}, {"door": 2, "lock": 2}],
    "lanes": [{"lane": "A1", "door": 1, "channel": 1}, {"lane": "B1", "door": 2, "channel": 2}],
    "camera": {"source": ""},
}
CONFIG: Config = parse_config(CONFIG_DATA)


# ------------------------------------------------------------------ strategies

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12))
json_any = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                         max_size=4), max_leaves=12)
offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: dt.timezone(dt.timedelta(minutes=m)))


def rfc3339(epoch: float, tz: dt.timezone = dt.timezone.utc, style: int = 0) -> str:
    when = dt.datetime.fromtimestamp(epoch, tz)
    if style == 0:
        return ts_from_epoch(epoch)
    if style == 1:
        return when.isoformat()                       # +hh:mm offset, microseconds
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def stamps(lo: float, hi: float) -> st.SearchStrategy[str]:
    return st.builds(rfc3339, st.floats(lo, hi), offsets, st.integers(0, 2))


any_stamp = st.one_of(stamps(0, 4e9), st.text(max_size=30), json_any)
valid_open_door = st.fixed_dictionaries({
    "door": st.sampled_from([1, 2]), "session_id": st.uuids().map(str),
    "shopper": st.text(max_size=40), "auth": st.sampled_from(["face", "qr"])})
valid_args = {
    "open_door": valid_open_door,
    "resend": st.fixed_dictionaries({"from_seq": st.integers(1, 2**63 - 1)}),
    "status": st.just({}),
    "set_lane": st.fixed_dictionaries({"lane": st.sampled_from(["A1", "B1"]), "gtin": st.text(max_size=20),
                                       "price_cents": st.integers(0, 2**63 - 1)}),
}
junk_args = st.one_of(json_any, st.dictionaries(
    st.sampled_from(["door", "session_id", "shopper", "auth", "from_seq", "lane", "gtin", "price_cents", "x"]),
    json_any, max_size=5))


@st.composite
def valid_commands(draw: st.DrawFn, now: float = NOW) -> dict[str, Any]:
    """An unsigned command every contract check accepts at ``now``."""
    type_ = draw(st.sampled_from(TYPES))
    issued = draw(st.floats(now - SKEW + 1, now + SKEW - 1))
    ttl = draw(st.floats(0, MAX_TTL))
    assume(issued + ttl + SKEW > now + 1)
    return {"id": draw(st.one_of(st.uuids().map(str), st.text(min_size=1, max_size=MAX_ID))), "type": type_,
            "issued_at": ts_from_epoch(issued), "expires_at": ts_from_epoch(issued + ttl),
            "args": draw(valid_args[type_])}


@st.composite
def arbitrary_commands(draw: st.DrawFn) -> dict[str, Any]:
    """Anything shaped roughly like a command: every field may be missing, of any type or valid."""
    obj: dict[str, Any] = {}
    fields = {
        "id": st.one_of(st.uuids().map(str), st.text(max_size=2 * MAX_ID), json_any),
        "type": st.one_of(st.sampled_from((*TYPES, "explode", "")), json_any),
        "issued_at": any_stamp, "expires_at": any_stamp,
        "args": st.one_of(*valid_args.values(), junk_args),
    }
    for name, strategy in fields.items():
        if draw(st.integers(0, 9)):   # mostly present
            obj[name] = draw(strategy)
    obj.update(draw(st.dictionaries(st.text(max_size=6).filter(lambda k: k not in fields and k != "sig"),
                                    json_any, max_size=2)))
    return obj


def check(obj: dict[str, Any], *, now: float = NOW, seen: Any = lambda _id: False) -> Command:
    return validate(obj, key=PRIVATE.public_key(), now=now, skew_s=SKEW, config=CONFIG, seen=seen)


def refused(obj: dict[str, Any], **kw: Any) -> Rejected:
    with pytest.raises(Rejected) as info:
        check(obj, **kw)
    return info.value


def assert_well_formed_rejection(rej: Rejected, obj: Any) -> None:
    """What a refusal carries into the reply and the command_rejected event."""
    assert isinstance(rej.reason, str) and rej.reason
    if rej.command_id is not None:
        assert isinstance(rej.command_id, str) and 0 < len(rej.command_id) <= MAX_ID
        assert isinstance(obj, dict) and obj.get("id") == rej.command_id


# ------------------------------------------------------------------ parse_payload


@FUZZ
@given(payload=st.one_of(
    st.binary(max_size=200),
    json_any.map(lambda v: json.dumps(v).encode()),
    st.text(alphabet=st.characters(blacklist_categories=()), max_size=40).map(
        lambda t: json.dumps({"id": t, "type": t}).encode()),        # lone surrogates as \udxxx escapes
    valid_commands().map(lambda c: canonical(sign(c, PRIVATE))).flatmap(
        lambda b: st.integers(0, len(b)).map(lambda k: b[:k])),      # truncated
    valid_commands().map(lambda c: canonical(sign(c, PRIVATE)).decode().encode("utf-16")),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
))
def test_parse_payload_returns_an_object_or_the_typed_rejection(payload: bytes) -> None:
    try:
        obj = parse_payload(payload)
    except Rejected as rej:
        assert_well_formed_rejection(rej, None if rej.command_id is None else json.loads(payload))
        return
    assert isinstance(obj, dict)
    canonical(obj)  # what is accepted can be signed, hashed and recorded


# ------------------------------------------------------------------ validate


@FUZZ
@given(obj=arbitrary_commands(), signed=st.booleans(), now=st.floats(0, 4e9))
def test_validate_returns_a_command_or_the_typed_rejection(obj: dict[str, Any], signed: bool, now: float) -> None:
    if signed:
        try:
            obj = sign(obj, PRIVATE)
        except (ValueError, TypeError):   # NaN is fine, but keep to what parse_payload lets through
            assume(False)
    try:
        cmd = check(obj, now=now)
    except Rejected as rej:
        assert_well_formed_rejection(rej, obj)
        return
    # accepted: then every contract rule holds
    assert signed
    assert cmd.type in TYPES and isinstance(cmd.id, str) and 0 < len(cmd.id) <= MAX_ID
    assert cmd.expires_at - cmd.issued_at <= MAX_TTL + 1e-6
    assert cmd.expires_at + SKEW >= now and cmd.issued_at - SKEW <= now
    assert isinstance(cmd.args, dict)


@FUZZ
@given(obj=arbitrary_commands(), sig=st.one_of(st.text(max_size=100), json_any,
                                              st.binary(min_size=64, max_size=64).map(
                                                  lambda b: base64.b64encode(b).decode())))
def test_a_command_without_the_platform_signature_is_refused(obj: dict[str, Any], sig: Any) -> None:
    obj["sig"] = sig
    rej = refused(obj)
    assert_well_formed_rejection(rej, obj)


@FUZZ
@given(cmd=valid_commands())
def test_a_valid_command_is_accepted_also_after_the_wire_round_trip(cmd: dict[str, Any]) -> None:
    signed = sign(cmd, PRIVATE)
    accepted = check(parse_payload(canonical(signed)))
    assert (accepted.id, accepted.type, accepted.args) == (cmd["id"], cmd["type"], cmd["args"])
    # the same object pretty-printed, keys in another order, is the same command
    reordered = dict(reversed(list(signed.items())))
    assert check(parse_payload(json.dumps(reordered, indent=2, ensure_ascii=True).encode())).id == cmd["id"]


@FUZZ
@given(cmd=valid_commands())
def test_a_forged_command_is_refused(cmd: dict[str, Any]) -> None:
    rej = refused(sign(cmd, OTHER))
    assert rej.reason.startswith("bad_signature")
    assert rej.command_id == cmd["id"]


@FUZZ
@given(cmd=valid_commands(), data=st.data())
def test_a_tampered_command_is_refused(cmd: dict[str, Any], data: st.DataObject) -> None:
    signed = sign(cmd, PRIVATE)
    tampered = json.loads(json.dumps(signed))
    where = data.draw(st.sampled_from(["id", "type", "issued_at", "expires_at", "args", "arg", "extra"]))
    if where == "arg" and tampered["args"]:
        name = data.draw(st.sampled_from(sorted(tampered["args"])))
        tampered["args"][name] = data.draw(json_any)
    elif where == "extra":
        tampered[data.draw(st.text(min_size=1, max_size=6).filter(lambda k: k not in tampered))] = data.draw(json_any)
    elif where != "arg":
        tampered[where] = data.draw(json_any if where != "id" else st.uuids().map(str))
    unsigned = {k: v for k, v in tampered.items() if k != "sig"}
    assume(canonical(unsigned) != canonical(cmd))
    rej = refused(tampered)
    assert rej.reason.startswith(("bad_signature", "invalid"))


@FUZZ
@given(cmd=valid_commands(), late=st.floats(0.001, 30 * 86400))
def test_an_expired_command_is_refused(cmd: dict[str, Any], late: float) -> None:
    now = epoch_of(cmd["expires_at"]) + SKEW + late
    rej = refused(sign(cmd, PRIVATE), now=now)
    assert rej.reason.startswith("expired")


@FUZZ
@given(cmd=valid_commands(), early=st.floats(0.001, 30 * 86400))
def test_a_command_issued_in_the_future_is_refused(cmd: dict[str, Any], early: float) -> None:
    now = epoch_of(cmd["issued_at"]) - SKEW - early
    rej = refused(sign(cmd, PRIVATE), now=now)
    assert rej.reason.startswith("not_yet_valid")


@FUZZ
@given(cmd=valid_commands(), extra=st.floats(0.01, 30 * 86400))
def test_a_command_valid_for_more_than_300_s_is_refused(cmd: dict[str, Any], extra: float) -> None:
    issued = epoch_of(cmd["issued_at"])
    cmd["expires_at"] = ts_from_epoch(issued + MAX_TTL + extra)
    assume(epoch_of(cmd["expires_at"]) - issued > MAX_TTL + 1e-3)  # ms precision on the wire
    rej = refused(sign(cmd, PRIVATE), now=issued)
    assert rej.reason.startswith("invalid")


@FUZZ
@given(cmd=valid_commands(), resigned=st.booleans())
def test_a_replayed_command_is_refused(cmd: dict[str, Any], resigned: bool) -> None:
    seen = {cmd["id"]}
    if resigned:   # the same id re-signed with fresh times and other args is a replay too
        cmd = dict(cmd, issued_at=ts_from_epoch(NOW), expires_at=ts_from_epoch(NOW + 60), type="status", args={})
    rej = refused(sign(cmd, PRIVATE), seen=seen.__contains__)
    assert rej.reason.startswith("replay")
    assert rej.command_id == cmd["id"]


@FUZZ
@given(cmd=valid_commands(), cid=st.one_of(st.text(min_size=MAX_ID + 1, max_size=400),
                                           st.just(""), json_any.filter(lambda v: not isinstance(v, str))),
       forged=st.booleans())
def test_a_command_id_that_is_not_a_short_string_is_refused_and_not_echoed(cmd: dict[str, Any], cid: Any,
                                                                           forged: bool) -> None:
    """mqtt.md v1.1: an id that is not a string of at most 64 characters: refused, answered with id null."""
    cmd["id"] = cid
    rej = refused(sign(cmd, OTHER if forged else PRIVATE))
    assert rej.command_id is None


@FUZZ
@given(cmd=valid_commands(), big=st.sampled_from(["shopper", "door", "gtin", "lane", "type", "args"]),
       size=st.integers(1_000, 200_000))
def test_an_oversized_command_is_refused_or_served_without_growing_the_refusal(cmd: dict[str, Any], big: str,
                                                                               size: int) -> None:
    """Huge fields (a 200 kB shopper, door, type...): never an exception; a refusal names no huge id."""
    blob = "x" * size
    if big in ("type", "args"):
        cmd[big] = blob
    else:
        cmd["args"][big] = blob
    try:
        accepted = check(sign(cmd, PRIVATE))
    except Rejected as rej:
        assert_well_formed_rejection(rej, cmd)
        return
    # a huge type or args, a door or a lane that is not the config's is never served; a long shopper
    # ref, gtin text or an argument the type does not use may be
    strict = {"open_door": {"door"}, "set_lane": {"lane"}}.get(cmd["type"], set())
    assert big not in ("type", "args") and big not in strict
    assert accepted.id == cmd["id"] and len(accepted.id) <= MAX_ID


# ------------------------------------------------------------------ the core, in-process


class _Link:
    connected = True

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        self.published.append((topic, payload))
        return len(self.published)

    def resubscribe(self, topic: str) -> None:
        pass

    def replies(self) -> list[dict[str, Any]]:
        return [json.loads(p) for t, p in self.published if t.endswith("/cmd/reply")]


class _LockBoard:
    def __init__(self) -> None:
        self.unlocks: list[tuple[int, str]] = []

    def unlock(self, lock: int, token: str) -> None:
        self.unlocks.append((lock, token))

    def probe(self) -> None:
        pass


@contextlib.contextmanager
def in_process_core() -> Iterator[Any]:
    """A fresh Core (its own ledger in a temporary directory), with a fake link and a manual clock."""
    from agent.clock import ManualClock
    from agent.core import Core
    from agent.ports import Ports

    with tempfile.TemporaryDirectory(prefix="fuzz-core-") as tmp:
        data = dict(CONFIG_DATA, cabinet={"id": "CAB-FUZZ", "data_dir": str(Path(tmp) / "data"),
                                          "control_socket": str(Path(tmp) / "ctl.sock")})
        clock = ManualClock(wall=NOW)
        link = _Link()
        core = Core(parse_config(data), ports=Ports(link, _LockBoard(), None), clock=clock)
        core.start()
        try:
            yield core, link, clock
        finally:
            core.finish()


def _command_payloads() -> st.SearchStrategy[bytes]:
    signed = st.one_of(arbitrary_commands(), valid_commands()).map(lambda c: sign(c, PRIVATE))
    return st.one_of(
        st.binary(max_size=120),
        json_any.map(lambda v: json.dumps(v).encode()),
        arbitrary_commands().map(lambda c: json.dumps(c).encode()),
        signed.map(canonical),
        valid_commands().map(lambda c: canonical(sign(c, OTHER))),
        st.tuples(valid_commands(), st.text(min_size=MAX_ID + 1, max_size=300)).map(
            lambda t: canonical(sign(dict(t[0], id=t[1]), PRIVATE))),
        st.tuples(valid_commands(), st.integers(1_000, 50_000)).map(
            lambda t: canonical(sign(dict(t[0], type="x" * t[1]), PRIVATE))),
    )


def _payload_id(payload: bytes) -> str | None:
    """The id a reply may name: a string of 1 to 64 characters, else None."""
    try:
        obj = json.loads(payload.decode("utf-8"))   # as the agent reads it: UTF-8 only
    except (ValueError, RecursionError):
        return None
    cid = obj.get("id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) and 0 < len(cid) <= MAX_ID else None


@FEW
@given(payloads=st.lists(_command_payloads(), min_size=1, max_size=5))
def test_the_core_answers_anything_on_the_command_topic_within_the_contract(payloads: list[bytes]) -> None:
    from agent.events import Inbound

    with in_process_core() as (core, link, clock):
        sent = {_payload_id(p) for p in payloads}
        for payload in payloads:
            clock.advance(2.0)     # stays below the v1.1 rate limit of 60 refusals a minute
            core.handle(Inbound(core.topics.cmd, payload))   # raises nothing
            core.step()
        clock.advance(10.0)        # a parked open_door is answered once its wait is over
        core.step()
        replies = link.replies()
        for reply in replies:
            assert set(reply) >= {"id", "ok", "at", "error", "result"}
            rid = reply["id"]
            assert rid is None or (isinstance(rid, str) and 0 < len(rid) <= MAX_ID), rid
            assert rid is None or rid in sent, rid
            assert reply["ok"] is True or isinstance(reply["error"], str)
        # every payload is answered once, except those that name no usable id (answered with id null
        # or not at all) and the same bytes delivered again while the first waits (one outcome for
        # both, as for a broker's redelivery); a valid command is answered ok, anything else refused
        named = [p for p in payloads if _payload_id(p) is not None]
        answered = [r["id"] for r in replies if r["id"] is not None]
        assert set(answered) == {_payload_id(p) for p in named}
        assert len(set(named)) <= len(answered) <= len(named)
        bad, why = core.ledger.verify()
        assert bad is None, why


def test_reply_error_texts_are_at_most_200_characters() -> None:
    from agent.events import Inbound

    cmd = {"id": str(uuid.uuid4()), "type": "x" * 1000, "issued_at": ts_from_epoch(NOW),
           "expires_at": ts_from_epoch(NOW + 60), "args": {}}
    with in_process_core() as (core, link, _clock):
        core.handle(Inbound(core.topics.cmd, canonical(sign(cmd, PRIVATE))))
        (reply,) = link.replies()
    assert reply["ok"] is False and reply["id"] == cmd["id"]
    assert len(reply["error"]) <= MAX_ERROR, len(reply["error"])

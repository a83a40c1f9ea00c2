"""Validation of signed platform commands (mqtt.md, Commands): signature, clock window, replay, args."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import Config, parse_config
from agent.protocol import canonical, epoch_of, public_key_b64, sign, ts_from_epoch
from agent.rules.commands import Command, Rejected, parse_payload, validate

NOW = epoch_of("2026-11-29T08:00:00.000Z")
SKEW = 300.0
PRIVATE = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
SESSION = str(uuid.uuid4())


@pytest.fixture(scope="module")
def config() -> Config:
    return parse_config({
        "cabinet": {"id": "CAB-0001"},
        "platform": {"public_key": public_key_b64(PRIVATE)},
        "doors": [{"door": 1, "lock": 1}, {"door": 2, "lock": 2}],
        "lanes": [{"lane": "A1", "door": 1, "channel": 1}, {"lane": "B1", "door": 2, "channel": 2}],
    })


def command(type_: str, args: dict[str, Any] | None = None, *, issued: float = NOW, expires: float | None = None,
            cid: str | None = None, key: Ed25519PrivateKey | None = PRIVATE, **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": cid or str(uuid.uuid4()), "type": type_,
        "issued_at": ts_from_epoch(issued), "expires_at": ts_from_epoch(issued + 60 if expires is None else expires),
        **extra,
    }
    if args is not None:
        obj["args"] = args
    return sign(obj, key) if key is not None else obj


def check(obj: dict[str, Any], config: Config, *, now: float = NOW, seen: Callable[[str], bool] = lambda _id: False
          ) -> Command:
    return validate(obj, key=PRIVATE.public_key(), now=now, skew_s=SKEW, config=config, seen=seen)


def rejected(obj: dict[str, Any], config: Config, **kw: Any) -> Rejected:
    with pytest.raises(Rejected) as info:
        check(obj, config, **kw)
    return info.value


def open_door_args(**over: Any) -> dict[str, Any]:
    args = {"door": 1, "session_id": SESSION, "shopper": "sh-42", "auth": "face"}
    args.update(over)
    return args


# -- accepted ------------------------------------------------------------------------------------------
def test_open_door_accepted(config: Config) -> None:
    obj = command("open_door", open_door_args(door=2, auth="qr"), cid="11111111-2222-4333-8444-555555555555")
    cmd = check(obj, config)
    assert cmd == Command(
        id="11111111-2222-4333-8444-555555555555", type="open_door", issued_at=NOW, expires_at=NOW + 60,
        args={"door": 2, "session_id": SESSION, "shopper": "sh-42", "auth": "qr"},
    )


@pytest.mark.parametrize(
    ("type_", "args"),
    [
        ("resend", {"from_seq": 1}),
        ("resend", {"from_seq": 123456}),
        ("status", {}),
        ("set_lane", {"lane": "B1", "gtin": "06901234567892", "price_cents": 1590}),
        ("set_lane", {"lane": "A1", "gtin": "06901234567892", "price_cents": 0}),
    ],
)
def test_other_types_accepted(config: Config, type_: str, args: dict[str, Any]) -> None:
    obj = command(type_, args)
    cmd = check(obj, config)
    assert cmd.type == type_ and cmd.args == args and cmd.id == obj["id"]


def test_status_without_args_accepted(config: Config) -> None:
    cmd = check(command("status"), config)
    assert cmd.type == "status" and cmd.args == {}


def test_unknown_fields_are_ignored(config: Config) -> None:
    cmd = check(command("status", {}, note="extra field, signed"), config)
    assert cmd.type == "status"


def test_seen_is_asked_about_the_command_id(config: Config) -> None:
    asked: list[str] = []
    obj = command("status", {})
    check(obj, config, seen=lambda cid: asked.append(cid) or False)
    assert asked == [obj["id"]]


# -- signature ------------------------------------------------------------------------------------------
def test_tampered_arg_is_bad_signature(config: Config) -> None:
    obj = command("set_lane", {"lane": "A1", "gtin": "06901234567892", "price_cents": 1590})
    obj["args"]["price_cents"] = 1
    err = rejected(obj, config)
    assert err.reason.startswith("bad_signature")
    assert err.command_id == obj["id"] and err.type == "set_lane"


def test_tampered_envelope_is_bad_signature(config: Config) -> None:
    obj = command("open_door", open_door_args())
    obj["expires_at"] = ts_from_epoch(NOW + 120)
    assert rejected(obj, config).reason.startswith("bad_signature")


def test_signed_by_another_key_is_bad_signature(config: Config) -> None:
    obj = command("open_door", open_door_args(), key=OTHER)
    err = rejected(obj, config)
    assert err.reason.startswith("bad_signature")
    assert err.command_id == obj["id"] and err.type == "open_door"


def test_missing_sig_is_bad_signature(config: Config) -> None:
    obj = command("status", {}, key=None)
    err = rejected(obj, config)
    assert err.reason.startswith("bad_signature")
    assert err.command_id == obj["id"] and err.type == "status"


@pytest.mark.parametrize("sig", ["not base64 !!", "", 12345, None])
def test_garbage_sig_is_bad_signature(config: Config, sig: Any) -> None:
    obj = command("status", {})
    obj["sig"] = sig
    assert rejected(obj, config).reason.startswith("bad_signature")


def test_signature_checked_before_replay(config: Config) -> None:
    obj = command("status", {}, key=OTHER)
    assert rejected(obj, config, seen=lambda _id: True).reason.startswith("bad_signature")


def test_signature_covers_canonical_json_without_sig(config: Config) -> None:
    obj = command("status", {})
    reordered = {k: obj[k] for k in reversed(list(obj))}  # key order must not matter
    assert canonical(reordered) == canonical(obj)
    assert check(reordered, config).id == obj["id"]


# -- clock window -----------------------------------------------------------------------------------------
def test_expired_beyond_skew_rejected(config: Config) -> None:
    obj = command("status", {}, issued=NOW - 400, expires=NOW - 300.001)
    err = rejected(obj, config)
    assert err.reason.startswith("expired")
    assert err.command_id == obj["id"] and err.type == "status"


def test_expired_within_skew_accepted(config: Config) -> None:
    assert check(command("status", {}, issued=NOW - 400, expires=NOW - 299), config).type == "status"
    assert check(command("status", {}, issued=NOW - 400, expires=NOW - 300), config).type == "status"


def test_ttl_exactly_300_s_accepted(config: Config) -> None:
    cmd = check(command("status", {}, issued=NOW, expires=NOW + 300), config)
    assert cmd.expires_at - cmd.issued_at == 300


def test_ttl_300_001_s_rejected(config: Config) -> None:
    obj = command("status", {}, issued=NOW, expires=NOW + 300.001)
    assert obj["expires_at"] == "2026-11-29T08:05:00.001Z"
    err = rejected(obj, config)
    assert err.reason.startswith("invalid")
    assert "300" in err.reason
    assert err.command_id == obj["id"] and err.type == "status"


def test_issued_in_future_beyond_skew_rejected(config: Config) -> None:
    obj = command("status", {}, issued=NOW + 300.001, expires=NOW + 360)
    err = rejected(obj, config)
    assert err.reason.startswith("not_yet_valid")
    assert err.command_id == obj["id"] and err.type == "status"


@pytest.mark.parametrize("ahead", [1.0, 299.0, 300.0])
def test_issued_in_future_within_skew_accepted(config: Config, ahead: float) -> None:
    assert check(command("status", {}, issued=NOW + ahead, expires=NOW + ahead + 60), config).type == "status"


@pytest.mark.parametrize("field", ["issued_at", "expires_at"])
@pytest.mark.parametrize("value", [None, "yesterday", "2026-11-29 08:00:00", 1_800_000_000])
def test_bad_timestamps_rejected_as_invalid(config: Config, field: str, value: Any) -> None:
    obj = command("status", {}, key=None)
    if value is None:
        del obj[field]
    else:
        obj[field] = value
    err = rejected(sign(obj, PRIVATE), config)
    assert err.reason.startswith("invalid")
    assert err.command_id == obj["id"]


# -- replay, type ------------------------------------------------------------------------------------------------
def test_replay_rejected(config: Config) -> None:
    obj = command("open_door", open_door_args())
    err = rejected(obj, config, seen=lambda cid: cid == obj["id"])
    assert err.reason.startswith("replay")
    assert err.command_id == obj["id"] and err.type == "open_door"


def test_replay_even_when_re_signed_later(config: Config) -> None:
    first = command("status", {})
    again = command("status", {}, cid=first["id"], issued=NOW + 10, expires=NOW + 70)
    assert again["sig"] != first["sig"]
    assert rejected(again, config, seen=lambda cid: cid == first["id"]).reason.startswith("replay")


def test_unknown_type_rejected(config: Config) -> None:
    obj = command("self_destruct", {})
    err = rejected(obj, config)
    assert err.reason.startswith("unknown_type")
    assert err.command_id == obj["id"] and err.type == "self_destruct"


def test_missing_id_rejected_without_command_id(config: Config) -> None:
    obj = command("status", {}, key=None)
    del obj["id"]
    err = rejected(sign(obj, PRIVATE), config)
    assert err.reason.startswith("invalid")
    assert err.command_id is None and err.type == "status"


def test_missing_type_rejected_with_command_id(config: Config) -> None:
    obj = command("status", {}, key=None)
    del obj["type"]
    err = rejected(sign(obj, PRIVATE), config)
    assert err.reason.startswith("invalid")
    assert err.command_id == obj["id"] and err.type is None


# -- invalid args ------------------------------------------------------------------------------------------------
BAD_ARGS = [
    # open_door: door not in config / not an integer
    ("open_door", open_door_args(door=3)),
    ("open_door", open_door_args(door=0)),
    ("open_door", open_door_args(door="1")),
    ("open_door", open_door_args(door=1.0)),
    ("open_door", open_door_args(door=True)),
    ("open_door", open_door_args(door=None)),
    # open_door: session_id missing or not a UUID
    ("open_door", {k: v for k, v in open_door_args().items() if k != "session_id"}),
    ("open_door", open_door_args(session_id="not-a-uuid")),
    ("open_door", open_door_args(session_id="")),
    ("open_door", open_door_args(session_id=12345)),
    ("open_door", open_door_args(session_id=None)),
    # open_door: auth
    ("open_door", open_door_args(auth="pin")),
    ("open_door", open_door_args(auth="FACE")),
    ("open_door", open_door_args(auth=None)),
    # open_door: other required args missing
    ("open_door", {k: v for k, v in open_door_args().items() if k != "door"}),
    ("open_door", {k: v for k, v in open_door_args().items() if k != "shopper"}),
    ("open_door", {k: v for k, v in open_door_args().items() if k != "auth"}),
    ("open_door", {}),
    # set_lane
    ("set_lane", {"lane": "Z9", "gtin": "06901234567892", "price_cents": 100}),
    ("set_lane", {"lane": "a1", "gtin": "06901234567892", "price_cents": 100}),
    ("set_lane", {"lane": "A1", "gtin": "06901234567892", "price_cents": -1}),
    ("set_lane", {"lane": "A1", "gtin": "06901234567892", "price_cents": 15.9}),
    ("set_lane", {"lane": "A1", "gtin": "06901234567892", "price_cents": 100.0}),
    ("set_lane", {"lane": "A1", "gtin": "06901234567892", "price_cents": True}),
    ("set_lane", {"lane": "A1", "gtin": "06901234567892", "price_cents": False}),
    ("set_lane", {"lane": "A1", "gtin": "06901234567892", "price_cents": "1590"}),
    ("set_lane", {"lane": "A1", "gtin": "06901234567892", "price_cents": None}),
    ("set_lane", {"lane": "A1", "gtin": "06901234567892"}),
    ("set_lane", {"lane": "A1", "price_cents": 100}),
    ("set_lane", {"gtin": "06901234567892", "price_cents": 100}),
    # resend
    ("resend", {"from_seq": 0}),
    ("resend", {"from_seq": -5}),
    ("resend", {"from_seq": 1.0}),
    ("resend", {"from_seq": 2.5}),
    ("resend", {"from_seq": "1"}),
    ("resend", {"from_seq": True}),
    ("resend", {}),
    # args not an object
    ("status", []),
    ("status", "all"),
]


@pytest.mark.parametrize(("type_", "args"), BAD_ARGS, ids=[f"{t}-{i}" for i, (t, _) in enumerate(BAD_ARGS)])
def test_invalid_args_rejected(config: Config, type_: str, args: Any) -> None:
    obj = command(type_, copy.deepcopy(args))
    err = rejected(obj, config)
    assert err.reason.startswith("invalid_args"), err.reason
    assert err.command_id == obj["id"] and err.type == type_


def test_invalid_args_reason_names_the_problem(config: Config) -> None:
    assert "door" in rejected(command("open_door", open_door_args(door=3)), config).reason
    assert "session_id" in rejected(command("open_door", open_door_args(session_id="x")), config).reason
    assert "auth" in rejected(command("open_door", open_door_args(auth="pin")), config).reason
    assert "price_cents" in rejected(
        command("set_lane", {"lane": "A1", "gtin": "06901234567892", "price_cents": -1}), config).reason
    assert "lane" in rejected(
        command("set_lane", {"lane": "Z9", "gtin": "06901234567892", "price_cents": 1}), config).reason
    assert "from_seq" in rejected(command("resend", {"from_seq": 0}), config).reason


def test_rejected_is_a_command_rejected_with_its_reason_as_message(config: Config) -> None:
    from agent.errors import CommandRejected

    err = rejected(command("resend", {"from_seq": 0}), config)
    assert isinstance(err, CommandRejected)
    assert str(err) == err.reason


# -- payload parsing ------------------------------------------------------------------------------------------------
def test_parse_payload_object() -> None:
    assert parse_payload(b'{"id": "x", "type": "status"}') == {"id": "x", "type": "status"}


@pytest.mark.parametrize("payload", [b"not json", b"\xff\xfe", b"[1, 2]", b'"status"', b""])
def test_parse_payload_rejects_non_objects(payload: bytes) -> None:
    with pytest.raises(Rejected) as info:
        parse_payload(payload)
    assert info.value.reason.startswith("invalid")
    assert info.value.command_id is None and info.value.type is None

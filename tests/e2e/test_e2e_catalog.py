"""End to end: the certified catalog through the real broker and the real daemon (issue 3, acceptance).

Catalog documents travel over MQTT (retained snapshot, deltas, the per-cabinet topic) or come
from a file through ``cabinetctl catalog install``; the tests observe only what the platform
and an operator can observe: ledger records (events, sales), the retained status, replies to
commands, and ``cabinetctl`` output and exit codes.

Nothing sleeps to synchronise. A "nothing happened" check uses a barrier: the agent handles
catalog documents in arrival order, so a later document whose event we wait for proves that
the earlier ones were handled (and left no event).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import zoneinfo
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol
from agent.sim.cabinet import DEMO_PRODUCTS, SimulatedCabinet
from agent.store.catalog import CatalogStore
from cabinet_helpers import OPERATOR, CabinetFactory, ctl_json, wait_event
from drivers.gs1 import with_check_digit
from helpers import wait_until

pytestmark = pytest.mark.timeout(120)

CATALOG_TOPIC = "cab/v1/catalog"
TODAY = dt.datetime.now(dt.timezone.utc).date()   # the cabinets run with timezone UTC


def _product(ean13_body: str, name: str, cert: str, *, valid_from: dt.date | None = None,
             valid_until: dt.date | None = None, unit_g: float = 100.0, gtin: str | None = None) -> dict[str, Any]:
    return {
        "gtin": gtin or "0" + with_check_digit(ean13_body), "name": name, "producer": "Test Co-op",
        "origin": "Test county, Test province", "cert_id": cert,
        "valid_from": (valid_from or TODAY - dt.timedelta(days=365)).isoformat(),
        "valid_until": (valid_until or TODAY + dt.timedelta(days=365)).isoformat(),
        "unit_weight_g": unit_g, "weight_tolerance_g": 4.0,
    }


SHIITAKE, HONEY, TEA, DATES = (dict(p) for p in DEMO_PRODUCTS)     # lanes A1, A2, B1, B2
WALNUTS = _product("690123456101", "Walnuts 500 g", "PA-2026-100001", unit_g=500.0)
MILLET = _product("690123456102", "Millet 1 kg", "PA-2026-100002", unit_g=1000.0)
FUTURE = _product("690123456103", "Chestnuts 250 g", "PA-2026-100003",
                  valid_from=TODAY + dt.timedelta(days=30), valid_until=TODAY + dt.timedelta(days=400))
EXPIRED = _product("690123456104", "Goji berries 250 g", "PA-2025-100004",
                   valid_from=TODAY - dt.timedelta(days=400), valid_until=TODAY - dt.timedelta(days=30))
# A GTIN-14 whose UPC-A form (12 digits) is what a scanner reads off the pack.
UPCA_CODE = with_check_digit("03600029145")
PEANUTS = _product("", "Peanuts 400 g", "PA-2026-100005", gtin="00" + UPCA_CODE)
REVOKED_GTIN = "0" + with_check_digit("690123456199")   # revoked by the platform, never listed
UNKNOWN_GTIN = "0" + with_check_digit("690123456198")   # valid check digit, in no catalog
BAD_CHECK = SHIITAKE["gtin"][:-1] + str((int(SHIITAKE["gtin"][-1]) + 1) % 10)


# -- fixtures and helpers ------------------------------------------------------------------------

@pytest.fixture
def cabinet_id() -> str:
    return "CAB-CAT"


def events_between(cab: SimulatedCabinet, lo: int, hi: int, kinds: tuple[str, ...]) -> list[tuple[int, dict]]:
    """Events of ``kinds`` with lo < seq < hi, once every record up to ``hi`` is at the platform."""
    cab.platform.wait_contiguous(hi)
    return [(r["seq"], r["body"]) for r in cab.platform.records_in_order()
            if lo < r["seq"] < hi and r["type"] == "event" and r["body"]["kind"] in kinds]


def wait_status(cab: SimulatedCabinet, pred: Any, what: str, timeout: float = 15.0) -> dict[str, Any]:
    cab.platform.wait_for(lambda: bool(cab.platform.status) and pred(cab.platform.status), timeout, what)
    return dict(cab.platform.status)


def catalog_info(cab: SimulatedCabinet) -> dict[str, Any]:
    return ctl_json(cab, "catalog")


def lookup(cab: SimulatedCabinet, code: str) -> tuple[int, str]:
    """``cabinetctl catalog lookup CODE``: (exit code, stdout + stderr)."""
    out = cab.ctl("catalog", "lookup", code)
    return out.returncode, out.stdout + out.stderr


def forge(doc: dict[str, Any]) -> dict[str, Any]:
    """The same document signed with a key that is not the platform's."""
    return protocol.sign({k: v for k, v in doc.items() if k != "sig"}, Ed25519PrivateKey.generate())


def agent_connections(cab: SimulatedCabinet) -> int:
    """How many times the agent's MQTT client connected to the broker (from mosquitto's log)."""
    return len(re.findall(rf" as cab-{re.escape(cab.cabinet_id)} \(", cab.broker.log_path.read_text()))


def lane_row(cab: SimulatedCabinet, lane: str) -> dict[str, Any]:
    return next(r for r in ctl_json(cab, "lanes") if r["lane"] == lane)


# -- snapshots and deltas over MQTT -----------------------------------------------------------------

def test_snapshot_install_replaces_catalog_and_updates_status(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    first = wait_event(cab, "catalog_installed", version=1)["body"]
    assert first == {"kind": "catalog_installed", "version": 1, "products": 4, "delta": False}

    doc = cab.platform.make_catalog(2, [SHIITAKE, HONEY, TEA, WALNUTS, MILLET])   # DATES left out
    cab.platform.publish_catalog(doc, "snapshot")
    body = wait_event(cab, "catalog_installed", version=2)["body"]
    assert body == {"kind": "catalog_installed", "version": 2, "products": 5, "delta": False}
    wait_status(cab, lambda st: st.get("catalog_version") == 2, "status reports catalog version 2")

    assert catalog_info(cab) == {"version": 2, "issued_at": doc["issued_at"], "products": 5}
    assert ctl_json(cab, "status")["catalog_version"] == 2
    rc, text = lookup(cab, WALNUTS["gtin"])
    assert rc == 0 and "Walnuts 500 g" in text
    # A snapshot replaces the catalog: a product it does not list is no longer known.
    rc, text = lookup(cab, DATES["gtin"])
    assert rc == 1 and "unknown" in text.lower(), text


def test_delta_upserts_products_and_removes_revoked(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    renamed = dict(HONEY, name="Wild mountain honey 500 g (new label)")
    delta = cab.platform.make_catalog(2, [renamed, WALNUTS], base_version=1, revoked=[TEA["gtin"]])
    cab.platform.publish_catalog(delta, "delta")

    body = wait_event(cab, "catalog_installed", version=2)["body"]
    # 4 products + 1 new - 1 revoked
    assert body == {"kind": "catalog_installed", "version": 2, "products": 4, "delta": True}
    wait_status(cab, lambda st: st.get("catalog_version") == 2, "status reports catalog version 2")
    assert catalog_info(cab)["version"] == 2 and catalog_info(cab)["products"] == 4

    rc, text = lookup(cab, HONEY["gtin"])
    assert rc == 0 and "Wild mountain honey 500 g (new label)" in text, text
    rc, text = lookup(cab, WALNUTS["gtin"])
    assert rc == 0 and "Walnuts 500 g" in text, text
    rc, text = lookup(cab, SHIITAKE["gtin"])                 # untouched by the delta
    assert rc == 0 and SHIITAKE["name"] in text, text
    rc, text = lookup(cab, TEA["gtin"])
    assert rc == 1 and "revoked" in text.lower(), text


def test_delta_base_mismatch_rejected_and_retained_snapshot_redelivered(cabinet: SimulatedCabinet) -> None:
    """After a base_mismatch the agent subscribes to cab/v1/catalog again, which makes the broker send
    the retained snapshot once more. To see that redelivery (a valid snapshot already received is
    ignored silently), the retained document here is a forged one: every delivery of it leaves a
    catalog_rejected bad_signature event."""
    cab = cabinet
    connections = agent_connections(cab)
    assert connections == 1
    forged = forge(cab.platform.make_catalog(7, [SHIITAKE, WALNUTS]))
    cab.platform.publish_catalog(forged, "snapshot", retain=True)
    first_seq = wait_event(cab, "catalog_rejected", version=7, reason="bad_signature")["seq"]

    delta = cab.platform.make_catalog(3, [MILLET], base_version=2)   # the agent has version 1
    cab.platform.publish_catalog(delta, "delta")
    event = wait_event(cab, "catalog_rejected", version=3, reason="base_mismatch")
    mismatch_seq, body = event["seq"], event["body"]
    assert body == {"kind": "catalog_rejected", "version": 3, "reason": "base_mismatch"}
    assert mismatch_seq > first_seq
    # The re-subscription brought the retained snapshot again.
    again_seq = wait_event(cab, "catalog_rejected", after=mismatch_seq, version=7, reason="bad_signature")["seq"]
    assert again_seq > mismatch_seq
    assert agent_connections(cab) == connections, "the redelivery must come from a re-subscription, not a reconnect"

    # Neither the delta nor the forgery touched the installed catalog.
    assert catalog_info(cab)["version"] == 1
    assert lookup(cab, MILLET["gtin"])[0] == 1
    assert lookup(cab, WALNUTS["gtin"])[0] == 1

    # The platform publishes a real snapshot: the agent installs it and takes deltas on it again.
    cab.platform.publish_catalog(cab.platform.make_catalog(4, [SHIITAKE, HONEY, TEA, DATES]), "snapshot")
    wait_event(cab, "catalog_installed", version=4, delta=False)
    cab.platform.publish_catalog(cab.platform.make_catalog(5, [MILLET], base_version=4), "delta")
    wait_event(cab, "catalog_installed", version=5, delta=True, products=5)


def test_base_mismatch_then_retained_snapshot_installed_after_reconnect(cabinet: SimulatedCabinet) -> None:
    """While the agent is down the platform moves on: a delta the agent cannot apply waits in its
    persistent session, and a newer snapshot is retained (published at QoS 0, so it is not queued:
    only the retained copy, sent on subscribe, can bring it). After the restart the delta is
    rejected first, then the retained snapshot is installed; its redelivery is ignored silently."""
    cab = cabinet
    cab.stop_agent()
    cab.platform.publish_catalog(cab.platform.make_catalog(6, [WALNUTS], base_version=4), "delta")
    snapshot = cab.platform.make_catalog(5, [SHIITAKE, HONEY, TEA, DATES, WALNUTS])
    cab.platform.publish_raw(CATALOG_TOPIC, snapshot, retain=True, qos=0)
    cab.start_agent()

    event = wait_event(cab, "catalog_installed", version=5)
    installed_seq, body = event["seq"], event["body"]
    assert body == {"kind": "catalog_installed", "version": 5, "products": 5, "delta": False}
    rejected_seq = wait_event(cab, "catalog_rejected", version=6, reason="base_mismatch")["seq"]
    assert rejected_seq < installed_seq
    wait_status(cab, lambda st: st.get("catalog_version") == 5, "status reports catalog version 5")

    # Barrier: a stale document on the per-cabinet topic; between the install and its rejection
    # there is no other catalog event (the snapshot delivered again is the installed version).
    cab.platform.publish_catalog(cab.platform.make_catalog(4, [SHIITAKE]), "cabinet")
    stale_seq = wait_event(cab, "catalog_rejected", version=4, reason="stale")["seq"]
    assert events_between(cab, installed_seq, stale_seq, ("catalog_installed", "catalog_rejected")) == []
    assert catalog_info(cab)["version"] == 5


def test_same_version_ignored_silently_lower_version_stale(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    v2 = cab.platform.make_catalog(2, [SHIITAKE, HONEY, TEA, DATES, WALNUTS])
    cab.platform.publish_catalog(v2, "snapshot")
    installed_seq = wait_event(cab, "catalog_installed", version=2)["seq"]

    # The very same retained document again, and another document with the same version number.
    cab.platform.publish_catalog(v2, "snapshot")
    other_v2 = cab.platform.make_catalog(2, [dict(SHIITAKE, name="Renamed shiitake"), MILLET])
    cab.platform.publish_catalog(other_v2, "cabinet")
    # A lower version: rejected as stale (and it is our barrier).
    cab.platform.publish_catalog(cab.platform.make_catalog(1, [SHIITAKE]), "cabinet")
    event = wait_event(cab, "catalog_rejected", version=1, reason="stale")
    stale_seq, body = event["seq"], event["body"]
    assert body == {"kind": "catalog_rejected", "version": 1, "reason": "stale"}

    assert events_between(cab, installed_seq, stale_seq, ("catalog_installed", "catalog_rejected")) == []
    assert catalog_info(cab) == {"version": 2, "issued_at": v2["issued_at"], "products": 5}
    rc, text = lookup(cab, SHIITAKE["gtin"])
    assert rc == 0 and SHIITAKE["name"] in text and "Renamed" not in text
    assert lookup(cab, MILLET["gtin"])[0] == 1


def test_forged_or_invalid_catalog_rejected_and_old_catalog_kept(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    # Signed by another key.
    cab.platform.publish_catalog(forge(cab.platform.make_catalog(2, [WALNUTS])), "snapshot", retain=False)
    body = wait_event(cab, "catalog_rejected", reason="bad_signature", version=2)["body"]
    assert body == {"kind": "catalog_rejected", "version": 2, "reason": "bad_signature"}
    # Signed by the platform, then a field changed.
    tampered = cab.platform.make_catalog(3, [SHIITAKE, HONEY, TEA, DATES, WALNUTS])
    tampered["products"][0]["valid_until"] = "2099-12-31"
    cab.platform.publish_catalog(tampered, "cabinet")
    wait_event(cab, "catalog_rejected", reason="bad_signature", version=3)
    # A tampered delta (a revocation slipped in) on the delta topic.
    delta = cab.platform.make_catalog(4, [], base_version=1)
    delta["revoked"] = [SHIITAKE["gtin"]]
    cab.platform.publish_catalog(delta, "delta")
    wait_event(cab, "catalog_rejected", reason="bad_signature", version=4)

    # Signed, but not a valid catalog: a product with a bad check digit; and bytes that are not JSON.
    cab.platform.publish_catalog(cab.platform.make_catalog(5, [dict(WALNUTS, gtin=BAD_CHECK)]), "cabinet")
    body = wait_event(cab, "catalog_rejected", reason="invalid", version=5)["body"]
    cab.platform.publish_catalog(b'{"version": 6, "products": [', "delta")
    body = wait_event(cab, "catalog_rejected", reason="invalid", version=None)["body"]
    # A signed delta that lost its base_version must not be read as a snapshot (it would wipe the catalog).
    no_base = protocol.sign({"version": 7, "issued_at": protocol.format_ts(dt.datetime.now(dt.timezone.utc)),
                         "products": [WALNUTS], "revoked": []}, cab.platform.private_key)
    cab.platform.publish_catalog(no_base, "delta")
    body = wait_event(cab, "catalog_rejected", reason="invalid", version=7)["body"]

    assert catalog_info(cab)["version"] == 1
    assert cab.platform.status["catalog_version"] == 1
    assert lookup(cab, WALNUTS["gtin"])[0] == 1
    rc, text = lookup(cab, SHIITAKE["gtin"])
    assert rc == 0 and DEMO_PRODUCTS[0]["valid_until"] in text
    assert cab.platform.events("catalog_installed") == [
        {"kind": "catalog_installed", "version": 1, "products": 4, "delta": False}]

    # The refusals blocked nothing: the genuine version 2 installs.
    cab.platform.publish_catalog(cab.platform.make_catalog(2, [SHIITAKE, HONEY, TEA, DATES, WALNUTS]), "snapshot")
    wait_event(cab, "catalog_installed", version=2, products=5)


def test_per_cabinet_catalog_topic(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    cab.platform.publish_catalog(cab.platform.make_catalog(2, [SHIITAKE, HONEY, TEA, DATES, WALNUTS]), "cabinet")
    body = wait_event(cab, "catalog_installed", version=2)["body"]
    assert body == {"kind": "catalog_installed", "version": 2, "products": 5, "delta": False}
    # Another cabinet's document is none of this agent's business.
    other = cab.platform.make_catalog(9, [MILLET])
    cab.platform.publish_raw("cab/v1/CAB-OTHER/catalog", other)
    cab.platform.publish_catalog(cab.platform.make_catalog(3, [MILLET], base_version=2), "cabinet")
    body = wait_event(cab, "catalog_installed", version=3)["body"]
    assert body == {"kind": "catalog_installed", "version": 3, "products": 6, "delta": True}
    wait_status(cab, lambda st: st.get("catalog_version") == 3, "status reports catalog version 3")
    assert [e["version"] for e in cab.platform.events("catalog_installed")] == [1, 2, 3]
    assert cab.platform.events("catalog_rejected") == []
    assert lookup(cab, MILLET["gtin"])[0] == 0


# -- cabinetctl catalog -------------------------------------------------------------------------------

def test_cabinetctl_catalog_json_and_lookup_reasons(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    doc = cab.platform.make_catalog(2, [SHIITAKE, HONEY, TEA, DATES, FUTURE, EXPIRED, PEANUTS],
                                    revoked=[REVOKED_GTIN])
    cab.platform.publish_catalog(doc, "snapshot")
    wait_event(cab, "catalog_installed", version=2)

    out = cab.ctl("catalog", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"version": 2, "issued_at": doc["issued_at"], "products": 7}
    out = cab.ctl("catalog")
    assert out.returncode == 0 and "version 2" in out.stdout and "7 products" in out.stdout

    rc, text = lookup(cab, SHIITAKE["gtin"])
    assert rc == 0 and SHIITAKE["name"] in text and SHIITAKE["cert_id"] in text, text
    # EAN-13 (the GTIN-14 without its leading zero) and UPC-A forms of listed products.
    rc, text = lookup(cab, SHIITAKE["gtin"][1:])
    assert rc == 0 and SHIITAKE["gtin"] in text and SHIITAKE["name"] in text, text
    rc, text = lookup(cab, UPCA_CODE)
    assert rc == 0 and PEANUTS["gtin"] in text and "Peanuts" in text, text

    for code, why in [(UNKNOWN_GTIN, "unknown"), (REVOKED_GTIN, "revoked"), (FUTURE["gtin"], "not yet valid"),
                      (EXPIRED["gtin"], "expired"), (BAD_CHECK, "check digit"),
                      (REVOKED_GTIN[1:], "revoked"), (FUTURE["gtin"][1:], "not yet valid")]:
        rc, text = lookup(cab, code)
        assert rc == 1, (code, rc, text)
        assert why in text.lower(), (code, why, text)
        assert "not certified" in text.lower(), text

    out = cab.ctl("catalog", "lookup")
    assert out.returncode == 2, (out.returncode, out.stderr)


def test_cabinetctl_catalog_install_file(cabinet: SimulatedCabinet, tmp_path: Path) -> None:
    cab = cabinet
    good = tmp_path / "catalog-v2.json"
    doc = cab.platform.make_catalog(2, [SHIITAKE, HONEY, TEA, DATES, WALNUTS])
    good.write_text(json.dumps(doc))
    out = cab.ctl("catalog", "install", str(good))
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert "version 2" in out.stdout
    body = wait_event(cab, "catalog_installed", version=2)["body"]
    assert body == {"kind": "catalog_installed", "version": 2, "products": 5, "delta": False}
    assert catalog_info(cab) == {"version": 2, "issued_at": doc["issued_at"], "products": 5}
    wait_status(cab, lambda st: st.get("catalog_version") == 2, "status reports catalog version 2")

    forged = tmp_path / "catalog-v3-forged.json"
    forged.write_text(json.dumps(forge(cab.platform.make_catalog(3, [MILLET]))))
    out = cab.ctl("catalog", "install", str(forged))
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert "bad_signature" in out.stderr
    wait_event(cab, "catalog_rejected", version=3, reason="bad_signature")

    stale = tmp_path / "catalog-v1.json"
    stale.write_text(json.dumps(cab.platform.make_catalog(1, [SHIITAKE])))
    out = cab.ctl("catalog", "install", str(stale))
    assert out.returncode == 1 and "stale" in out.stderr, (out.returncode, out.stderr)
    wait_event(cab, "catalog_rejected", version=1, reason="stale")

    missing = tmp_path / "no-such-catalog.json"
    out = cab.ctl("catalog", "install", str(missing))
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert str(missing) in out.stderr

    delta = tmp_path / "catalog-v3-delta.json"
    delta.write_text(json.dumps(cab.platform.make_catalog(3, [MILLET], base_version=2)))
    out = cab.ctl("catalog", "install", str(delta))
    assert out.returncode == 0, (out.stdout, out.stderr)
    wait_event(cab, "catalog_installed", version=3, delta=True, products=6)

    assert catalog_info(cab)["version"] == 3
    assert lookup(cab, MILLET["gtin"])[0] == 0


# -- the planogram only takes certified products ------------------------------------------------------

def test_set_lane_refuses_uncertified_gtin(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    cab.platform.publish_catalog(
        cab.platform.make_catalog(2, [SHIITAKE, HONEY, TEA, DATES, FUTURE, EXPIRED], revoked=[REVOKED_GTIN]),
        "snapshot")
    wait_event(cab, "catalog_installed", version=2)

    for gtin in (UNKNOWN_GTIN, REVOKED_GTIN, FUTURE["gtin"], EXPIRED["gtin"]):
        cid = cab.platform.send_command("set_lane", {"lane": "A1", "gtin": gtin, "price_cents": 999})
        reply = cab.platform.wait_reply(cid)
        assert reply["ok"] is False and reply["error"], reply
        body = wait_event(cab, "command_rejected", command_id=cid)["body"]
        assert body["type"] == "set_lane" and body["reason"], body

    row = lane_row(cab, "A1")
    assert row["gtin"] == SHIITAKE["gtin"] and row["price_cents"] == 1590 and row["certified"] is True

    # Control: a certified product (given in its EAN-13 form) is accepted and stored as GTIN-14.
    reply = cab.command_ok("set_lane", {"lane": "A1", "gtin": HONEY["gtin"][1:], "price_cents": 777})
    assert reply["result"]["gtin"] == HONEY["gtin"]
    row = lane_row(cab, "A1")
    assert row["gtin"] == HONEY["gtin"] and row["price_cents"] == 777


def test_restock_in_service_mode_with_certified_codes_only(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    cab.platform.publish_catalog(cab.platform.make_catalog(2, [SHIITAKE, HONEY, TEA, DATES, WALNUTS, EXPIRED]),
                                 "snapshot")
    wait_event(cab, "catalog_installed", version=2)

    out = cab.ctl("restock", "A1", "--code", SHIITAKE["gtin"], "--price", "100")
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert "service mode" in out.stderr

    out = cab.ctl("service", "on")
    assert out.returncode == 0, out.stderr
    body = wait_event(cab, "service_mode", on=True)["body"]
    assert body == {"kind": "service_mode", "on": True, "operator": OPERATOR}
    wait_status(cab, lambda st: st.get("mode") == "service", "status mode service")

    out = cab.ctl("restock", "A1", "--code", UNKNOWN_GTIN, "--price", "100")
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert "not certified" in out.stderr and "unknown" in out.stderr, out.stderr
    body = wait_event(cab, "uncertified_scan", code=UNKNOWN_GTIN)["body"]
    assert body["context"] == "restock" and body["reason"] == "unknown" and body["gtin"] == UNKNOWN_GTIN, body

    out = cab.ctl("restock", "A2", "--code", EXPIRED["gtin"][1:])
    assert out.returncode == 1 and "expired" in out.stderr, (out.returncode, out.stderr)
    body = wait_event(cab, "uncertified_scan", code=EXPIRED["gtin"][1:])["body"]
    assert body["context"] == "restock" and body["reason"] == "expired" and body["gtin"] == EXPIRED["gtin"], body

    out = cab.ctl("restock", "A1", "--code", WALNUTS["gtin"])
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert "--price" in out.stderr

    assert lane_row(cab, "A1")["gtin"] == SHIITAKE["gtin"]            # refusals changed nothing
    assert cab.platform.events("restock") == []

    out = cab.ctl("restock", "A1", "--code", WALNUTS["gtin"], "--price", "100", "--qty", "3")
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)
    body = wait_event(cab, "restock", gtin=WALNUTS["gtin"])["body"]
    assert body == {"kind": "restock", "lane": "A1", "gtin": WALNUTS["gtin"], "qty": 3,
                    "cert_id": WALNUTS["cert_id"], "operator": OPERATOR}
    row = lane_row(cab, "A1")
    assert row["gtin"] == WALNUTS["gtin"] and row["price_cents"] == 100 and row["certified"] is True

    # The lane's own product needs no price; the EAN-13 form is the same product.
    out = cab.ctl("restock", "A1", "--code", WALNUTS["gtin"][1:])
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)
    body = wait_event(cab, "restock", gtin=WALNUTS["gtin"], qty=1)["body"]
    assert body["lane"] == "A1" and body["operator"] == OPERATOR
    assert lane_row(cab, "A1")["price_cents"] == 100

    out = cab.ctl("service", "off")
    assert out.returncode == 0, out.stderr
    body = wait_event(cab, "service_mode", on=False)["body"]
    assert body == {"kind": "service_mode", "on": False, "operator": OPERATOR}
    wait_status(cab, lambda st: st.get("mode") == "ready", "status mode ready")


# -- revocation and staleness --------------------------------------------------------------------

def test_revoked_lane_product_raises_alarm_and_flags_sale(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    assert "revoked_product:A1" not in cab.platform.status["alarms"]
    cab.platform.publish_catalog(cab.platform.make_catalog(2, [], base_version=1, revoked=[SHIITAKE["gtin"]]),
                                 "delta")
    wait_event(cab, "catalog_installed", version=2, delta=True, products=3)
    st = wait_status(cab, lambda s: "revoked_product:A1" in s.get("alarms", []), "alarm revoked_product:A1")
    assert not any(a.startswith("revoked_product:") and a != "revoked_product:A1" for a in st["alarms"]), st
    assert "revoked_product:A1" in ctl_json(cab, "status")["alarms"]
    assert lane_row(cab, "A1")["certified"] is False

    sid = cab.shop(1, {"A1": 1, "A2": 1}, shopper="shopper-revoked")
    rec = cab.wait_session_end(sid)
    assert rec["type"] == "sale", rec
    items = {item["lane"]: item for item in rec["body"]["items"]}
    assert set(items) == {"A1", "A2"}
    assert items["A1"]["gtin"] == SHIITAKE["gtin"] and items["A1"]["qty"] == 1
    # The lane keeps what it knew of the product: the sale still says what was sold.
    assert items["A1"]["name"] == SHIITAKE["name"] and items["A1"]["cert_id"] == SHIITAKE["cert_id"]
    assert items["A1"]["unit_price_cents"] == 1590
    assert "uncertified_item" in items["A1"]["flags"]
    assert items["A2"]["flags"] == []
    assert "uncertified_item" in rec["body"]["flags"]

    # Certified again (a delta lists it anew): the alarm clears.
    cab.platform.publish_catalog(cab.platform.make_catalog(3, [SHIITAKE], base_version=2), "delta")
    wait_event(cab, "catalog_installed", version=3, delta=True, products=4)
    wait_status(cab, lambda s: s.get("catalog_version") == 3 and "revoked_product:A1" not in s.get("alarms", []),
                "alarm revoked_product:A1 cleared")


def test_certificate_dates_are_cabinet_local_dates(make_cabinet: CabinetFactory) -> None:
    """valid_from/valid_until are calendar dates in the cabinet's time zone, not in UTC. The zone is
    picked so that its date differs from the UTC date right now."""
    now = dt.datetime.now(dt.timezone.utc)
    tz = "Pacific/Kiritimati" if now.hour >= 10 else "Pacific/Pago_Pago"    # UTC+14 / UTC-11
    local_day = now.astimezone(zoneinfo.ZoneInfo(tz)).date()
    utc_day = now.date()
    assert local_day != utc_day
    local_only = _product("690123456201", "Fresh bamboo shoots", "PA-2026-200001",
                          valid_from=local_day, valid_until=local_day)
    utc_only = _product("690123456202", "Fresh lotus root", "PA-2026-200002", valid_from=utc_day, valid_until=utc_day)
    cab = make_cabinet(cabinet_id="CAB-TZ", products=[*DEMO_PRODUCTS, local_only, utc_only],
                       config_extra={"cabinet": {"timezone": tz}}, assign_lanes=False)
    rc, text = lookup(cab, local_only["gtin"])
    assert rc == 0, (tz, text)
    rc, text = lookup(cab, utc_only["gtin"])
    assert rc == 1 and ("expired" if local_day > utc_day else "not yet valid") in text.lower(), (tz, text)
    cab.command_ok("set_lane", {"lane": "A1", "gtin": local_only["gtin"], "price_cents": 500})
    cid = cab.platform.send_command("set_lane", {"lane": "A2", "gtin": utc_only["gtin"], "price_cents": 500})
    assert cab.platform.wait_reply(cid)["ok"] is False


def test_catalog_stale_alarm(make_cabinet: CabinetFactory) -> None:
    cab = make_cabinet(cabinet_id="CAB-STALE", config_extra={"platform": {"catalog_max_age_days": 1}},
                       assign_lanes=False, publish_catalog=False)
    now = dt.datetime.now(dt.timezone.utc)
    cab.platform.publish_catalog(
        cab.platform.make_catalog(1, DEMO_PRODUCTS, issued_at=now - dt.timedelta(days=3)), "snapshot")
    wait_status(cab, lambda s: s.get("catalog_version") == 1 and "catalog_stale" in s.get("alarms", []),
                "catalog version 1 installed with alarm catalog_stale")
    assert "catalog_stale" in ctl_json(cab, "status")["alarms"]

    # Half a day old is within the configured day: the alarm clears.
    cab.platform.publish_catalog(
        cab.platform.make_catalog(2, DEMO_PRODUCTS, issued_at=now - dt.timedelta(hours=12)), "snapshot")
    wait_status(cab, lambda s: s.get("catalog_version") == 2 and "catalog_stale" not in s.get("alarms", []),
                "catalog version 2 installed without alarm catalog_stale")


def test_sigkill_during_a_large_install_keeps_the_old_catalog_and_restart_installs_cleanly(
        make_cabinet: CabinetFactory) -> None:
    """A 300,000-product retained snapshot over MQTT; the agent is killed while installing it."""
    # the ~90 MB document is above the default max_message_mb (64): this cabinet admits 256
    cab = make_cabinet(cabinet_id="CAB-BIG", assign_lanes=False, config_extra={"platform": {"max_message_mb": 256}})
    assert cab.platform is not None
    big = [_product("", f"Product {i}", f"PA-2026-{i:06d}", gtin="0" + with_check_digit(f"69{i:010d}"))
           for i in range(300_000)]
    doc = cab.platform.make_catalog(2, big + list(DEMO_PRODUCTS))
    wal = cab.workdir / "data" / "catalog.db-wal"
    before = wal.stat().st_size if wal.exists() else 0
    cab.platform.publish_catalog(doc, "snapshot")
    # the install is under way once its staging writes grow the catalog's WAL by megabytes
    wait_until(lambda: wal.exists() and wal.stat().st_size > before + 8 * 2**20, 60, "install under way")
    cab.kill_agent()
    assert not any(e.get("version") == 2 for e in cab.platform.events("catalog_installed"))
    # the old catalog (version 1) is intact: read it with the daemon down, straight from its file
    store = CatalogStore(cab.workdir / "data" / "catalog.db", cab.platform.private_key.public_key())
    assert store.version == 1 and store.product_count == len(DEMO_PRODUCTS)
    store.close()
    # a restart receives the retained snapshot again and installs it cleanly
    cab.start_agent()
    cab.wait_catalog(2, timeout=90)
    out = cab.ctl("catalog", "--json")
    assert json.loads(out.stdout)["products"] == 300_000 + len(DEMO_PRODUCTS)
    assert cab.ctl("catalog", "lookup", big[123_456]["gtin"]).returncode == 0
    assert cab.ctl("catalog", "lookup", DEMO_PRODUCTS[0]["gtin"]).returncode == 0

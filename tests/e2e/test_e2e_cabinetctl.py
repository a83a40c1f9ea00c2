"""End to end: ``cabinetctl`` against the real daemon (a subprocess) of a simulated cabinet.

Every command is run as the operator runs it (``python -m agent.cli.cabinetctl --config ...``), and its
effect is checked where the contract says it shows: the exit code and output of cabinetctl,
the records and status the reference platform receives over MQTT (spec/mqtt.md), the frames
the lock board simulator receives, and the ledger file itself (spec/operations.md).

Synchronisation is always a wait on a condition with a deadline (``platform.wait_for``,
``helpers.wait_until``); "nothing happened" is checked against a barrier: the last seq the
daemon reports, once the platform holds every record up to it.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
import os
import sqlite3
import subprocess
import sys
import threading
import uuid
import zoneinfo
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import canonical
from agent.sim.cabinet import TRAY_G, SimulatedCabinet, Timings
from cabinet_helpers import OPERATOR, CabinetFactory, lane_weight, unlock_frames, wait_event, wait_lane_weight
from cabinet_helpers import cabinetctl_status as status
from drivers.lockboard.codec import UnlockRequest
from helpers import wait_until

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent.parent
STATUS_KEYS = ("online", "at", "cabinet", "agent_version", "catalog_version", "unsynced", "last_seq", "mode",
               "doors", "alarms")
RECORD_KEYS = {"seq", "type", "at", "prev", "hash", "body"}
# Door tests: a latch released long enough to pull the door open after the unlock frame is
# seen, and a short door_open_alarm_s so that the left-open alarm comes quickly.
DOOR_TIMINGS = dataclasses.replace(Timings.fast(), latch_release_s=0.5, door_open_alarm_s=1.0)
# Acks withheld: no automatic resend during the test, so a resend is cabinetctl's doing.
SLOW_RESEND = dataclasses.replace(Timings.fast(), ack_timeout_s=60.0)


# -- fixtures and helpers ----------------------------------------------------------------------------
@pytest.fixture
def cabinet_id() -> str:
    return "CAB-CTL"


@pytest.fixture
def door_cabinet(make_cabinet: CabinetFactory) -> SimulatedCabinet:
    return make_cabinet(timings=DOOR_TIMINGS)


@pytest.fixture
def unacked_cabinet(make_cabinet: CabinetFactory) -> SimulatedCabinet:
    """The platform stores every record but acks none until told to."""
    return make_cabinet(timings=SLOW_RESEND, auto_ack=False)


def run_ctl(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """cabinetctl with exactly ``args`` (no --config added)."""
    return subprocess.run([sys.executable, "-m", "agent.cli.cabinetctl", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    return result


def ctl_when_stable(cab: SimulatedCabinet, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """tare/calibrate need a stable weight: retry while (and only while) the daemon says it is not yet."""
    def attempt() -> subprocess.CompletedProcess[str] | None:
        r = cab.ctl(*args)
        if r.returncode == 0:
            return r
        assert "not stable" in r.stderr, f"{args}: exit {r.returncode}: {r.stderr}"
        return None

    return wait_until(attempt, timeout, f"cabinetctl {' '.join(args)} with a stable weight")


def ctl_when_stable_failure(cab: SimulatedCabinet, *args: str,
                            timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """Like ctl_when_stable, for a command expected to be refused for another reason than stability."""
    def attempt() -> subprocess.CompletedProcess[str] | None:
        r = cab.ctl(*args)
        return None if r.returncode == 1 and "not stable" in r.stderr else r

    return wait_until(attempt, timeout, f"cabinetctl {' '.join(args)} past the stability check")


def barrier(cab: SimulatedCabinet) -> int:
    """The daemon's last seq now, once the platform holds every record up to it."""
    last = status(cab)["last_seq"]
    cab.platform.wait_contiguous(last)
    return last


def events(cab: SimulatedCabinet, kind: str) -> list[dict[str, Any]]:
    return cab.platform.events(kind)


def sales_json(cab: SimulatedCabinet, *args: str) -> list[dict[str, Any]]:
    out = json.loads(ok(cab.ctl("sales", "--json", *args)).stdout)
    assert isinstance(out, list)
    return out


# -- status and lanes -----------------------------------------------------------------------------------
def test_status_json_holds_the_mqtt_status_object_plus_link_and_lanes(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    last = barrier(cab)
    wait_until(lambda: status(cab)["unsynced"] == 0, 10, "everything acked")
    st = status(cab)
    for key in STATUS_KEYS:
        assert key in st, key
    mqtt_status = cab.platform.status
    assert mqtt_status is not None
    for key in STATUS_KEYS:
        # the MQTT status is republished on a change of doors, mode or alarms, not of the counters
        if key not in ("at", "unsynced", "last_seq"):
            assert st[key] == mqtt_status[key], key
    assert st["online"] is True and st["cabinet"] == "CAB-CTL" and st["agent_version"] == "0.3.0"
    assert st["at"].endswith("Z") and dt.datetime.fromisoformat(st["at"].replace("Z", "+00:00"))
    assert st["catalog_version"] == cab.catalog_version == 1
    assert st["last_seq"] == last and st["unsynced"] == 0
    assert st["mode"] == "ready" and st["alarms"] == []
    assert st["doors"] == [{"door": 1, "open": False, "locked": True}, {"door": 2, "open": False, "locked": True}]
    assert st["broker_connected"] is True
    expected_lanes = [{"lane": ln.lane, "gtin": cab.products[ln.product]["gtin"],
                       "weight_g": TRAY_G + ln.stock * cab.unit_g(ln.lane)} for ln in cab.lane_specs]
    assert [set(ln) for ln in st["lanes"]] == [{"lane", "gtin", "weight_g"}] * 4
    for got, want in zip(st["lanes"], expected_lanes, strict=True):
        assert got["lane"] == want["lane"] and got["gtin"] == want["gtin"]
        assert got["weight_g"] == pytest.approx(want["weight_g"], abs=0.3)


def test_status_human_text(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    out = ok(cab.ctl("status")).stdout
    assert "mode: ready" in out
    assert "CAB-CTL" in out
    for door in (1, 2):
        assert f"door {door}" in out
    assert "shut, locked" in out
    for ln in cab.lane_specs:
        assert f"lane {ln.lane}" in out
        assert f"{TRAY_G + ln.stock * cab.unit_g(ln.lane):.1f} g" in out
        assert cab.products[ln.product]["gtin"] in out
    assert "alarms    none" in out
    assert "version 1" in out                       # catalog version
    assert "connected" in out and "NOT connected" not in out


def test_lanes_json_fields_and_values(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    cab.scales.set_weight(cab.lane("A1").channel, 7 * cab.unit_g("A1"))     # 7 units, no tray
    cab.scales.set_weight(cab.lane("B1").channel, 3 * cab.unit_g("B1") + 40)  # 3.36 units: rounds to 3
    wait_lane_weight(cab, "A1", 7 * cab.unit_g("A1"))
    wait_lane_weight(cab, "B1", 3 * cab.unit_g("B1") + 40)
    rows = json.loads(ok(cab.ctl("lanes", "--json")).stdout)
    assert isinstance(rows, list) and [r["lane"] for r in rows] == ["A1", "A2", "B1", "B2"]
    for row, spec in zip(rows, cab.lane_specs, strict=True):
        product = cab.products[spec.product]
        assert set(row) == {"lane", "door", "channel", "gtin", "name", "price_cents", "weight_g", "count",
                            "certified"}
        assert (row["door"], row["channel"]) == (spec.door, spec.channel)
        assert row["gtin"] == product["gtin"] and row["name"] == product["name"]
        assert row["price_cents"] == spec.price_cents
        assert row["certified"] is True
        assert row["weight_g"] == pytest.approx(cab.scales.weight(spec.channel), abs=0.3)
        assert row["count"] == round(row["weight_g"] / product["unit_weight_g"])
    by_lane = {r["lane"]: r for r in rows}
    assert by_lane["A1"]["count"] == 7
    assert by_lane["B1"]["count"] == 3
    assert by_lane["A2"]["count"] == 8          # 120 g tray + 8 x 520 g
    text = ok(cab.ctl("lanes")).stdout
    assert "Dried shiitake 250 g" in text and "15.90" in text


# -- exit codes ---------------------------------------------------------------------------------------------
def test_daemon_not_reachable_exits_3(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    ok(cab.ctl("status"))
    assert cab.stop_agent() == 0
    for args in (("status",), ("status", "--json"), ("lanes",), ("service", "on"), ("price", "A1", "100")):
        r = cab.ctl(*args)
        assert r.returncode == 3, (args, r.returncode, r.stderr)
        assert "not reachable" in r.stderr
    # A daemon killed outright leaves its socket file behind: still "not reachable".
    cab.start_agent()
    ok(cab.ctl("status"))
    cab.kill_agent()
    assert Path(cab.config()["cabinet"]["control_socket"]).exists()
    r = cab.ctl("status", "--json")
    assert r.returncode == 3, r.stderr
    assert r.stdout == ""


def test_config_errors_exit_2(cabinet: SimulatedCabinet, tmp_path: Path) -> None:
    cab = cabinet
    r = run_ctl("--config", str(tmp_path / "missing.toml"), "status")
    assert r.returncode == 2, r.stderr
    assert "missing.toml" in r.stderr
    bad = tmp_path / "bad.toml"
    cfg = cab.config_path.read_text() + '\n[bogus]\nkey = 1\n'
    bad.write_text(cfg)
    r = run_ctl("--config", str(bad), "status")
    assert r.returncode == 2, r.stderr
    assert "bogus" in r.stderr
    # The environment variable stands in for --config.
    env = dict(os.environ, CABINET_AGENT_CONFIG=str(cab.config_path))
    r = run_ctl("status", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cabinet"] == "CAB-CTL"


USAGE_ERRORS = [
    ("bogus",),                          # unknown subcommand
    (),                                  # no subcommand
    ("price", "A1", "notanumber"),
    ("price", "A1"),
    ("unlock", "one"),
    ("calibrate", "A1", "heavy"),
    ("service", "maybe"),
    ("sales", "--json", "--csv"),
    ("sales", "--since", "yesterday"),
    ("export",),                         # --out is required
    ("price", "A1", "-5"),               # these reach the daemon, which answers "usage"
    ("calibrate", "A1", "0"),
]


def test_usage_errors_exit_2(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    for args in USAGE_ERRORS:
        r = cab.ctl(*args)
        assert r.returncode == 2, (args, r.returncode, r.stdout, r.stderr)
        assert r.stderr.strip(), args
    rows = json.loads(ok(cab.ctl("lanes", "--json")).stdout)
    assert rows[0]["price_cents"] == cab.lane("A1").price_cents


def test_unknown_lane_or_door_is_a_usage_error(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    for args in (("price", "Z9", "100"), ("tare", "Z9"), ("calibrate", "Z9", "500"),
                 ("restock", "Z9", "--code", cab.products[0]["gtin"])):
        r = cab.ctl(*args)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert "unknown lane 'Z9'" in r.stderr and "A1, A2, B1, B2" in r.stderr
    r = cab.ctl("unlock", "9")
    assert r.returncode == 2 and "unknown door 9" in r.stderr
    # nothing changed
    rows = json.loads(ok(cab.ctl("lanes", "--json")).stdout)
    assert [r["price_cents"] for r in rows] == [ln.price_cents for ln in cab.lane_specs]


def test_out_of_range_numbers_are_usage_errors(cabinet: SimulatedCabinet) -> None:
    """Regression: calibrate inf once set the factor to inf (status printed Infinity, lanes failed, the next
    session on that door never ended); nan and a price beyond SQLite's INTEGER failed as 'internal error' (1)."""
    cab = cabinet
    a2 = TRAY_G + 8 * cab.unit_g("A2")
    wait_lane_weight(cab, "A2", a2)
    for args in (("calibrate", "A2", "inf"), ("calibrate", "A2", "nan"), ("calibrate", "A2", "1e309"),
                 ("price", "A2", str(2**63))):
        r = ctl_when_stable_failure(cab, *args)
        assert r.returncode == 2, (args, r.returncode, r.stdout, r.stderr)
        assert "internal error" not in r.stderr
    assert lane_weight(cab, "A2") == pytest.approx(a2, abs=0.3)
    rows = {r["lane"]: r for r in json.loads(ok(cab.ctl("lanes", "--json")).stdout)}
    assert rows["A2"]["price_cents"] == 4800 and rows["A2"]["count"] == 8
    sid = cab.shop(1, {"A2": 1})
    assert cab.wait_session_end(sid)["body"]["total_cents"] == 4800


# -- service mode, unlock, doors ------------------------------------------------------------------------------
def test_service_mode_events_and_open_door_refused(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    assert ok(cab.ctl("service", "on")).stdout.strip() == "service mode on"
    on = wait_event(cab, "service_mode", lambda b: b["on"] is True)
    assert on["body"] == {"kind": "service_mode", "on": True, "operator": OPERATOR}
    st = status(cab)
    assert st["mode"] == "service"
    assert "mode: service" in ok(cab.ctl("status")).stdout
    cab.platform.wait_for(lambda: (cab.platform.status or {}).get("mode") == "service", 10, "MQTT status service")

    frames_before = unlock_frames(cab, 1)
    cid = cab.platform.send_command("open_door", {"door": 1, "session_id": str(uuid.uuid4()), "shopper": "s-1",
                                                  "auth": "face"})
    reply = cab.platform.wait_reply(cid)
    assert reply["ok"] is False and "service" in reply["error"]
    rej = wait_event(cab, "command_rejected", lambda b: b["command_id"] == cid)
    assert rej["body"]["type"] == "open_door" and "service" in rej["body"]["reason"]

    ok(cab.ctl("service", "on"))     # already on: no second event
    assert ok(cab.ctl("service", "off")).stdout.strip() == "service mode off"
    off = wait_event(cab, "service_mode", lambda b: b["on"] is False)
    assert off["body"] == {"kind": "service_mode", "on": False, "operator": OPERATOR}
    assert off["seq"] > on["seq"]
    assert len(events(cab, "service_mode")) == 2
    assert status(cab)["mode"] == "ready"
    assert unlock_frames(cab, 1) == frames_before     # the refused open_door never unlocked
    # Shopping works again; and service mode cannot start under a running session.
    cab.authorize(1, "s-2")
    r = cab.ctl("service", "on")
    assert r.returncode == 1 and "session" in r.stderr, (r.returncode, r.stderr)
    assert status(cab)["mode"] == "session"
    barrier(cab)
    assert len(events(cab, "service_mode")) == 2


def test_unlock_outside_service_mode_is_refused(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    frames_before = unlock_frames(cab, 1)
    r = cab.ctl("unlock", "1")
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "service mode" in r.stderr
    barrier(cab)
    assert events(cab, "service_unlock") == []
    assert unlock_frames(cab, 1) == frames_before


def test_service_unlock_opens_the_door_without_door_forced(door_cabinet: SimulatedCabinet) -> None:
    cab = door_cabinet
    ok(cab.ctl("service", "on"))
    frame = UnlockRequest(1, 1).to_bytes()
    since = len(cab.lockboard.received)
    assert ok(cab.ctl("unlock", "1")).stdout.strip() == "door 1 unlocked"
    assert cab.lockboard.wait_for_frame(lambda f: f == frame, 5, since) is not None
    assert cab.lockboard.open_door(1), "the latch of door 1 was not released"
    ev = wait_event(cab, "service_unlock")
    assert ev["body"] == {"kind": "service_unlock", "door": 1, "operator": OPERATOR}
    cab.wait_door_seen_open(1)
    assert {"door": 1, "open": True, "locked": False} in status(cab)["doors"]
    cab.lockboard.close_door(1)
    cab.platform.wait_for(lambda: {"door": 1, "open": False, "locked": True} in cab.platform.status["doors"], 10,
                          "door 1 shut")
    barrier(cab)
    assert events(cab, "door_forced") == []
    # Still in service mode, but the service unlock is used up: opening door 1 now is forced (rule 7).
    cab.lockboard.force_open(1)
    forced = wait_event(cab, "door_forced")
    assert forced["body"] == {"kind": "door_forced", "door": 1}
    assert forced["seq"] > ev["seq"]
    cab.lockboard.close_door(1)
    ok(cab.ctl("service", "off"))


def test_forced_door_left_open_raises_and_clears_the_alarm(door_cabinet: SimulatedCabinet) -> None:
    cab = door_cabinet
    cab.lockboard.force_open(1)
    forced = wait_event(cab, "door_forced")
    assert forced["body"] == {"kind": "door_forced", "door": 1}
    left = wait_event(cab, "door_left_open", timeout=10)
    assert left["body"]["door"] == 1 and left["body"]["session_id"] is None
    assert left["body"]["open_s"] >= DOOR_TIMINGS.door_open_alarm_s
    assert left["seq"] > forced["seq"]
    st = status(cab)
    assert "door_left_open:1" in st["alarms"]
    assert {"door": 1, "open": True, "locked": False} in st["doors"]
    assert "door_left_open:1" in ok(cab.ctl("status")).stdout
    cab.platform.wait_for(lambda: "door_left_open:1" in (cab.platform.status or {}).get("alarms", []), 10,
                          "MQTT status alarm door_left_open:1")
    assert len(events(cab, "door_forced")) == 1     # reported once per opening
    cab.lockboard.close_door(1)
    wait_until(lambda: "door_left_open:1" not in status(cab)["alarms"], 10, "alarm cleared")
    cab.platform.wait_for(lambda: (cab.platform.status or {}).get("alarms") == [], 10, "MQTT alarms cleared")
    st = status(cab)
    assert st["alarms"] == [] and st["mode"] == "ready"
    assert "alarms    none" in ok(cab.ctl("status")).stdout


# -- price, tare, calibrate ---------------------------------------------------------------------------------------
def test_price_changes_the_price_of_the_next_sale(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    assert ok(cab.ctl("price", "A1", "1234")).stdout.strip() == "lane A1: price 1234 cents"
    rows = {r["lane"]: r for r in json.loads(ok(cab.ctl("lanes", "--json")).stdout)}
    assert rows["A1"]["price_cents"] == 1234 and rows["A2"]["price_cents"] == 4800
    sid = cab.shop(1, {"A1": 2, "A2": 1})
    sale = cab.wait_session_end(sid)
    assert sale["type"] == "sale"
    items = {i["lane"]: i for i in sale["body"]["items"]}
    assert items["A1"]["unit_price_cents"] == 1234 and items["A1"]["qty"] == 2
    assert items["A2"]["unit_price_cents"] == 4800
    assert sale["body"]["total_cents"] == 2 * 1234 + 4800
    ok(cab.ctl("price", "A1", "0"))     # free is a price too
    sid = cab.shop(1, {"A1": 1})
    assert cab.wait_session_end(sid)["body"]["total_cents"] == 0


def test_tare_one_lane_then_all(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    a2 = TRAY_G + 8 * cab.unit_g("A2")
    assert ctl_when_stable(cab, "tare", "A1").stdout.strip() == "tared A1"
    wait_lane_weight(cab, "A1", 0.0, tol=0.3)
    assert lane_weight(cab, "A2") == pytest.approx(a2, abs=0.3)       # the other lanes untouched
    # The tare is an offset: what is added afterwards reads as itself.
    cab.scales.add_weight(cab.lane("A1").channel, 250.0)
    wait_lane_weight(cab, "A1", 250.0, tol=0.3)
    rows = {r["lane"]: r for r in json.loads(ok(cab.ctl("lanes", "--json")).stdout)}
    assert rows["A1"]["count"] == 1

    assert ctl_when_stable(cab, "tare", "all").stdout.strip() == "tared A1, A2, B1, B2"
    wait_until(lambda: all(abs(ln["weight_g"]) <= 0.3 for ln in status(cab)["lanes"]), 10, "all lanes ~0")


def test_calibrate_makes_the_lane_read_the_known_weight(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    ch = cab.lane("A1").channel
    cab.scales.set_weight(ch, TRAY_G)                       # empty tray
    wait_lane_weight(cab, "A1", TRAY_G)
    ctl_when_stable(cab, "tare", "A1")
    wait_lane_weight(cab, "A1", 0.0, tol=0.3)
    # A transmitter that reads 400 g for a 500 g reference weight.
    cab.scales.add_weight(ch, 400.0)
    wait_lane_weight(cab, "A1", 400.0)
    out = ctl_when_stable(cab, "calibrate", "A1", "500").stdout
    assert "calibration factor 1.25" in out
    wait_lane_weight(cab, "A1", 500.0, tol=0.5)
    cab.scales.add_weight(ch, 400.0)                        # a second reference weight
    wait_lane_weight(cab, "A1", 1000.0, tol=1.0)
    rows = {r["lane"]: r for r in json.loads(ok(cab.ctl("lanes", "--json")).stdout)}
    assert rows["A1"]["count"] == 4                         # 1000 g / 250 g
    # Other lanes keep factor 1.
    assert lane_weight(cab, "A2") == pytest.approx(TRAY_G + 8 * cab.unit_g("A2"), abs=0.3)
    # Nothing on the lane above its tare: refused, not a division by zero.
    cab.scales.set_weight(ch, TRAY_G)
    wait_lane_weight(cab, "A1", 0.0, tol=0.5)
    r = ctl_when_stable_failure(cab, "calibrate", "A1", "500")
    assert r.returncode == 1 and "put the known weight on it" in r.stderr


# -- sales ----------------------------------------------------------------------------------------------------------
def _local_date(at: str, tz: str) -> dt.date:
    return dt.datetime.fromisoformat(at.replace("Z", "+00:00")).astimezone(zoneinfo.ZoneInfo(tz)).date()


def test_sales_order_filters_and_formats(make_cabinet: CabinetFactory) -> None:
    # A zone far from UTC, chosen so that "midnight local" and "midnight UTC" of the records'
    # local date differ in a way that changes the answer at this time of day.
    tz = "Etc/GMT+12" if dt.datetime.now(dt.timezone.utc).hour < 11 else "Etc/GMT-14"
    cab = make_cabinet(config_extra={"cabinet": {"timezone": tz}})
    _check_sales(cab, tz)


def _check_sales(cab: SimulatedCabinet, tz: str) -> None:
    ok(cab.ctl("service", "on"))
    ok(cab.ctl("service", "off"))
    sid = cab.shop(1, {"A1": 2})
    last = barrier(cab)
    assert last >= 5
    received = cab.platform.records_in_order()
    assert [r["seq"] for r in received] == list(range(1, last + 1))

    # text: newest first
    lines = ok(cab.ctl("sales")).stdout.splitlines()
    assert [int(ln.split()[0]) for ln in lines] == list(range(last, 0, -1))
    sale_line = next(ln for ln in lines if "SALE" in ln)
    assert "31.80" in sale_line and "2x Dried shiitake 250 g" in sale_line

    # --json: one array of records as in mqtt.md, newest first, equal to what the platform got
    recs = sales_json(cab)
    assert [r["seq"] for r in recs] == list(range(last, 0, -1))
    for rec in recs:
        assert set(rec) == RECORD_KEYS
    assert recs == list(reversed(received))
    sale = next(r for r in recs if r["type"] == "sale")
    assert sale["body"]["session_id"] == sid

    # --since an RFC 3339 time: records at or after it
    pivot = next(r for r in received if r["body"].get("kind") == "service_mode")
    want = [r for r in reversed(received) if r["at"] >= pivot["at"]]
    assert 0 < len(want) < len(received)
    assert sales_json(cab, "--since", pivot["at"]) == want
    # the same instant with an offset
    at_utc = dt.datetime.fromisoformat(pivot["at"].replace("Z", "+00:00"))
    offset = at_utc.astimezone(dt.timezone(dt.timedelta(hours=8))).isoformat(timespec="milliseconds")
    assert "+08:00" in offset
    assert sales_json(cab, "--since", offset) == want
    # one millisecond later: the pivot itself drops out
    later = (at_utc + dt.timedelta(milliseconds=1)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert pivot["seq"] not in [r["seq"] for r in sales_json(cab, "--since", later)]

    # --since a date: midnight in the cabinet's time zone
    newest_day = _local_date(received[-1]["at"], tz)
    want_day = [r for r in reversed(received) if _local_date(r["at"], tz) >= newest_day]
    assert want_day
    assert sales_json(cab, "--since", newest_day.isoformat()) == want_day
    assert sales_json(cab, "--since", (newest_day + dt.timedelta(days=1)).isoformat()) == []
    assert sales_json(cab, "--since", (newest_day - dt.timedelta(days=1)).isoformat()) == list(reversed(received))

    # --csv: a header row, then one row per record, newest first
    rows = list(csv.reader(io.StringIO(ok(cab.ctl("sales", "--csv")).stdout)))
    assert rows[0] == ["seq", "at", "type", "kind", "door", "session_id", "total_cents", "flags", "hash"]
    assert [int(r[0]) for r in rows[1:]] == list(range(last, 0, -1))
    sale_row = next(r for r in rows[1:] if r[2] == "sale")
    assert sale_row[4] == "1" and sale_row[5] == sid and sale_row[6] == "3180" and sale_row[8] == sale["hash"]
    assert next(r for r in rows[1:] if r[0] == "1")[3] == "agent_started"
    rows = list(csv.reader(io.StringIO(ok(cab.ctl("sales", "--csv", "--since", pivot["at"])).stdout)))
    assert rows[0][0] == "seq" and [int(r[0]) for r in rows[1:]] == [r["seq"] for r in want]

    # the ledger is readable with the daemon stopped
    assert cab.stop_agent() == 0
    assert sales_json(cab) == list(reversed(received))


# -- verify ---------------------------------------------------------------------------------------------------------
def test_verify_fresh_ledger_and_a_tampered_record(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    r = ok(cab.ctl("verify"))
    assert "ledger ok" in r.stdout
    ok(cab.ctl("service", "on"))
    ok(cab.ctl("service", "off"))
    ok(cab.ctl("service", "on"))
    ok(cab.ctl("service", "off"))
    last = barrier(cab)
    assert last >= 6
    assert cab.stop_agent() == 0
    r = ok(cab.ctl("verify"))                      # daemon stopped: still works
    assert f"{last} records verified" in r.stdout

    db = Path(cab.config()["cabinet"]["data_dir"]) / "ledger.db"
    conn = sqlite3.connect(db)
    try:
        # the 2nd and 4th service_mode events (seq 4 and 6 before set_lane was recorded too)
        modes = [seq for seq, body in conn.execute("SELECT seq, body FROM records ORDER BY seq")
                 if json.loads(body).get("kind") == "service_mode"]
        first_bad, second_bad = modes[1], modes[3]
        for seq in (first_bad, second_bad):        # the first bad one is the earlier
            (body,) = conn.execute("SELECT body FROM records WHERE seq = ?", (seq,)).fetchone()
            changed = json.loads(body)
            assert changed["kind"] == "service_mode"
            changed["operator"] = "mallory"
            conn.execute("UPDATE records SET body = ? WHERE seq = ?", (canonical(changed).decode(), seq))
        conn.commit()
    finally:
        conn.close()
    r = cab.ctl("verify")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert f"seq {first_bad}" in r.stderr and f"seq {second_bad}" not in r.stderr
    # The daemon still starts on a broken chain, with the ledger_corrupt alarm (operations.md, Files).
    cab.start_agent()
    assert "ledger_corrupt" in status(cab)["alarms"]
    r = cab.ctl("verify")
    assert r.returncode == 1 and f"seq {first_bad}" in r.stderr


def test_verify_detects_deleted_latest_records(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    ok(cab.ctl("service", "on"))
    ok(cab.ctl("service", "off"))
    last = barrier(cab)
    assert last == 4 + 4                 # + the four set_lane records of the lanes' assignment
    assert cab.stop_agent() == 0
    ok(cab.ctl("verify"))
    db = Path(cab.config()["cabinet"]["data_dir"]) / "ledger.db"
    conn = sqlite3.connect(db)
    try:
        conn.execute("DELETE FROM records WHERE seq = ?", (last,))   # hide the latest record
        conn.commit()
    finally:
        conn.close()
    r = cab.ctl("verify")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert f"ledger broken at seq {last}" in r.stderr


# -- export and sync --------------------------------------------------------------------------------------------------
def _export(cab: SimulatedCabinet, out: Path) -> list[dict[str, Any]]:
    r = ok(cab.ctl("export", "--out", str(out)))
    text = out.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert all(ln.strip() for ln in lines)
    assert f"exported {len(lines)} " in r.stdout
    return [json.loads(ln) for ln in lines]


def test_export_writes_exactly_the_unacknowledged_records(unacked_cabinet: SimulatedCabinet, tmp_path: Path) -> None:
    cab = unacked_cabinet
    ok(cab.ctl("service", "on"))
    ok(cab.ctl("service", "off"))
    last = barrier(cab)
    assert status(cab)["unsynced"] == last
    out = tmp_path / "usb" / "export.jsonl"
    out.parent.mkdir()
    got = _export(cab, out)
    assert [r["seq"] for r in got] == list(range(1, last + 1))
    for rec in got:
        assert set(rec) == RECORD_KEYS | {"cabinet"}            # v1.1: each line names its cabinet
        assert rec.pop("cabinet") == cab.cabinet_id
        assert rec == cab.platform.records[rec["seq"]]
    # The platform acks part of it: the next export holds only the rest.
    cab.platform.ack(2)
    wait_until(lambda: status(cab)["unsynced"] == last - 2, 10, "ack of 1..2 applied")
    wait_until(lambda: _export(cab, out)[0]["seq"] == 3, 10, "export starting at seq 3")
    got = _export(cab, out)
    assert [r["seq"] for r in got] == list(range(3, last + 1))
    assert all({k: v for k, v in rec.items() if k != "cabinet"} == cab.platform.records[rec["seq"]] for rec in got)
    assert not list(out.parent.glob("*.part"))


def test_export_with_everything_acked_writes_an_empty_file(cabinet: SimulatedCabinet, tmp_path: Path) -> None:
    cab = cabinet
    barrier(cab)
    wait_until(lambda: status(cab)["unsynced"] == 0, 10, "everything acked")
    out = tmp_path / "export.jsonl"
    out.write_text("stale content\n")
    # acks reach the ledger file within a second (the daemon batches their writes)
    wait_until(lambda: _export(cab, out) == [], 10, "an empty export")
    r = cab.ctl("export", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.exists() and out.stat().st_size == 0
    assert "exported 0 " in r.stdout


def test_export_to_an_unwritable_place_fails(cabinet: SimulatedCabinet, tmp_path: Path) -> None:
    r = cabinet.ctl("export", "--out", str(tmp_path / "no-such-dir" / "x.jsonl"))
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "cannot write" in r.stderr


def test_sync_resends_and_sync_wait_blocks_until_acknowledged(unacked_cabinet: SimulatedCabinet) -> None:
    cab = unacked_cabinet
    ok(cab.ctl("service", "on"))
    last = barrier(cab)
    dup_before = cab.platform.duplicates
    r = ok(cab.ctl("sync"))
    assert f"{last} unsynced" in r.stdout
    cab.platform.wait_for(lambda: cab.platform.duplicates >= dup_before + last, 10, "records resent")

    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli.cabinetctl", "--config", str(cab.config_path), "sync", "--wait"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    progress: list[str] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            progress.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        wait_until(lambda: sum("unsynced" in ln for ln in progress) >= 2, 15, "two progress lines from sync --wait")
        assert proc.poll() is None, "sync --wait returned while records were unacknowledged"
        assert f"unsynced {last}" in progress[0]
        cab.platform.set_auto_ack(True)
        proc.wait(timeout=20)
        assert proc.stdout is not None
        stdout = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    reader.join(5)
    assert proc.returncode == 0, "".join(progress)
    assert "all records acknowledged" in stdout
    assert any("unsynced 0" in ln for ln in progress)
    assert status(cab)["unsynced"] == 0

"""Issue 8 ("nothing lost, nothing forged, under every fault"), the operator's side: cabinetctl
against the real daemon of a simulated cabinet, each test a regression of one defect.

Synchronisation is a wait on a condition with a deadline (``platform.wait_for``,
``helpers.wait_until``) or on a process; never a sleep.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from operator_support import (
    FAST,
    NO_AUTO_RESEND,
    ROOT,
    barrier,
    ctl_past_stability,
    events,
    make_cabinet,
    ok,
    status,
)

from agent.control import MAX_CONNECTIONS, REQUEST_TIMEOUT_S
from agent.protocol import public_key_b64
from agent.sim.cabinet import TRAY_G, SimulatedCabinet
from cabinet_helpers import lane_weight, wait_lane_weight

pytestmark = pytest.mark.timeout(60)
OPERATOR = "root"   # the tests run as root (cabinetctl as another user: test_e2e_operator_readonly.py)


@pytest.fixture
def cabinet(tmp_path: Path) -> Iterator[SimulatedCabinet]:
    yield from make_cabinet(tmp_path / "cab", timings=FAST)


@pytest.fixture
def unacked_cabinet(tmp_path: Path) -> Iterator[SimulatedCabinet]:
    """The platform stores every record but acks only when told to; no automatic resend."""
    yield from make_cabinet(tmp_path / "cab", timings=NO_AUTO_RESEND, auto_ack=False)


def _export(cab: SimulatedCabinet, out: Path) -> list[dict[str, Any]]:
    r = ok(cab.ctl("export", "--out", str(out)))
    lines = [json.loads(ln) for ln in out.read_text(encoding="utf-8").splitlines()]
    assert f"exported {len(lines)} " in r.stdout
    return lines


# -- export right after sync --wait -------------------------------------------------------------------------
def test_export_right_after_sync_wait_returned_holds_nothing(unacked_cabinet: SimulatedCabinet,
                                                              tmp_path: Path) -> None:
    """Regression: ``export`` right after ``sync --wait`` returned still wrote the records just
    acknowledged: the daemon answered "nothing unsynced" from memory and wrote its ack watermark
    to the ledger up to a second later. The daemon is killed the moment sync --wait returns
    (a power cut), so the export shows what the ledger file held then; the race the defect
    needs comes up about every other round, so three rounds are run."""
    cab = unacked_cabinet
    assert cab.platform is not None
    out = tmp_path / "export.jsonl"
    ok(cab.ctl("service", "on"))
    for _round in range(3):                           # (each restart records agent_started: unsynced again)
        st = status(cab)
        assert st["unsynced"] > 0
        last = st["last_seq"]
        cab.platform.wait_contiguous(last)
        cab.platform.ack(last)
        r = ok(cab.ctl("sync", "--wait", "--timeout", "10"))
        assert "all records acknowledged" in r.stdout
        cab.kill_agent()
        got = _export(cab, out)
        assert got == [], f"round {_round}: export right after sync --wait holds seq {[g['seq'] for g in got]}"
        cab.start_agent()


def test_export_lines_carry_the_cabinet_id(unacked_cabinet: SimulatedCabinet, tmp_path: Path) -> None:
    cab = unacked_cabinet
    assert cab.platform is not None
    ok(cab.ctl("service", "on"))
    last = barrier(cab)
    got = _export(cab, tmp_path / "x.jsonl")
    assert [r["seq"] for r in got] == list(range(1, last + 1))
    for rec in got:
        assert rec.pop("cabinet") == "CAB-OP"
        assert rec == cab.platform.records[rec["seq"]]


# -- export through a new file, never through a symlink ----------------------------------------------------------
def test_export_never_writes_through_a_planted_symlink(cabinet: SimulatedCabinet, tmp_path: Path) -> None:
    """Regression: export wrote FILE.part, following a symlink planted there, and overwrote its target."""
    cab = cabinet
    usb = tmp_path / "usb"
    usb.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = usb / "export.jsonl"
    planted = usb / "export.jsonl.part"
    planted.symlink_to(victim)

    r = ok(cab.ctl("export", "--out", str(out)))
    assert victim.read_text() == "precious\n"
    assert planted.is_symlink() and os.readlink(planted) == str(victim)   # left as it was
    assert out.is_file() and not out.is_symlink()
    assert "exported" in r.stdout
    assert sorted(p.name for p in usb.iterdir()) == ["export.jsonl", "export.jsonl.part"]   # no temp file left

    # a symlink at FILE itself is refused, its target untouched
    link = usb / "link.jsonl"
    link.symlink_to(victim)
    r = cab.ctl("export", "--out", str(link))
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "symbolic link" in r.stderr and "Traceback" not in r.stderr
    assert victim.read_text() == "precious\n" and link.is_symlink()
    assert sorted(p.name for p in usb.iterdir()) == ["export.jsonl", "export.jsonl.part", "link.jsonl"]


# -- price, tare, calibrate leave records ---------------------------------------------------------------------------
def _wait_events(cab: SimulatedCabinet, kind: str, count: int) -> list[dict[str, Any]]:
    assert cab.platform is not None
    cab.platform.wait_for(lambda: len(events(cab, kind)) >= count, 10, f"{count} {kind} event(s)")
    return events(cab, kind)


def test_price_tare_and_calibrate_are_recorded_with_lane_values_and_operator(cabinet: SimulatedCabinet) -> None:
    """Regression: price, tare and calibrate changed what sales are computed from without a record."""
    cab = cabinet
    assert cab.scales is not None
    ok(cab.ctl("price", "A1", "1234"))
    (price,) = _wait_events(cab, "price_set", 1)
    assert price == {"kind": "price_set", "lane": "A1", "price_cents": 1234, "previous_price_cents": 1590,
                     "operator": OPERATOR}

    ch = cab.lane("A1").channel
    cab.scales.set_weight(ch, TRAY_G)
    wait_lane_weight(cab, "A1", TRAY_G)
    ok(ctl_past_stability(cab, "tare", "A1"))
    (tare,) = _wait_events(cab, "tare", 1)
    assert set(tare) == {"kind", "lane", "tare_g", "previous_tare_g", "operator"}
    assert tare["lane"] == "A1" and tare["tare_g"] == pytest.approx(TRAY_G, abs=0.5)
    assert tare["previous_tare_g"] == 0.0 and tare["operator"] == OPERATOR

    cab.scales.add_weight(ch, 400.0)
    wait_lane_weight(cab, "A1", 400.0)
    ok(ctl_past_stability(cab, "calibrate", "A1", "500"))
    (cal,) = _wait_events(cab, "calibrate", 1)
    assert set(cal) == {"kind", "lane", "grams", "reading_g", "factor", "previous_factor", "operator"}
    assert cal["lane"] == "A1" and cal["grams"] == 500 and cal["reading_g"] == pytest.approx(400.0, abs=0.5)
    assert cal["factor"] == pytest.approx(1.25, rel=2e-3) and cal["previous_factor"] == 1.0
    assert cal["operator"] == OPERATOR

    ok(ctl_past_stability(cab, "tare", "all"))
    tares = _wait_events(cab, "tare", 5)
    assert sorted(t["lane"] for t in tares[1:]) == ["A1", "A2", "B1", "B2"]
    # the records are in the ledger too, as the operator's tools read it
    kinds = [r["body"].get("kind") for r in json.loads(ok(cab.ctl("sales", "--json")).stdout)]
    assert kinds.count("price_set") == 1 and kinds.count("calibrate") == 1 and kinds.count("tare") == 5


# -- calibrate bounds ----------------------------------------------------------------------------------------------
def test_calibrate_refuses_a_factor_outside_half_to_double_the_reading(cabinet: SimulatedCabinet) -> None:
    """Regression: ``calibrate A1 1e308`` set a factor of 2.5e305 (and any absurd finite factor an absurd
    count). v1.1: a factor outside 0.5-2.0 of the transmitter's own reading is refused, exit 1."""
    cab = cabinet
    assert cab.scales is not None
    ch = cab.lane("A1").channel
    cab.scales.set_weight(ch, TRAY_G)
    wait_lane_weight(cab, "A1", TRAY_G)
    ok(ctl_past_stability(cab, "tare", "A1"))
    cab.scales.add_weight(ch, 400.0)
    wait_lane_weight(cab, "A1", 400.0)
    for grams in ("1e308", "100", "801"):
        r = ctl_past_stability(cab, "calibrate", "A1", grams)
        assert r.returncode == 1, (grams, r.returncode, r.stdout, r.stderr)
        assert "0.5-2.0" in r.stderr and "Traceback" not in r.stderr
    assert lane_weight(cab, "A1") == pytest.approx(400.0, abs=0.5)   # the factor is still 1
    # (inf, nan, 0: usage errors, exit 2: test_e2e_cabinetctl.py::test_out_of_range_numbers_are_usage_errors)
    out = ok(ctl_past_stability(cab, "calibrate", "A1", "790")).stdout   # within bounds: accepted
    assert "calibration factor 1.97" in out
    wait_lane_weight(cab, "A1", 790.0, tol=1.0)
    barrier(cab)
    assert len(events(cab, "calibrate")) == 1   # the refusals left no calibrate record


# -- restock --wait -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wait", ["nan", "inf", "-1", "0", "1e9", "soon"])
def test_restock_wait_must_be_a_finite_number_of_seconds(wait: str, tmp_path: Path) -> None:
    """Regression: ``restock --wait nan`` ended in a traceback. A usage error is decided before the
    daemon is asked, so no daemon is needed (its own check: test_control_socket_bounds...)."""
    cfg = tmp_path / "agent.toml"   # valid, so that only --wait can make it a usage error
    cfg.write_text(f'[cabinet]\nid = "CAB-OP"\ncontrol_socket = "{tmp_path / "none.sock"}"\n'
                   f'[platform]\npublic_key = "{public_key_b64(Ed25519PrivateKey.generate())}"\n')
    r = subprocess.run([sys.executable, "-m", "agent.cli.cabinetctl", "--config", str(cfg), "restock", "A1",
                        "--wait", wait], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "--wait" in r.stderr


# -- the control socket holds nothing forever -------------------------------------------------------------------
def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(REQUEST_TIMEOUT_S + 5)
    sock.connect(path)
    return sock


def _read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_control_socket_bounds_idle_connections_and_their_number(cabinet: SimulatedCabinet) -> None:
    """Regression: each idle connection to the control socket held a thread forever, without bound."""
    cab = cabinet
    path = cab.config()["cabinet"]["control_socket"]
    idle = [_connect(path) for _ in range(MAX_CONNECTIONS)]
    try:
        extra = _connect(path)
        extra.settimeout(3.0)
        answer = json.loads(_read_to_eof(extra))       # at once, not after the idle ones time out
        extra.close()
        assert answer["ok"] is False and answer["exit"] == 1 and "too many" in answer["error"]
        r = cab.ctl("status")
        assert r.returncode == 1 and "too many" in r.stderr, (r.returncode, r.stderr)
        for sock in idle:                               # each is closed by the daemon after its timeout
            last = _read_to_eof(sock).splitlines()[-1]
            assert json.loads(last)["exit"] == 2
    finally:
        for sock in idle:
            sock.close()
    ok(cab.ctl("status"))   # the daemon answers as before
    # the daemon's own check of a restock's --wait (cabinetctl's is above): a usage error, not a traceback
    with _connect(path) as sock:
        sock.sendall(b'{"cmd": "restock", "args": {"lane": "A1", "wait_s": NaN}}\n')
        answer = json.loads(_read_to_eof(sock))
    assert answer["ok"] is False and answer["exit"] == 2 and "--wait" in answer["error"]

"""Guards found in review: one daemon per data_dir, refused command ids stay seen, a service
unlock is confirmed by the board, the minimal config is valid."""

from __future__ import annotations

import base64
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from agent.sim.cabinet import SimulatedCabinet

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cabinet_id() -> str:
    return "CAB-ROB"


def test_a_second_daemon_on_the_same_data_dir_refuses_to_start(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    last_seq = max(cab.platform.records)
    second = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(cab.config_path)],
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 1
    assert "already running" in second.stderr
    # the first one is unharmed: a session still works and the chain continues without a gap
    sid = cab.shop(1, {"A1": 1})
    assert cab.wait_session_end(sid)["type"] == "sale"
    assert cab.platform.chain_errors == []
    assert not any(r["body"].get("kind") == "agent_started" for s, r in cab.platform.records.items() if s > last_seq)


def test_a_refused_command_id_is_a_replay_when_re_signed(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    cid = str(uuid.uuid4())
    cab.platform.send_command("set_lane", {"lane": "Z9", "gtin": cab.products[0]["gtin"], "price_cents": 1},
                              command_id=cid)
    assert cab.platform.wait_reply(cid)["error"].startswith("invalid_args")
    cab.platform.send_command("set_lane", {"lane": "A1", "gtin": cab.products[0]["gtin"], "price_cents": 1},
                              command_id=cid)
    second = cab.platform.wait_reply(cid, nth=2)
    assert second["ok"] is False and second["error"].startswith("replay")


def test_service_unlock_fails_when_the_board_does_not_answer(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    assert cab.ctl("service", "on").returncode == 0
    cab.lockboard.set_silent(True)
    try:
        r = cab.ctl("unlock", "1")
    finally:
        cab.lockboard.set_silent(False)
    assert r.returncode == 1
    assert "not" in r.stderr and ("confirmed" in r.stderr or "answering" in r.stderr)


def test_the_minimal_config_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    key = base64.b64encode(bytes(32)).decode()
    path.write_text(f'[cabinet]\nid = "CAB-MIN"\n\n[platform]\npublic_key = "{key}"\n')
    r = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr

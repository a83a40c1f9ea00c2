"""Acceptance 3 of issue 11: ``cabinet-platform keygen / sign / command / publish-catalog`` drive a real
agent (the daemon as a subprocess, with the lock-board and scale simulators and a private broker):
the key it makes is the one the agent trusts, the catalog it publishes is installed, the commands
it signs are carried out (a lane assigned, a door unlocked) or refused, with the exit codes of
platform.md."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import protocol
from agent.platform.keys import load_private_key
from agent.sim.broker import free_port
from agent.sim.cabinet import DEMO_PRODUCTS, SimulatedCabinet, Timings
from helpers import wait_until

pytestmark = pytest.mark.timeout(120)

CAB = "CAB-TOOLS"
SCRIPT = Path(sys.executable).parent / "cabinet-platform"


def cli(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli.platform", *args], capture_output=True, text=True,
                          input=stdin, timeout=timeout)


@pytest.fixture
def key_and_public(tmp_path: Path) -> tuple[Path, str]:
    """``cabinet-platform keygen`` through the installed console script."""
    assert SCRIPT.exists(), f"{SCRIPT} missing: pip install -e . installs the cabinet-platform script"
    key = tmp_path / "platform.pem"
    out = subprocess.run([str(SCRIPT), "keygen", "--out", str(key)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    public = out.stdout.strip()
    assert protocol.load_public_key(public)
    assert protocol.public_key_b64(load_private_key(key)) == public
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    return key, public


@pytest.fixture
def cabinet(tmp_path: Path, key_and_public: tuple[Path, str]) -> Iterator[tuple[SimulatedCabinet, list[int]]]:
    """The real agent, trusting the keygen'd key (its own reference platform only watches)."""
    unlocks: list[int] = []
    lock = threading.Lock()

    def on_unlock(lock_no: int) -> None:
        with lock:
            unlocks.append(lock_no)

    cab = SimulatedCabinet(tmp_path / "cab", cabinet_id=CAB, timings=Timings.fast(), on_unlock=on_unlock,
                           config_extra={"platform": {"public_key": key_and_public[1]}})
    try:
        cab.start(assign_lanes=False, publish_catalog=False)
        yield cab, unlocks
    finally:
        cab.stop()


def test_keygen_refuses_to_replace_a_key(key_and_public: tuple[Path, str]) -> None:
    key, public = key_and_public
    again = cli("keygen", "--out", str(key))
    assert again.returncode == 1 and "refusing" in again.stderr
    assert protocol.public_key_b64(load_private_key(key)) == public       # untouched
    forced = cli("keygen", "--out", str(key), "--force")
    assert forced.returncode == 0 and forced.stdout.strip() != public
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


def test_the_tools_drive_a_real_agent(cabinet: tuple[SimulatedCabinet, list[int]], key_and_public: tuple[Path, str],
                                      tmp_path: Path) -> None:
    cab, unlocks = cabinet
    key, _ = key_and_public
    assert cab.broker is not None and cab.platform is not None and cab.lockboard is not None
    broker = cab.broker.url

    # publish-catalog: a snapshot (retained), signed by the tool, installed by the agent
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps({"version": 1, "base_version": None, "products": DEMO_PRODUCTS[:3], "revoked": []}))
    out = cli("publish-catalog", "--broker", broker, "--key", str(key), str(catalog))
    assert out.returncode == 0, out.stderr
    assert "version 1" in out.stdout and "cab/v1/catalog" in out.stdout
    cab.wait_catalog(1)

    # sign: a delta, published as is on the delta topic
    delta = tmp_path / "delta.json"
    delta.write_text(json.dumps({"version": 2, "base_version": 1, "issued_at": "2026-11-29T08:00:00.000Z",
                                 "products": [DEMO_PRODUCTS[3]], "revoked": []}))
    signed = cli("sign", "--key", str(key), str(delta))
    assert signed.returncode == 0, signed.stderr
    assert signed.stdout.count("\n") == 1
    doc = json.loads(signed.stdout)
    assert signed.stdout.strip().encode() == protocol.canonical(doc)             # one line of canonical JSON
    protocol.verify_signed(doc, load_private_key(key).public_key())
    cab.platform.publish_raw("cab/v1/catalog/delta", signed.stdout.strip())
    cab.wait_catalog(2)

    # sign: a command made by hand, published raw on the cabinet's command topic
    issued = protocol.ts_from_epoch(time.time())
    command = {"id": str(uuid.uuid4()), "type": "set_lane", "issued_at": issued,
               "expires_at": protocol.ts_from_epoch(protocol.epoch_of(issued) + 60),
               "args": {"lane": "A1", "gtin": DEMO_PRODUCTS[0]["gtin"], "price_cents": 1590}}
    signed = cli("sign", "--key", str(key), "-", stdin=json.dumps(command))
    assert signed.returncode == 0, signed.stderr
    cab.platform.publish_raw("cmd", signed.stdout.strip())
    assert cab.platform.wait_reply(command["id"])["ok"] is True

    # command: a lane assigned, with VALUE read as JSON (price_cents=4800 is the integer)
    out = cli("command", "--broker", broker, "--key", str(key), "--cabinet", CAB, "set_lane", "lane=A2",
              f"gtin={DEMO_PRODUCTS[1]['gtin']}", "price_cents=4800")
    assert out.returncode == 0, (out.stdout, out.stderr)
    reply = json.loads(out.stdout)
    assert reply["ok"] is True and reply["result"] == {"lane": "A2", "gtin": DEMO_PRODUCTS[1]["gtin"],
                                                        "price_cents": 4800}

    # command: the door unlocked
    session = str(uuid.uuid4())
    out = cli("command", "--broker", broker, "--key", str(key), "--cabinet", CAB, "--wait", "20", "open_door",
              "door=1", f"session_id={session}", "shopper=alice", "auth=face")
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert json.loads(out.stdout)["ok"] is True
    wait_until(lambda: 1 in unlocks, 10, "the lock board told to unlock door 1")

    # command refused by the agent: exit 1, the reply printed
    out = cli("command", "--broker", broker, "--key", str(key), "--cabinet", CAB, "open_door", "door=9",
              f"session_id={uuid.uuid4()}", "shopper=bob", "auth=face")
    assert out.returncode == 1
    assert json.loads(out.stdout)["ok"] is False and "invalid_args" in json.loads(out.stdout)["error"]

    # the cabinet recorded what the tools did
    cab.wait_session_end(session, timeout=30)       # no one opened the door: session_timeout
    events = [r["body"].get("kind") for r in cab.platform.records_in_order() if r["type"] == "event"]
    assert events.count("catalog_installed") == 2 and "command_rejected" in events


def test_command_exit_codes_without_a_reply(cabinet: tuple[SimulatedCabinet, list[int]],
                                            key_and_public: tuple[Path, str]) -> None:
    cab, _ = cabinet
    key, _ = key_and_public
    assert cab.broker is not None
    nobody = cli("command", "--broker", cab.broker.url, "--key", str(key), "--cabinet", "CAB-NOBODY", "--wait", "1",
                 "status")
    assert nobody.returncode == 3 and "no reply" in nobody.stderr
    closed = cli("command", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--key", str(key), "--cabinet", CAB,
                 "status")
    assert closed.returncode == 3 and "cannot connect" in closed.stderr
    usage: list[Any] = [cli("command", "--broker", cab.broker.url, "--key", str(key), "--cabinet", CAB, "open_door",
                            "door"),
                        cli("command", "--broker", "http://x:1", "--key", str(key), "--cabinet", CAB, "status"),
                        cli("command", "--broker", cab.broker.url, "--key", str(key), "--cabinet", "bad id", "status")]
    assert [u.returncode for u in usage] == [2, 2, 2]

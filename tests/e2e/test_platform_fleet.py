"""``cabinet-platform fleet``, ``ingest`` and ``report`` as a pilot would run them: a small fleet with a
backlog and live sessions, one worker into SQLite, and the report agreeing with what the fleet says it
sent (platform.md, Commands)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.sim.broker import PrivateBroker
from helpers import wait_until

pytestmark = pytest.mark.timeout(120)


def test_fleet_ingest_report(broker: PrivateBroker, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/pilot.db"
    log = tmp_path / "ingest.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "agent.cli.platform", "ingest", "--broker", broker.url,
                                   "--db", db, "--log-level", "info"], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "subscribed to" in log.read_text(), 20, "the worker subscribed")
        run = subprocess.run(
            [sys.executable, "-m", "agent.cli.platform", "fleet", "--broker", broker.url, "--cabinets", "6",
             "--backlog", "25", "--sessions-per-min", "120", "--duration", "3", "--prefix", "PILOT",
             "--data-dir", str(tmp_path / "fleet"), "--json"], capture_output=True, text=True, timeout=90)
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert result["cabinets"] == 6 and result["undrained"] == 0
        assert result["appended"] > 0 and result["acked"] == 6 * 25 + result["appended"]
        assert result["latency_p99_s"] is not None and result["latency_p99_s"] < 5
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0
    report = subprocess.run([sys.executable, "-m", "agent.cli.platform", "report", "--db", db, "--json"],
                            capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    cabs = data["cabinets"]
    assert [c["cabinet"] for c in cabs] == [f"PILOT-{i:04d}" for i in range(1, 7)]
    assert sum(c["records"] for c in cabs) == result["acked"]
    assert all(c["chain_ok"] and c["records"] == c["acked_upto"] and c["online"] is False for c in cabs)
    assert sum(c["sales"] for c in cabs) > 0 and data["anomalies"] == []
    assert sum(p["cents"] for p in data["products"]) == sum(c["sales_cents"] for c in cabs)
    # the data dir was kept: a second run continues the same ledgers (persistent numbering)
    assert len(list((tmp_path / "fleet").glob("PILOT-*/ledger.db"))) == 6

"""A sale end to end with each MQTT version the agent speaks: the real daemon, the simulators and
the reference platform, through Mosquitto with MQTT 5 and 3.1.1, and through NATS's MQTT gateway
(3.1.1 only) (issue 9, acceptance 2)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import agent.sim.cabinet as cabinet_module
from agent.sim.cabinet import SimulatedCabinet, Timings
from agent.sim.nats import PrivateNats

pytestmark = pytest.mark.timeout(120)


def _nats(log_dir: Path | None = None, **_: Any) -> PrivateNats:
    return PrivateNats(log_dir=log_dir)


@pytest.fixture(params=["mosquitto/5", "mosquitto/3.1.1", "nats/3.1.1"])
def cabinet(request: pytest.FixtureRequest, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[SimulatedCabinet]:
    broker, version = request.param.split("/")
    if broker == "nats":
        monkeypatch.setattr(cabinet_module, "PrivateBroker", _nats)  # the harness makes its own broker
    cab = SimulatedCabinet(tmp_path / "cab", cabinet_id="CAB-VER", timings=Timings.fast(),
                           config_extra={"platform": {"mqtt_version": version}})
    try:
        cab.start()
        yield cab
    finally:
        cab.stop()


def test_a_sale_end_to_end(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    version = cab.config()["platform"]["mqtt_version"]
    sid = cab.shop(1, {"A1": 2, "A2": 1}, shopper="shopper-ver")
    sale = cab.wait_session_end(sid)
    assert sale["type"] == "sale"
    body = sale["body"]
    assert [(i["lane"], i["qty"]) for i in body["items"]] == [("A1", 2), ("A2", 1)]
    assert body["total_cents"] == 2 * 1590 + 4800 and body["flags"] == []
    assert cab.platform is not None and cab.platform.chain_errors == []
    cab.platform.wait_contiguous(max(cab.platform.records))
    assert f"with MQTT {version}" in cab.agent_log.read_text()

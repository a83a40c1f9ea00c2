"""The simulated cabinet every end-to-end test runs against (agent.sim.cabinet: the real
daemon as a subprocess, a private broker, the reference platform, simulators on ptys).

Each module names its cabinets by overriding the ``cabinet_id`` fixture, so that a broker log
or a topic says which module it came from. The waits and reads the modules share are in
``cabinet_helpers`` (a conftest is not imported by tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.sim.cabinet import SimulatedCabinet, Timings
from cabinet_helpers import CabinetFactory


@pytest.fixture
def cabinet_id() -> str:
    return "CAB-E2E"


@pytest.fixture
def make_cabinet(tmp_path: Path, cabinet_id: str) -> Iterator[CabinetFactory]:
    """``make_cabinet(name="cab", *, assign_lanes=True, publish_catalog=True, **kw)``: a started
    SimulatedCabinet in ``tmp_path / name`` (``kw`` go to its constructor; fast timings and the
    module's ``cabinet_id`` unless given). Every cabinet made is stopped after the test."""
    made: list[SimulatedCabinet] = []

    def make(name: str = "cab", *, assign_lanes: bool = True, publish_catalog: bool = True,
             **kw: Any) -> SimulatedCabinet:
        kw.setdefault("cabinet_id", cabinet_id)
        kw.setdefault("timings", Timings.fast())
        cab = SimulatedCabinet(tmp_path / name, **kw)
        made.append(cab)
        return cab.start(assign_lanes=assign_lanes, publish_catalog=publish_catalog)

    try:
        yield make
    finally:
        for cab in made:
            cab.stop()


@pytest.fixture
def cabinet(make_cabinet: CabinetFactory) -> SimulatedCabinet:
    """The demo cabinet: catalog version 1 (the four demo products, retained) and lanes A1..B2 assigned."""
    return make_cabinet()

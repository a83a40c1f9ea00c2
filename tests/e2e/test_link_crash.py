"""A command is not lost in a crash (issue 8, mqtt.md v1.1): the agent acknowledges an open_door's
PUBLISH only once its session is journaled, so a SIGKILL before that leaves the command in the
persistent session and the broker delivers it again to the restarted agent, which serves it.

The crash window is held open from outside: the test holds the ledger's write lock, so the
daemon's journal commit of the session waits (SQLite's busy timeout) while the command is only
in memory; the daemon is killed in that wait."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sim.cabinet import SimulatedCabinet, Timings
from drivers.lockboard.codec import UnlockRequest
from helpers import wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cabinet(tmp_path: Path) -> Iterator[SimulatedCabinet]:
    cab = SimulatedCabinet(tmp_path / "cab", cabinet_id="CAB-CRASH", timings=Timings.fast())
    try:
        cab.start()
        yield cab
    finally:
        cab.stop()


def test_an_open_door_in_memory_at_a_sigkill_is_served_after_the_restart(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    assert cab.platform is not None and cab.lockboard is not None
    frame = UnlockRequest(1, 1).to_bytes()
    ledger = sqlite3.connect(cab.workdir / "data" / "ledger.db", isolation_level=None, timeout=10)
    ledger.execute("BEGIN IMMEDIATE")  # the daemon's next commit waits for us
    sid = str(uuid.uuid4())
    cid = cab.platform.send_command("open_door", {"door": 1, "session_id": sid, "shopper": "crash", "auth": "qr"})
    wait_until(lambda: f"{cid} accepted" in cab.agent_log.read_text(), 10, "the command in the daemon's memory")
    since = len(cab.lockboard.received)
    cab.kill_agent()  # SIGKILL while the journal commit waits: nothing of the session is durable
    ledger.execute("ROLLBACK")
    ledger.close()
    assert cab.lockboard.wait_for_frame(frame.__eq__, 0.0, since=since) is None  # it never unlocked

    cab.start_agent()
    reply = cab.platform.wait_reply(cid, 20)  # the broker delivered it again: served now
    assert reply["ok"] is True, reply
    assert cab.lockboard.wait_for_frame(frame.__eq__, 10, since=since) is not None
    assert cab.lockboard.open_door(1)
    cab.wait_door_seen_open(1)
    cab.lockboard.close_door(1)
    end = cab.wait_session_end(sid)
    assert end["body"]["session_id"] == sid

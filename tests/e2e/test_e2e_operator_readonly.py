"""``cabinetctl sales``, ``verify`` and ``export`` as an operator who can only read data_dir,
daemon stopped (operations.md v1.1: they never write to the ledger).

Issue 8 regression: as such an operator all three failed with "attempt to write a readonly
database": SQLite's read-only mode still creates the WAL index (``ledger.db-shm``) beside a
ledger whose daemon shut down cleanly, and cannot in a directory the operator may not write.
The ledger is tried in the three states a stopped daemon leaves it in: shut down cleanly (no
``-wal``), killed (``-wal`` and ``-shm`` left, not writable by the operator), and killed with
the ``-shm`` lost (committed records only in the ``-wal``, and no index to read them with).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from operator_support import (
    Unprivileged,
    barrier,
    data_dir,
    find_unprivileged,
    make_cabinet,
    ok,
    reachable_dir,
    share_with_group,
    snapshot,
)

from agent.sim.cabinet import SimulatedCabinet

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def unprivileged() -> Unprivileged:
    return find_unprivileged()


@pytest.fixture
def workdir() -> Iterator[Path]:
    with reachable_dir() as path:
        yield path


@pytest.fixture
def cabinet(workdir: Path) -> Iterator[SimulatedCabinet]:
    yield from make_cabinet(workdir / "cab", auto_ack=False)


def _stop(cab: SimulatedCabinet, how: str) -> None:
    if how == "clean":
        assert cab.stop_agent() == 0
        return
    cab.kill_agent()
    if how == "killed_without_shm":
        (data_dir(cab) / "ledger.db-shm").unlink()


@pytest.mark.parametrize("how", ["clean", "killed", "killed_without_shm"])
def test_ledger_tools_work_for_an_operator_who_can_only_read_data_dir(
        cabinet: SimulatedCabinet, unprivileged: Unprivileged, workdir: Path, how: str) -> None:
    cab = cabinet
    ok(cab.ctl("service", "on"))
    ok(cab.ctl("service", "off"))
    last = barrier(cab)
    assert cab.platform is not None
    received = cab.platform.records_in_order()
    _stop(cab, how)
    ddir = data_dir(cab)
    wal = ddir / "ledger.db-wal"
    assert wal.exists() == (how != "clean"), sorted(p.name for p in ddir.iterdir())
    share_with_group(ddir, unprivileged.gid)
    before = snapshot(ddir)
    out_dir = workdir / "usb"
    out_dir.mkdir()
    out_dir.chmod(0o777)

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return unprivileged.run("-m", "agent.cli.cabinetctl", "--config", str(cab.config_path), *args)

    # (what the daemon stopped with is what the operator reads: nothing acked, so all is unsynced)
    sales = json.loads(ok(ctl("sales", "--json")).stdout)
    assert [r["seq"] for r in sales] == list(range(last, 0, -1))
    assert sales == list(reversed(received))
    r = ok(ctl("verify"))
    assert f"{last} records verified" in r.stdout
    out = out_dir / "export.jsonl"
    r = ok(ctl("export", "--out", str(out)))
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [ln["seq"] for ln in lines] == list(range(1, last + 1))
    assert all(ln["cabinet"] == "CAB-OP" for ln in lines)
    assert out.stat().st_uid == unprivileged.uid

    assert snapshot(ddir) == before, "a ledger tool wrote to data_dir"
    # and the operator really could not have: the check would pass for root
    r = unprivileged.run("-c", f"open({str(ddir / 'probe')!r}, 'w')")
    assert r.returncode != 0 and "Permission denied" in r.stderr


def test_an_operator_without_read_access_is_told_so(cabinet: SimulatedCabinet, unprivileged: Unprivileged) -> None:
    cab = cabinet
    assert cab.stop_agent() == 0
    ddir = data_dir(cab)
    share_with_group(ddir, unprivileged.gid)
    (ddir / "ledger.db").chmod(0o600)
    r = unprivileged.run("-m", "agent.cli.cabinetctl", "--config", str(cab.config_path), "verify")
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert "permission denied" in r.stderr.lower() and "ledger.db" in r.stderr

"""Fixtures for the platform-side tests: a PostgreSQL database of their own, SQLite files, records.

``pg_dsn`` creates a fresh database on the machine's PostgreSQL service (127.0.0.1:5432, trust
auth; ``CABINET_TEST_PG_ADMIN`` overrides the admin DSN) and drops it afterwards. A service that
is down is started first (``pg_ctlcluster ... start``, as the machine notes say); the test is
skipped, with the reason, only where no PostgreSQL can run at all.

Import the fixtures into a test module: ``from platform_helpers import db_dsn, pg_dsn  # noqa: F401``.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.store.ledger import Ledger

ADMIN_DSN = os.environ.get("CABINET_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
_START_WAIT_S = 30.0


def _connect_admin() -> Any:
    import psycopg

    return psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=5)


def _start_service() -> str | None:
    """Start the local cluster; returns why it cannot be started, or None."""
    tool = shutil.which("pg_ctlcluster")
    versions = sorted(os.path.basename(p) for p in glob.glob("/etc/postgresql/*"))
    if tool is None or not versions:
        return "PostgreSQL is not installed here (no pg_ctlcluster or /etc/postgresql)"
    proc = subprocess.run([tool, "--skip-systemctl-redirect", versions[-1], "main", "start"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode not in (0, 2):   # 2: already running
        return f"pg_ctlcluster start failed: {proc.stderr.strip() or proc.stdout.strip()}"
    return None


def postgres_admin() -> Any:
    """An autocommit admin connection, starting the service if it is down; pytest.skip if impossible."""
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'psycopg[binary]')")
    try:
        return _connect_admin()
    except psycopg.OperationalError as first:
        why = _start_service()
        if why is not None:
            pytest.skip(f"no PostgreSQL at {ADMIN_DSN} ({first}) and {why}")
        deadline = time.monotonic() + _START_WAIT_S
        while True:
            try:
                return _connect_admin()
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    pytest.skip(f"PostgreSQL was started but does not accept connections at {ADMIN_DSN}: {exc}")
                time.sleep(0.2)


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """A new, empty PostgreSQL database for this test (dropped afterwards)."""
    name = f"cab_test_{uuid.uuid4().hex[:12]}"
    admin = postgres_admin()
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        base = ADMIN_DSN.rsplit("/", 1)[0]
        yield f"{base}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_dsn(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test runs on both backends: a SQLite file, and a PostgreSQL database of its own."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ingest.db"
    return str(request.getfixturevalue("pg_dsn"))


def ledger_batch(ledger: Ledger, first: int, last: int) -> bytes:
    """The records payload the agent sends for seqs first..last (``Ledger.batch_from``)."""
    from agent.protocol import MAX_BATCH_BYTES

    records, upto = ledger.batch_from(first, last - first + 1, MAX_BATCH_BYTES)
    assert upto == last, (first, last, upto)
    return b'{"cabinet":"%s","records":[%s]}' % (ledger_cabinet(ledger).encode(), ",".join(records).encode())


def ledger_cabinet(ledger: Ledger) -> str:
    return ledger.path.parent.name


def make_ledger(root: Path, cabinet: str, n: int) -> Ledger:
    """A real agent ledger at ``root/cabinet/ledger.db`` with ``n`` sale and event records."""
    led = Ledger(root / cabinet / "ledger.db")
    with led.transaction() as tx:
        for i in range(n):
            at = f"2026-11-29T08:{i // 60 % 60:02d}:{i % 60:02d}.000Z"
            if i % 4 == 3:
                tx.append("event", {"kind": "uncertified_scan", "code": "6971234500019", "gtin": "06971234500019",
                                    "symbology": "ean13", "context": "idle", "reason": "unknown"}, at)
            else:
                flags = ["weight_mismatch"] if i % 5 == 4 else []
                tx.append("sale", {"sale_id": str(uuid.uuid4()), "session_id": str(uuid.uuid4()), "door": 1,
                                   "shopper": f"s{i}", "opened_at": at, "closed_at": at,
                                   "items": [{"gtin": "06901234560016", "name": "Dried shiitake 250 g", "lane": "A1",
                                              "qty": 1 + i % 2, "unit_price_cents": 1590, "cert_id": "PA-1",
                                              "weight_g": -250.0, "flags": flags}],
                                   "total_cents": 1590 * (1 + i % 2), "flags": flags}, at)
    return led

#!/usr/bin/env python3
"""Benchmark: draining an offline backlog of ledger records to the platform.

A ledger with N records (default 100,000: weeks offline) is handed to the real agent
(subprocess) while the reference platform withholds acks; then the platform acks and we
measure records/s acknowledged until the last one, and the agent's RSS all along (peak and
steady). Next to it, the same run's floor: reading and marking the same rows in SQLite
(select 100, update 100, commit) and publishing pre-built 100-record batches with paho QoS 1.

Usage: python scripts/bench_backlog.py [--records 100000]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.protocol import ts_from_epoch  # noqa: E402
from agent.sim.cabinet import SimulatedCabinet, Timings  # noqa: E402
from agent.store.ledger import Ledger, wire_json  # noqa: E402

MiB = 1024 * 1024


def fill_ledger(path: Path, n: int) -> None:
    """N realistic records (sales and events), committed in chunks as weeks offline would."""
    led = Ledger(path)
    t = time.time() - 14 * 86400
    chunk = 5000
    for start in range(0, n, chunk):
        with led.transaction() as tx:
            for i in range(start, min(n, start + chunk)):
                t += 12
                if i % 3:
                    tx.append("event", {"kind": "door_forced", "door": 1 + i % 2}, ts_from_epoch(t))
                else:
                    tx.append("sale", {
                        "sale_id": str(uuid.uuid4()), "session_id": str(uuid.uuid4()), "door": 1,
                        "shopper": f"s{i}", "opened_at": ts_from_epoch(t - 20), "closed_at": ts_from_epoch(t - 2),
                        "items": [{"gtin": "06901234560016", "name": "Dried shiitake 250 g", "lane": "A1",
                                   "qty": 2, "unit_price_cents": 1590, "cert_id": "PA-2026-000123",
                                   "weight_g": -500.4, "flags": []}],
                        "total_cents": 3180, "flags": []}, ts_from_epoch(t))
    led.close()


def sqlite_floor(src: Path, work: Path, n: int) -> float:
    """Rows/s for: select 100 rows by seq, mark them synced, commit."""
    db = work / "floor.db"
    shutil.copy(src, db)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("ALTER TABLE records ADD COLUMN synced INTEGER NOT NULL DEFAULT 0")
    t0 = time.perf_counter()
    seq = 0
    while True:
        rows = conn.execute("SELECT seq, type, at, prev, hash, body FROM records WHERE seq > ? ORDER BY seq LIMIT 100",
                            (seq,)).fetchall()
        if not rows:
            break
        conn.execute("BEGIN")
        conn.executemany("UPDATE records SET synced = 1 WHERE seq = ?", [(r[0],) for r in rows])
        conn.execute("COMMIT")
        seq = rows[-1][0]
    elapsed = time.perf_counter() - t0
    conn.close()
    return n / elapsed


def publish_floor(src: Path, host: str, port: int, n: int) -> float:
    """Records/s for publishing pre-built 100-record batches with paho QoS 1 (all PUBACKs back)."""
    conn = sqlite3.connect(src)
    payloads = []
    rows = conn.execute("SELECT seq, type, at, prev, hash, body FROM records ORDER BY seq").fetchall()
    conn.close()
    for i in range(0, len(rows), 100):
        recs = ",".join(wire_json(*r) for r in rows[i:i + 100])
        payloads.append(('{"cabinet":"CAB-FLOOR","records":[' + recs + "]}").encode())
    del rows
    done = threading.Event()
    acked = [0]

    def on_publish(*_a: object) -> None:
        acked[0] += 1
        if acked[0] == len(payloads):
            done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-floor")
    c.max_inflight_messages_set(200)
    c.max_queued_messages_set(0)
    c.on_publish = on_publish
    c.connect(host, port)
    c.loop_start()
    t0 = time.perf_counter()
    for p in payloads:
        c.publish("cab/v1/CAB-FLOOR/records", p, qos=1)
    done.wait(300)
    elapsed = time.perf_counter() - t0
    c.loop_stop()
    c.disconnect()
    return n / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--records", type=int, default=100_000)
    args = ap.parse_args()
    n = args.records
    with tempfile.TemporaryDirectory(prefix="bench-backlog-") as tmp:
        work = Path(tmp)
        cab = SimulatedCabinet(work / "cab", cabinet_id="CAB-BENCH", timings=Timings(ack_timeout_s=30),
                               log_level="warning", auto_ack=False)
        print(f"filling a ledger with {n} records ...", flush=True)
        (work / "cab" / "data").mkdir(parents=True)
        t0 = time.perf_counter()
        fill_ledger(work / "cab" / "data" / "ledger.db", n)
        print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)
        pristine = work / "pristine.db"
        src = Ledger(work / "cab" / "data" / "ledger.db", readonly=True)
        src.close()
        shutil.copy(work / "cab" / "data" / "ledger.db", pristine)
        cab.start(assign_lanes=False)
        try:
            assert cab.platform and cab.agent and cab.broker
            platform = cab.platform
            proc = psutil.Process(cab.agent.pid)
            rss_start = proc.memory_info().rss
            total = n + 1  # + agent_started
            # the platform withholds acks: the agent sends its window and waits
            platform.wait_for(lambda: len(platform.records) >= 1000, 30, "first batches while acks withheld")
            samples: list[int] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.05):
                    try:
                        samples.append(proc.memory_info().rss)
                    except psutil.Error:
                        return

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            held = platform.contiguous_upto   # already delivered while acks were withheld
            t0 = time.perf_counter()
            platform.set_auto_ack(True)
            platform.wait_for(lambda: bool(platform.acks_sent) and platform.acks_sent[-1] >= total,
                                  600, "every record acknowledged")
            elapsed = time.perf_counter() - t0
            stop.set()
            sampler.join()
            rate = (total - held) / elapsed  # only what had to travel during the drain
            steady = proc.memory_info().rss
            peak = max(samples + [steady])
            dups = cab.platform.duplicates
            errors = len(cab.platform.chain_errors)
            floor_sql = sqlite_floor(pristine, work, n)
            floor_pub = publish_floor(pristine, cab.broker.host, cab.broker.port, n)
        finally:
            cab.stop()
            notes = [ln for ln in cab.agent_log.read_text(errors="replace").splitlines()
                     if "resending" in ln or "disconnected" in ln or "ERROR" in ln]
    for ln in notes[:10]:
        print("  agent log:", ln)
    floor = 1.0 / (1.0 / floor_sql + 1.0 / floor_pub)
    print(f"backlog drain of {total} records (acks withheld, then given)")
    print(f"  acknowledged        {rate:10.0f} records/s  ({total - held} records sent and acked in {elapsed:.2f} s,"
          f" {held} were already held; {dups} duplicates, {errors} chain errors)")
    print(f"  floor: SQLite select+mark {floor_sql:10.0f} rows/s, paho QoS 1 publish {floor_pub:10.0f} records/s")
    print(f"  floor combined      {floor:10.0f} records/s")
    print(f"  ratio to floor      {rate / floor:10.1%}   (goal >= 30%: {'met' if rate / floor >= 0.3 else 'NOT met'})")
    print(f"  goal >= 20,000/s    {'met' if rate >= 20000 else 'NOT met'}")
    print(f"  agent RSS: at start {rss_start / MiB:.1f} MiB, peak during drain {peak / MiB:.1f} MiB,"
          f" after {steady / MiB:.1f} MiB (goal steady <= 100 MiB: {'met' if steady <= 100 * MiB else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

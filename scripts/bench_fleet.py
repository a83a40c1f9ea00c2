#!/usr/bin/env python3
"""Benchmark: a fleet of cabinets into the reference ingest on PostgreSQL (issue 11, acceptance 2).

1. Drain: N cabinets (default 1,000; the agent's own Ledger, Syncer and MqttLink, in a few
   processes), each holding a backlog of B records (default 200), connect to one private
   Mosquitto and then all start sending at once; W ingest workers (default 2, one shared
   subscription group) store them into a fresh PostgreSQL database. Measured: records/s
   stored and acked (from the go to the last cabinet's last ack), CPU per 1,000 records of
   the workers, PostgreSQL, the broker and the fleet; next to the same run's floor: the
   same rows written by one COPY, and the broker's raw QoS 1 publish rate of the same
   batches. Checked: 0 lost, 0 stored twice, every cabinet acked to its last seq. Also printed:
   the machine's load and how much of the CPU was other processes' work, the fleet's idle CPU
   (its links poll), the CPU bound those figures imply, and the ingest alone: the same batches
   published by one client to fresh workers on a broker and database of their own, no fleet.
2. Steady state: every cabinet at R sessions a minute (default 1) and a status every 60 s for
   S seconds (default 120): the latency from a record's append to the ack covering it
   (p50, p99, max, how many above 5 s).
3. Broker restart (sessions go on meanwhile, and stop at the restart so that "drained" has
   an end): time until every cabinet is online and drained, and the TCP connection attempts
   per second the jittered backoff produced (counted in the fleet processes, refused ones
   included; and the connections the broker accepted per second, from its log).

Usage: python scripts/bench_fleet.py [--cabinets 1000] [--backlog 200] [--workers 2]
       [--steady 120] [--outage 0] [--no-restart] [--no-alone] [--json-out FILE]
       [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.platform import fleet, keys  # noqa: E402
from agent.sim.broker import PrivateBroker  # noqa: E402
from agent.store.ledger import wire_json  # noqa: E402

ADMIN_DSN = os.environ.get("CABINET_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (every process, ours and everybody else's)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)


def postgres_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in ("postgres", "postmaster")]


class Workers:
    def __init__(self, n: int, broker: PrivateBroker, dsn: str, key: Path, work: Path) -> None:
        self.logs = [work / f"worker-{i}.log" for i in range(n)]
        self.procs = []
        for lg in self.logs:
            with open(lg, "ab") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "agent.cli.platform", "ingest", "--broker", broker.url, "--db", dsn,
                     "--key", str(key), "--log-level", "info"], stdout=out, stderr=subprocess.STDOUT))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def wait_subscribed(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not all("subscribed to" in lg.read_text(errors="replace") for lg in self.logs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError("ingest workers did not subscribe: "
                                   + " | ".join(lg.read_text() for lg in self.logs))
            time.sleep(0.1)

    def stop(self) -> list[str]:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        lines = [next((ln for ln in reversed(lg.read_text().splitlines()) if "stopped:" in ln), "?")
                 for lg in self.logs]
        return [ln.split("stopped: ")[-1] for ln in lines]


def one(conn: psycopg.Connection[tuple[Any, ...]], sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...]:
    """The one row a query that always has one returns."""
    row = conn.execute(sql, params).fetchone()
    assert row is not None, sql
    return row


def wait_for(pred: Any, timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(every)


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


# -- floors -------------------------------------------------------------------------------------------
def copy_floor(dsn: str) -> tuple[float, int]:
    """Rows/s of one COPY of the stored rows into an empty table with the same primary key."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT cabinet, seq, type, at, prev, hash, body::text, received_at"
                            " FROM records").fetchall()
        conn.execute("DROP TABLE IF EXISTS floor_records")
        conn.execute("CREATE TABLE floor_records (LIKE records INCLUDING ALL)")
        t0 = time.perf_counter()
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy("COPY floor_records (cabinet, seq, type, at, prev, hash, body, received_at)"
                          " FROM STDIN") as cp:
                for r in rows:
                    cp.write_row(r)
        elapsed = time.perf_counter() - t0
        conn.execute("DROP TABLE floor_records")
    return len(rows) / elapsed, len(rows)


def stored_batches(dsn: str, batch: int = 100) -> list[tuple[str, bytes]]:
    """The stored rows as the cabinets sent them: (cabinet, records payload) in batches of ``batch``,
    every cabinet's first batch, then every cabinet's second, ... (the order of a fleet's drain)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT cabinet, seq, type, at, prev, hash, body::text FROM records ORDER BY cabinet, seq"
                            ).fetchall()
    by_cab: dict[str, list[str]] = collections.defaultdict(list)
    for cabinet, seq, type_, at, prev, hash_, body in rows:
        by_cab[cabinet].append(wire_json(seq, type_, at, prev, hash_, body))
    out: list[tuple[int, str, bytes]] = []
    for cabinet, recs in by_cab.items():
        for i in range(0, len(recs), batch):
            out.append((i, cabinet, f'{{"cabinet":"{cabinet}","records":[{",".join(recs[i:i + batch])}]}}'.encode()))
    out.sort(key=lambda x: x[0])
    return [(cabinet, payload) for _, cabinet, payload in out]


def publish_all(broker: PrivateBroker, payloads: list[tuple[str, bytes]], client_id: str) -> tuple[mqtt.Client, float]:
    """Publish (topic, payload) QoS 1 with one paho client; returns it (still connected) and the seconds
    until every PUBACK was in."""
    done = threading.Event()
    acked = [0]

    def on_publish(*_a: Any) -> None:
        acked[0] += 1
        if acked[0] == len(payloads):
            done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.on_publish = on_publish
    c.connect(broker.host, broker.port)
    c.loop_start()
    t0 = time.perf_counter()
    for topic, p in payloads:
        c.publish(topic, p, qos=1)
    done.wait(600)
    return c, time.perf_counter() - t0


def ingest_alone(dsn: str, n_workers: int, key: Path, work: Path) -> dict[str, Any]:
    """The ingest side without the fleet on the machine: the same batches, published by one client on a
    broker of their own, into a database of their own, through ``n_workers`` fresh workers."""
    payloads = [(f"cab/v1/{cabinet}/records", p) for cabinet, p in stored_batches(dsn)]
    total = sum(p.count(b'{"seq":') for _, p in payloads)
    cabinets = len({t for t, _ in payloads})
    db = f"cab_bench_alone_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db}"')
    dsn2 = ADMIN_DSN.rsplit("/", 1)[0] + "/" + db
    (work / "alone").mkdir(exist_ok=True)
    broker = PrivateBroker(log_dir=work / "alone")
    workers = Workers(n_workers, broker, dsn2, key, work / "alone")
    try:
        workers.wait_subscribed()
        pg = postgres_pids()
        pids = {"workers": workers.pids, "postgres": pg, "broker": [broker.pid or 0]}
        cpu0 = {k: cpu_of(v) for k, v in pids.items()}
        t0 = time.monotonic()
        client, _ = publish_all(broker, payloads, "bench-alone")
        with psycopg.connect(dsn2) as conn:
            wait_for(lambda: one(conn, "SELECT count(*) FROM cabinets WHERE acked_upto * %s = %s",
                                 (cabinets, total))[0] == cabinets,
                     600, "the ingest alone stored and acked everything", every=0.1)
        elapsed = time.monotonic() - t0
        cpu1 = {k: cpu_of(v) for k, v in pids.items()}
        client.loop_stop()
        client.disconnect()
        us = {k: round((cpu1[k] - cpu0[k]) / total * 1e6, 1) for k in pids}
        return {"records": total, "seconds": round(elapsed, 2), "records_per_s": round(total / elapsed),
                "cpu_us_per_record": us, "load": os.getloadavg()}
    finally:
        workers.stop()
        broker.close()
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def publish_floor(dsn: str, broker: PrivateBroker, batch: int = 100) -> float:
    """Records/s of publishing the same rows, pre-built in batches of ``batch``, QoS 1, one paho client."""
    batches = stored_batches(dsn, batch)
    records = sum(p.count(b'{"seq":') for _, p in batches)
    client, elapsed = publish_all(broker, [(f"bench/floor/{cabinet}/records", p) for cabinet, p in batches],
                                  "bench-floor")
    client.loop_stop()
    client.disconnect()
    return records / elapsed


def broker_connects(broker: PrivateBroker, since: float) -> dict[int, int]:
    """Connections the broker accepted per second (its log has second resolution), from ``since``."""
    per: dict[int, int] = collections.Counter()
    pat = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d): New client connected from .* as cab-")
    for line in broker.log_path.read_text(errors="replace").splitlines():
        m = pat.match(line)
        if m:
            t = dt.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").timestamp()
            if t >= int(since):
                per[int(t)] += 1
    return dict(per)


# -- the run ------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cabinets", type=int, default=1000)
    ap.add_argument("--backlog", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steady", type=float, default=120.0, help="seconds of steady state (0 skips it)")
    ap.add_argument("--sessions-per-min", type=float, default=1.0)
    ap.add_argument("--outage", type=float, default=0.0, help="seconds the broker stays down in the restart")
    ap.add_argument("--no-restart", action="store_true")
    ap.add_argument("--no-alone", action="store_true", help="skip the ingest alone (the same batches, no fleet)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--keep-logs", type=Path, help="copy the broker's and the workers' logs into this folder")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))   # mosquitto inherits it: 1,000 clients and more
    results: dict[str, Any] = {"cabinets": a.cabinets, "backlog": a.backlog, "workers": a.workers,
                               "load_before": os.getloadavg(), "cpus": os.cpu_count()}
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    db_name = f"cab_bench_{uuid.uuid4().hex[:10]}"
    admin = psycopg.connect(ADMIN_DSN, autocommit=True)
    admin.execute(f'CREATE DATABASE "{db_name}"')
    dsn = ADMIN_DSN.rsplit("/", 1)[0] + "/" + db_name
    broker = PrivateBroker(log_dir=work)
    key_path = work / "platform.pem"
    key = keys.write_new_key(key_path)
    workers = Workers(a.workers, broker, dsn, key_path, work)
    fl: fleet.Fleet | None = None
    total = a.cabinets * a.backlog
    try:
        workers.wait_subscribed()
        log(f"broker {broker.url} (pid {broker.pid}), {a.workers} ingest workers, database {db_name}; {load()}")
        spec = fleet.FleetSpec(brokers=(broker.url,), cabinet_ids=fleet.cabinet_ids(a.cabinets),
                               data_dir=str(work / "fleet"), public_key=keys.public_key_b64(key), sessions_per_min=0,
                               backlog=a.backlog, hold=True, count_connects=True)
        t0 = time.monotonic()
        fl = fleet.Fleet(spec)
        fl.wait_ready(600)
        log(f"fleet of {a.cabinets} in {len(fl.pids)} processes ready (backlogs written)"
            f" in {time.monotonic() - t0:.1f} s")
        t0 = time.monotonic()
        wait_for(lambda: fl.stats().connected == a.cabinets, 300, "every cabinet connected", every=0.5)
        results["connect_s"] = round(time.monotonic() - t0, 2)
        log(f"all {a.cabinets} connected in {results['connect_s']} s; {load()}")
        time.sleep(2.0)   # the statuses of the connect storm are through
        fl.stats()        # drop the connect attempts so far

        # -- 1. the drain --------------------------------------------------------------------------
        pg = postgres_pids()

        def cpu_now() -> dict[str, float]:
            return {"workers": cpu_of(workers.pids), "postgres": cpu_of(pg), "broker": cpu_of([broker.pid or 0]),
                    "fleet": cpu_of(fl.pids), "machine": machine_busy()}

        # what the parts cost doing nothing: 1,000 idle cabinets (their links poll), the others' load
        idle0, t_idle = cpu_now(), time.monotonic()
        time.sleep(3.0)
        idle1, idle_s = cpu_now(), time.monotonic() - t_idle
        idle_cores = {k: (idle1[k] - idle0[k]) / idle_s for k in idle0}
        cores = os.cpu_count() or 1
        log(f"idle, before the go: fleet {idle_cores['fleet']:.0%} of a core, machine {idle_cores['machine']:.0%}"
            f" of a core (of {cores}); {load()}")
        cpu0 = cpu_now()
        wall0, mono0 = time.time(), time.monotonic()
        fl.go()
        # drained_at is stamped by the fleet processes themselves: polling rarely costs nothing in accuracy
        st = wait_for(lambda: (s := fl.stats()).drained_at is not None and s, 900, "the backlog drained", every=0.25)
        drain_s = st.drained_at - wall0
        cpu1 = cpu_now()
        polled_s = time.monotonic() - mono0
        rate = total / drain_s
        spent = {k: cpu1[k] - cpu0[k] for k in cpu0}
        ours = sum(v for k, v in spent.items() if k != "machine")
        others = max(0.0, spent["machine"] - ours)
        cpu_per_k = {k: round(spent[k] / total * 1000 * 1000, 1) for k in cpu0 if k != "machine"}   # ms per 1,000
        per_record_us = sum(cpu_per_k.values())              # µs of CPU per record, every part of the run
        ingest_us = cpu_per_k["workers"] + cpu_per_k["postgres"] + cpu_per_k["broker"]
        fleet_idle_us = idle_cores["fleet"] * polled_s / total * 1e6
        with psycopg.connect(dsn) as conn:
            stored, distinct = one(conn, "SELECT count(*), count(DISTINCT (cabinet, seq)) FROM records")
            acked_ok = one(conn, "SELECT count(*) FROM cabinets WHERE acked_upto = %s", (a.backlog,))[0]
            anomalies = one(conn, "SELECT count(*) FROM anomalies")[0]
        log(f"drain: {total} records in {drain_s:.2f} s = {rate:,.0f} records/s stored and acked; "
            f"published {st.published} (resent {st.published - total}); stored {stored} ({distinct} distinct),"
            f" {acked_ok} cabinets acked to {a.backlog}, {anomalies} anomalies; {load()}")
        log(f"CPU ms per 1,000 records: {cpu_per_k}; total {per_record_us:.1f} (the fleet's idle polling alone"
            f" {fleet_idle_us:.1f}); the machine was busy {spent['machine'] / polled_s:.2f} of {cores} cores, of which"
            f" others' work (not this run) {others / polled_s:.2f}")
        log(f"CPU bound: {cores} cores carry at most {cores / per_record_us * 1e6:,.0f} records/s at"
            f" {per_record_us:.0f} us a record; the ingest side alone (workers + PostgreSQL + broker,"
            f" {ingest_us:.0f} us) at most {cores / ingest_us * 1e6:,.0f} records/s; a record costs its worker"
            f" {cpu_per_k['workers']:.0f} us: {a.workers} workers on cores of their own carry"
            f" {a.workers / cpu_per_k['workers'] * 1e6:,.0f} records/s")
        copy_rate, copy_rows = copy_floor(dsn)
        pub_rate = publish_floor(dsn, broker)
        floor = 1.0 / (1.0 / copy_rate + 1.0 / pub_rate)
        log(f"floor: one COPY of the {copy_rows} rows {copy_rate:,.0f} rows/s; raw QoS 1 publish of the same batches"
            f" {pub_rate:,.0f} records/s; combined {floor:,.0f} records/s; ingest = {rate / floor:.1%} of it")
        alone: dict[str, Any] | None = None
        if not a.no_alone:
            alone = ingest_alone(dsn, a.workers, key_path, work)
            au = alone["cpu_us_per_record"]
            log(f"the ingest alone (the same batches from one publisher, no fleet on the machine): {alone['records']}"
                f" records in {alone['seconds']} s = {alone['records_per_s']:,} records/s; CPU us a record: {au},"
                f" total {sum(au.values()):.0f} = at most {cores / sum(au.values()) * 1e6:,.0f} records/s on {cores}"
                f" cores; {load()}")
        results["drain"] = {"records": total, "seconds": round(drain_s, 3), "records_per_s": round(rate),
                            "published": st.published, "stored": stored, "distinct": distinct,
                            "lost": total - distinct, "stored_twice": stored - distinct,
                            "cabinets_acked_to_last": acked_ok, "anomalies": anomalies,
                            "cpu_ms_per_1000": cpu_per_k, "cpu_us_per_record_total": round(per_record_us, 1),
                            "fleet_idle_us_per_record": round(fleet_idle_us, 1),
                            "idle_cores_before": {k: round(v, 3) for k, v in idle_cores.items()},
                            "machine_busy_cores": round(spent["machine"] / polled_s, 2),
                            "others_busy_cores": round(others / polled_s, 2),
                            "cpu_bound_records_per_s": round(cores / per_record_us * 1e6),
                            "ingest_side_bound_records_per_s": round(cores / ingest_us * 1e6),
                            "floor_copy_rows_per_s": round(copy_rate),
                            "floor_publish_records_per_s": round(pub_rate), "floor_combined": round(floor),
                            "ratio_to_floor": round(rate / floor, 3),
                            "goal_25000": rate >= 25000, "goal_30pct": rate / floor >= 0.30,
                            "ingest_alone": alone, "load": os.getloadavg()}

        # -- 2. steady state -------------------------------------------------------------------------
        if a.steady > 0:
            latencies: list[float] = []
            cpu0 = {"workers": cpu_of(workers.pids), "postgres": cpu_of(pg), "broker": cpu_of([broker.pid or 0]),
                    "fleet": cpu_of(fl.pids)}
            fl.set_rate(a.sessions_per_min)
            t0 = time.monotonic()
            while time.monotonic() - t0 < a.steady:
                time.sleep(5)
                s2 = fl.stats()
                latencies += s2.latencies
                log(f"steady {time.monotonic() - t0:5.0f} s: {len(latencies)} records acked, online {s2.connected},"
                    f" waiting {s2.undrained}")
            fl.set_rate(0)
            s2 = wait_for(lambda: (s := fl.stats()).undrained == 0 and s, 120, "steady state drained", every=0.2)
            latencies += s2.latencies
            elapsed = time.monotonic() - t0
            cpu1 = {"workers": cpu_of(workers.pids), "postgres": cpu_of(pg), "broker": cpu_of([broker.pid or 0]),
                    "fleet": cpu_of(fl.pids)}
            latencies.sort()
            over = sum(1 for x in latencies if x > 5.0)
            results["steady"] = {"seconds": round(elapsed, 1), "records": len(latencies),
                                 "p50_s": round(pct(latencies, 0.5), 4), "p99_s": round(pct(latencies, 0.99), 4),
                                 "max_s": round(latencies[-1], 4) if latencies else None, "over_5s": over,
                                 "cpu_percent": {k: round((cpu1[k] - cpu0[k]) / elapsed * 100, 1) for k in cpu0},
                                 "load": os.getloadavg()}
            log(f"steady: {len(latencies)} records, ack latency p50 {pct(latencies, 0.5) * 1000:.1f} ms,"
                f" p99 {pct(latencies, 0.99) * 1000:.1f} ms, max {latencies[-1] * 1000 if latencies else 0:.1f} ms,"
                f" {over} above 5 s; CPU % {results['steady']['cpu_percent']}; {load()}")

        # -- 3. broker restart -------------------------------------------------------------------------
        if not a.no_restart:
            fl.set_rate(max(a.sessions_per_min, 1.0))
            time.sleep(1.0)
            fl.stats()   # drop attempts so far
            t_stop = time.time()
            broker.stop()
            time.sleep(a.outage)
            broker.start()
            t_up = time.time()
            fl.set_rate(0)
            attempts: list[float] = []
            t_online = None
            while True:
                s3 = fl.stats()
                attempts += s3.connect_attempts
                if t_online is None and s3.connected == a.cabinets:
                    t_online = time.time()
                if t_online is not None and s3.undrained == 0:
                    break
                if time.time() - t_up > 300:
                    raise TimeoutError("not all online and drained 300 s after the restart")
                time.sleep(0.1)
            t_drained = time.time()
            time.sleep(1.0)
            attempts += fl.stats().connect_attempts
            per_s = collections.Counter(int(t - t_stop) for t in attempts)
            peak_s, peak = max(per_s.items(), key=lambda kv: kv[1]) if per_s else (0, 0)
            accepted = broker_connects(broker, t_up - 1)
            acc_peak = max(accepted.values()) if accepted else 0
            results["restart"] = {
                "outage_s": round(t_up - t_stop, 2), "online_s": round((t_online or t_drained) - t_up, 2),
                "drained_s": round(t_drained - t_up, 2), "attempts": len(attempts),
                "attempts_per_s": [per_s.get(i, 0) for i in range(0, max(per_s) + 1)] if per_s else [],
                "peak_attempts_in_a_second": peak, "peak_second": peak_s,
                "peak_share_of_fleet": round(peak / a.cabinets, 3),
                "broker_accepted_per_s": [accepted[k] for k in sorted(accepted)],
                "broker_peak_accepted_share": round(acc_peak / a.cabinets, 3), "load": os.getloadavg()}
            log(f"restart: broker down {t_up - t_stop:.2f} s; every cabinet online {results['restart']['online_s']} s"
                f" and drained {results['restart']['drained_s']} s after it was back; {len(attempts)} connect"
                f" attempts, per second from the stop: {results['restart']['attempts_per_s']}; peak second holds"
                f" {peak} = {peak / a.cabinets:.0%} of the fleet (goal <= 10%); broker accepted per second:"
                f" {results['restart']['broker_accepted_per_s']}")
    finally:
        if fl is not None:
            fl.stop()
        results["worker_stats"] = workers.stop()
        broker.close()
        admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        admin.close()
        if a.keep_logs:
            a.keep_logs.mkdir(parents=True, exist_ok=True)
            for lg in work.glob("*.log"):
                shutil.copy(lg, a.keep_logs / lg.name)
        shutil.rmtree(work, ignore_errors=True)
    results["load_after"] = os.getloadavg()
    for line in results["worker_stats"]:
        log(f"worker: {line}")
    d = results.get("drain", {})
    if d:
        log(f"GOALS: >= 25,000 records/s: {'met' if d['goal_25000'] else 'NOT met'} ({d['records_per_s']:,});"
            f" >= 30 % of the floor: {'met' if d['goal_30pct'] else 'NOT met'} ({d['ratio_to_floor']:.1%});"
            f" lost {d['lost']}, stored twice {d['stored_twice']}")
    if a.json_out:
        a.json_out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

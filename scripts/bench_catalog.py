#!/usr/bin/env python3
"""Benchmark of the catalog store at national scale: install time, peak RSS, lookup latency.

    .venv/bin/python scripts/bench_catalog.py                 # 1,000,000 products
    .venv/bin/python scripts/bench_catalog.py --products 50000 --reinstall

1. Generates a signed snapshot with realistic products (valid GTIN check digits, Chinese and
   English names, certificate dates around today) without ever holding it in memory: the
   canonical bytes are streamed to a file, signed through an mmap, and the final document is
   that file with ``"sig"`` spliced in where canonical order puts it.
2. Installs it with ``CatalogStore.install_file`` in a FRESH subprocess and reports the elapsed
   time and that subprocess's peak RSS, as the child reads it itself: VmHWM from
   /proc/self/status, and ru_maxrss. ``getrusage(RUSAGE_CHILDREN)`` in this process would not do:
   it is the maximum over all reaped children, the generators included, and a child's ru_maxrss
   starts from the image of the process that spawned it (vfork + exec), which is why this
   process generates in children too and stays small. ``--reinstall`` then installs a second
   snapshot over the first in another fresh subprocess (the steady state of a cabinet).
3. Times 100k lookups (hits, misses, bad check digits, EAN-13 forms, revoked codes).

Goals: install <= 30 s, peak RSS <= 300 MB, median lookup <= 50 µs.

``--mqtt`` (issue 9) compares the catalog over MQTT with the file path, in one run: a signed
snapshot (default 300,000 products, ~90 MB) is published to a private Mosquitto and received by
a fresh process running what the daemon runs for it (MqttLink -> CatalogWorker -> CatalogStore),
and installed from a file by another fresh process; then a forged document of the same size is
sent over MQTT. Goals: MQTT peak RSS <= 1.5 x the payload + 100 MiB, MQTT time <= 1.5 x the file
path's, the forged one rejected with no row staged.

    .venv/bin/python scripts/bench_catalog.py --mqtt
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import mmap
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from agent.protocol import canonical, public_key_b64  # noqa: E402
from drivers.gs1 import with_check_digit  # noqa: E402

GOAL_INSTALL_S = 30.0
GOAL_RSS_MB = 300.0
GOAL_LOOKUP_US = 50.0

NAMES = [
    "Dried shiitake", "Black fungus", "Wild mountain honey", "Red dates", "Goji berries",
    "Buckwheat noodles", "Camellia oil", "Walnut kernels", "Millet", "Green tea",
    "干香菇", "黑木耳", "土蜂蜜", "红枣", "枸杞", "荞麦面", "山茶油", "核桃仁", "小米", "高山绿茶",
]
ORIGINS = [
    "Fuping, Hebei", "Lankao, Henan", "Jinggangshan, Jiangxi", "Pingbian, Yunnan", "Zhenfeng, Guizhou",
    "Ningqiang, Shaanxi", "Huining, Gansu", "Dafang, Guizhou", "Shexian, Hebei", "Yanchi, Ningxia",
]
COOPS = ["Cooperative", "Farmers' Union", "Agri Co. Ltd", "合作社", "农业有限公司"]


def gtin_of(i: int) -> str:
    """Distinct, scattered (not sorted) valid GTIN-14s: an affine bijection on 9-digit bodies."""
    body = (i * 7919 + 123457) % 1_000_000_000
    return with_check_digit(f"0{690 + i % 6}{body:09d}")


def product(i: int, rnd: random.Random) -> dict[str, object]:
    weight = rnd.choice([100.0, 125.0, 250.0, 500.0, 512.5, 1000.0])
    start = dt.date(2025, 1, 1) + dt.timedelta(days=rnd.randrange(0, 700))
    return {
        "gtin": gtin_of(i),
        "name": f"{rnd.choice(NAMES)} {int(weight)} g",
        "producer": f"{rnd.choice(ORIGINS).split(',')[0]} {rnd.choice(COOPS)} {i % 997}",
        "origin": rnd.choice(ORIGINS),
        "cert_id": f"PA-{start.year}-{i:06d}",
        "valid_from": start.isoformat(),
        "valid_until": (start + dt.timedelta(days=rnd.choice([365, 730, 1095]))).isoformat(),
        "unit_weight_g": weight,
        "weight_tolerance_g": rnd.choice([2.0, 4.5, 6.0, 10.0]),
    }


def canonical_text(obj: object) -> str:
    return canonical(obj).decode("utf-8")


def revoked_codes(n: int) -> list[str]:
    return [with_check_digit(f"0699{k:09d}") for k in range(max(1, n // 1000))]


def generate(path: Path, n: int, version: int, key: Ed25519PrivateKey, seed: int) -> None:
    """Write a signed snapshot of ``n`` products to ``path``, streaming (never the whole document)."""
    rnd = random.Random(seed)
    revoked = revoked_codes(n)
    head = canonical_text({"base_version": None, "issued_at": "2026-11-29T08:00:00.000Z"})[:-1]
    tail_revoked = ',"revoked":' + canonical_text(revoked)
    tail_version = ',"version":' + canonical_text(version) + "}"
    canon_path = path.with_suffix(".canonical")
    with open(canon_path, "wb") as out:
        out.write((head + ',"products":[').encode())
        batch = 10000
        for start in range(0, n, batch):
            items = [product(i, rnd) for i in range(start, min(n, start + batch))]
            if start:
                out.write(b",")
            out.write(canonical_text(items)[1:-1].encode("utf-8"))
        out.write(("]" + tail_revoked + tail_version).encode("utf-8"))
    with open(canon_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        sig = base64.b64encode(key.sign(cast(bytes, mm))).decode("ascii")
        cut = len(mm) - len(tail_version.encode())
        with open(path, "wb") as out:
            view = memoryview(mm)
            for start in range(0, cut, 1 << 24):
                out.write(view[start:min(cut, start + (1 << 24))])
            out.write(f',"sig":"{sig}"'.encode())
            out.write(view[cut:])
            view.release()
    canon_path.unlink()


def _vm_hwm_mb() -> float:
    """Peak RSS of this process image (VmHWM): unlike ru_maxrss it never includes the parent's
    image that a vfork/exec child starts from."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child_generate(doc: str, n: str, version: str, seed: str, key_hex: str) -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(key_hex))
    generate(Path(doc), int(n), int(version), key, int(seed))


def child_install(doc: str, db: str, pubkey: str) -> None:
    """Run in a fresh interpreter: install and print one JSON line with the figures."""
    import logging

    from agent.protocol import load_public_key
    from agent.store.catalog import CatalogStore

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="  child: %(message)s")
    store = CatalogStore(Path(db), load_public_key(pubkey))
    t0 = time.perf_counter()
    result = store.install_file(doc)
    elapsed = time.perf_counter() - t0
    store.close()
    print(json.dumps({"elapsed_s": elapsed, "vm_hwm_mib": _vm_hwm_mb(),
                      "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "outcome": result.outcome, "version": result.version, "products": result.products}))


def run_install(doc: Path, db: Path, pubkey: str) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child-install", str(doc), str(db), pubkey],
        stdout=subprocess.PIPE, text=True, check=True,
    )
    fig: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return fig


def bench_lookups(db: Path, pubkey: str, n_products: int, count: int) -> list[float]:
    from agent.protocol import load_public_key
    from agent.store.catalog import CatalogStore

    store = CatalogStore(db, load_public_key(pubkey))
    rnd = random.Random(7)
    revoked = revoked_codes(n_products)
    codes: list[str] = []
    for k in range(count):
        kind = k % 10
        if kind < 5:
            codes.append(gtin_of(rnd.randrange(n_products)))  # hit
        elif kind < 7:
            codes.append(with_check_digit(f"0{rnd.randrange(680, 690)}{rnd.randrange(10**9):09d}"))  # miss
        elif kind == 7:
            good = gtin_of(rnd.randrange(n_products))
            codes.append(good[:-1] + str((int(good[-1]) + 1) % 10))  # bad check digit
        elif kind == 8:
            codes.append(gtin_of(rnd.randrange(n_products))[1:])  # EAN-13 form of a hit
        else:
            codes.append(rnd.choice(revoked))
    at = dt.datetime(2026, 11, 29, 12, tzinfo=dt.timezone.utc)
    for code in codes[:2000]:  # warm the page cache and the statement cache
        store.lookup(code, at)
    timings = []
    clock = time.perf_counter_ns
    hits = 0
    for code in codes:
        t = clock()
        look = store.lookup(code, at)
        timings.append((clock() - t) / 1000)
        hits += look.product is not None
    store.close()
    print(f"lookups: {count} ({hits} found in the catalog)")
    return timings


def _vm_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child_mqtt(host: str, port: str, db: str, pubkey: str, cabinet: str) -> None:
    """Run in a fresh interpreter: the daemon's MQTT catalog path, one document, figures as JSON.

    Prints ``ready`` once subscribed; then waits for one catalog outcome and prints its JSON line:
    the wall clock at the outcome, VmHWM, the RSS before, and how many rows were staged.
    """
    import logging
    import queue as queue_module

    from agent.catalog_worker import CatalogWorker
    from agent.config import PlatformConfig
    from agent.events import CatalogOutcome, LinkUp
    from agent.mqtt_link import MqttLink, catalog_topics
    from agent.protocol import load_public_key
    from agent.store import catalog as catalog_module
    from agent.store.catalog import CatalogStore

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="  child: %(message)s")
    staged = [0]
    original_add = catalog_module._Stager.add

    def counting_add(self: Any, rows: list[Any]) -> None:
        staged[0] += len(rows)
        original_add(self, rows)

    setattr(catalog_module._Stager, "add", counting_add)  # noqa: B010 - count what reaches the staging table
    store = CatalogStore(Path(db), load_public_key(pubkey))
    outcomes: queue_module.Queue[object] = queue_module.Queue()
    worker = CatalogWorker(store, outcomes.put)
    worker.start()
    inbox: queue_module.Queue[object] = queue_module.Queue()
    cfg = PlatformConfig(host=host, port=int(port), public_key=pubkey, max_message_mb=256)
    # a cabinet id of its own: a child must not inherit the persistent session of the one before
    link = MqttLink(cfg, cabinet, inbox, list(catalog_topics(cabinet)), b"{}", f"cab/v1/{cabinet}/status",
                    catalog_sink=worker.submit, spool_dir=Path(db).parent)
    link.start()
    while not isinstance(inbox.get(timeout=30), LinkUp):
        pass
    deadline = time.monotonic() + 30
    while link.stats.subacks < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    rss_before = _vm_rss_mib()
    print("ready", flush=True)
    out = outcomes.get(timeout=600)
    done = time.time()
    assert isinstance(out, CatalogOutcome)
    link.stop()
    worker.stop()
    store.close()
    result = out.result
    print(json.dumps({"done_at": done, "vm_hwm_mib": _vm_hwm_mb(), "rss_before_mib": rss_before,
                      "staged_rows": staged[0], "outcome": result.outcome if result else None,
                      "error": out.error.reason if out.error else None,
                      "products": result.products if result else None}), flush=True)


def forge(doc: Path, out: Path) -> None:
    """The same document, the same size, with a signature that is not the platform's."""
    data = bytearray(doc.read_bytes())
    at = data.rfind(b'"sig":"') + len(b'"sig":"')
    data[at:at + 4] = b"AAAA" if data[at:at + 4] != b"AAAA" else b"BBBB"
    out.write_bytes(data)


def mqtt_install(doc: Path, db: Path, pubkey: str, host: str, port: int) -> tuple[dict[str, Any], float]:
    """Publish ``doc`` to a fresh child listening on the broker; (its figures, seconds from publish to outcome)."""
    child = subprocess.Popen([sys.executable, __file__, "--child-mqtt", host, str(port), str(db), pubkey,
                              f"CAB-BENCH-{db.stem}"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"MQTT child did not get ready: {line!r}")
        t0 = time.time()
        subprocess.run(["mosquitto_pub", "-h", host, "-p", str(port), "-q", "1", "-t", "cab/v1/catalog",
                        "-f", str(doc)], check=True)
        fig: dict[str, Any] = json.loads(child.stdout.readline())
        child.wait(60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return fig, fig["done_at"] - t0


def compare_mqtt(work: Path, n: int) -> bool:
    """The --mqtt run: file path vs MQTT path for one snapshot, then a forged one over MQTT."""
    from agent.sim.broker import PrivateBroker

    key = Ed25519PrivateKey.generate()
    pubkey = public_key_b64(key)
    doc, fake = work / "snapshot.json", work / "forged.json"
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--child-generate", str(doc), str(n), "1", "1",
                    key.private_bytes_raw().hex()], check=True)
    forge(doc, fake)
    size = doc.stat().st_size
    payload_mib = size / 2**20
    print(f"generated {doc.name}: {n} products, {size / 1e6:.1f} MB ({payload_mib:.1f} MiB)"
          f" in {time.perf_counter() - t:.1f} s; load average {os.getloadavg()[0]:.2f}")

    for f in work.glob("*.db*"):
        f.unlink()
    file_fig = run_install(doc, work / "file.db", pubkey)
    broker = PrivateBroker(log_dir=work)
    try:
        mqtt_fig, mqtt_s = mqtt_install(doc, work / "mqtt.db", pubkey, broker.host, broker.port)
        forged_fig, forged_s = mqtt_install(fake, work / "forged.db", pubkey, broker.host, broker.port)
    finally:
        broker.close()
    goal_rss = 1.5 * payload_mib + 100
    goal_s = 1.5 * file_fig["elapsed_s"]
    print(f"file path: {file_fig['outcome']}, {file_fig['products']} products in {file_fig['elapsed_s']:.1f} s,"
          f" peak RSS {file_fig['vm_hwm_mib']:.1f} MiB")
    print(f"MQTT path: {mqtt_fig['outcome']}, {mqtt_fig['products']} products in {mqtt_s:.1f} s from publish"
          f" (goal <= {goal_s:.1f} s = 1.5 x file: {'met' if mqtt_s <= goal_s else 'NOT met'}),"
          f" peak RSS {mqtt_fig['vm_hwm_mib']:.1f} MiB (idle {mqtt_fig['rss_before_mib']:.1f} MiB;"
          f" goal <= {goal_rss:.0f} MiB = 1.5 x {payload_mib:.1f} + 100: "
          f"{'met' if mqtt_fig['vm_hwm_mib'] <= goal_rss else 'NOT met'})")
    print(f"forged over MQTT: {forged_fig['error']} after {forged_s:.1f} s, {forged_fig['staged_rows']} rows staged,"
          f" peak RSS {forged_fig['vm_hwm_mib']:.1f} MiB")
    return (mqtt_fig["outcome"] == "installed" and mqtt_s <= goal_s and mqtt_fig["vm_hwm_mib"] <= goal_rss
            and forged_fig["error"] == "bad_signature" and forged_fig["staged_rows"] == 0)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child-install":
        child_install(*sys.argv[2:5])
        return 0
    if len(sys.argv) == 7 and sys.argv[1] == "--child-generate":
        child_generate(*sys.argv[2:7])
        return 0
    if len(sys.argv) == 7 and sys.argv[1] == "--child-mqtt":
        child_mqtt(*sys.argv[2:7])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--products", type=int, default=None, help="default 1,000,000 (300,000 with --mqtt)")
    ap.add_argument("--mqtt", action="store_true", help="catalog over MQTT against the file path (issue 9)")
    ap.add_argument("--lookups", type=int, default=100_000)
    ap.add_argument("--reinstall", action="store_true", help="also install a 2nd snapshot over the 1st")
    ap.add_argument("--workdir", help="where to put the documents and the database (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-catalog-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.mqtt:
        ok = compare_mqtt(work, args.products or 300_000)
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        print("all goals met" if ok else "GOALS MISSED")
        return 0 if ok else 1
    args.products = args.products or 1_000_000
    key = Ed25519PrivateKey.generate()
    pubkey = public_key_b64(key)
    docs = [work / "snapshot-v1.json"] + ([work / "snapshot-v2.json"] if args.reinstall else [])
    key_hex = key.private_bytes_raw().hex()
    for version, doc in enumerate(docs, start=1):
        t = time.perf_counter()
        # In a child: signing maps the whole document, and this process must stay small (see above).
        subprocess.run([sys.executable, __file__, "--child-generate", str(doc), str(args.products),
                        str(version), str(version), key_hex], check=True)
        print(f"generated {doc.name}: {args.products} products, {doc.stat().st_size / 1e6:.1f} MB"
              f" in {time.perf_counter() - t:.1f} s")
    db = work / "catalog.db"
    for f in work.glob("catalog.db*"):
        f.unlink()

    ok = True
    for doc in docs:
        fig = run_install(doc, db, pubkey)
        rss = fig["vm_hwm_mib"] * 1.048576  # MB (10^6 bytes), the stricter reading of the goal
        print(f"install {doc.name}: {fig['outcome']} version {fig['version']}, {fig['products']} products")
        print(f"  elapsed  {fig['elapsed_s']:7.1f} s   goal <= {GOAL_INSTALL_S:.0f} s"
              f"   ratio {fig['elapsed_s'] / GOAL_INSTALL_S:.2f}")
        print(f"  peak RSS {rss:7.1f} MB  goal <= {GOAL_RSS_MB:.0f} MB  ratio {rss / GOAL_RSS_MB:.2f}"
              f"   (VmHWM {fig['vm_hwm_mib']:.1f} MiB, ru_maxrss {fig['ru_maxrss_mib']:.1f} MiB)")
        ok &= fig["elapsed_s"] <= GOAL_INSTALL_S and rss <= GOAL_RSS_MB

    timings = bench_lookups(db, pubkey, args.products, args.lookups)
    median = statistics.median(timings)
    p99 = statistics.quantiles(timings, n=100)[98]
    print(f"  median   {median:7.1f} µs  goal <= {GOAL_LOOKUP_US:.0f} µs   ratio {median / GOAL_LOOKUP_US:.2f}")
    print(f"  p99      {p99:7.1f} µs")
    ok &= median <= GOAL_LOOKUP_US
    print(f"database {sum(f.stat().st_size for f in work.glob('catalog.db*')) / 1e6:.1f} MB on disk")
    if not args.keep and not args.workdir:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
    print("all goals met" if ok else "GOALS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

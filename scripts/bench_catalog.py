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
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import mmap
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from agent.store.catalog_doc import canonical_text  # noqa: E402
from drivers.gs1 import with_check_digit  # noqa: E402
from agent.protocol import public_key_b64  # noqa: E402

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
        sig = base64.b64encode(key.sign(mm)).decode("ascii")
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

    from agent.store.catalog import CatalogStore
    from agent.protocol import load_public_key

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
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_lookups(db: Path, pubkey: str, n_products: int, count: int) -> list[float]:
    from agent.store.catalog import CatalogStore
    from agent.protocol import load_public_key

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


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child-install":
        child_install(*sys.argv[2:5])
        return 0
    if len(sys.argv) == 7 and sys.argv[1] == "--child-generate":
        child_generate(*sys.argv[2:7])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--products", type=int, default=1_000_000)
    ap.add_argument("--lookups", type=int, default=100_000)
    ap.add_argument("--reinstall", action="store_true", help="also install a 2nd snapshot over the 1st")
    ap.add_argument("--workdir", help="where to put the documents and the database (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-catalog-"))
    work.mkdir(parents=True, exist_ok=True)
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

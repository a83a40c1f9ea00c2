"""``cabinet-agent demo``: a simulated cabinet selling to simulated shoppers, shown live.

Everything real but the hardware: a private Mosquitto, the lock board and scale simulators
on ptys speaking the serial protocols, the reference platform signing the catalog and the
commands and verifying every record, and the agent itself as a subprocess.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from agent.sim.cabinet import SimulatedCabinet, Timings


class LiveView:
    """Prints what the platform receives, as it arrives, next to what the shoppers do."""

    def __init__(self, cab: SimulatedCabinet, out: TextIO) -> None:
        self.cab = cab
        self.out = out
        self.t0 = time.monotonic()
        self._printed = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="live-view", daemon=True)

    def say(self, who: str, text: str) -> None:
        with self._lock:
            print(f"{time.monotonic() - self.t0:7.1f}s  {who:<9} {text}", file=self.out, flush=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._drain()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._drain()

    def _drain(self) -> None:
        platform = self.cab.platform
        assert platform is not None
        while True:
            rec = platform.records.get(self._printed + 1)
            if rec is None:
                return
            self._printed += 1
            self.say("platform", f"record #{rec['seq']} (hash and chain verified): {describe(rec)}")


def describe(rec: dict[str, Any]) -> str:
    body = rec["body"]
    if rec["type"] == "sale":
        items = ", ".join(f"{i['qty']} x {i['name']} @ {i['unit_price_cents'] / 100:.2f}" for i in body["items"])
        flags = f"  flags: {', '.join(body['flags'])}" if body["flags"] else ""
        return f"SALE to {body['shopper']}: {items} = {body['total_cents'] / 100:.2f}{flags}"
    rest = ", ".join(f"{k}={v}" for k, v in body.items() if k != "kind")
    return f"event {body['kind']}" + (f" ({rest})" if rest else "")


def camera_frames(folder: Path, fps: float = 10.0) -> str:
    """Frames for the simulated camera: an empty shelf, and after ~8 s somebody holding an
    uncertified product up to the idle cabinet (the agent reports it as uncertified_scan)."""
    import cv2

    from drivers.camera import symbology as sym
    from drivers.camera.synth import CodeSpec, Degradation, compose, empty_frame
    from drivers.gs1 import with_check_digit

    folder.mkdir(parents=True, exist_ok=True)
    code = with_check_digit("697123450001")
    spec = CodeSpec("ean13", code[:12], sym.EAN13, code, code.zfill(14))
    frames = [empty_frame((640, 480), seed=i % 4) for i in range(int(8 * fps))]
    frames += [compose(spec, Degradation(module_px=3), (640, 480), seed=i) for i in range(int(fps))]
    frames += [empty_frame((640, 480), seed=i % 4) for i in range(int(fps))]
    for i, img in enumerate(frames):
        cv2.imwrite(str(folder / f"frame{i:04d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return str(folder / "*.jpg")


def print_supervision_report(cab: SimulatedCabinet, dsn: str, out: TextIO) -> None:
    """The supervision view of what the reference ingest stored (spec/platform.md, report)."""
    from agent.platform import report
    from agent.platform.dsn import open_store

    assert cab.ingest is not None and cab.agent is not None
    last_seq = json.loads(cab.ctl("status", "--json").stdout)["last_seq"]
    deadline = time.monotonic() + 15
    store = open_store(dsn)
    try:
        while time.monotonic() < deadline:   # the worker commits in short batches
            cabinets = report.build(store).get("cabinets", [])
            if cabinets and all(c.get("records", 0) >= last_seq for c in cabinets):
                break
            time.sleep(0.2)
        print("\nsupervision report (cabinet-platform report --db " + dsn + "):", file=out)
        report.write_tables(report.build(store), out)
    finally:
        store.close()


def run_demo(sessions: int = 8, speed: float = 1.0, out: TextIO = sys.stdout, seed: int | None = None) -> int:
    rng = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix="cabinet-demo-"))
    platform_db = workdir / "platform.db"
    cab = SimulatedCabinet(workdir, cabinet_id="CAB-DEMO", timings=Timings(), log_level="warning",
                           camera_source=camera_frames(workdir / "camera"), ingest_dsn=f"sqlite:///{platform_db}")
    view = LiveView(cab, out)
    pace = 1.0 / max(speed, 0.1)
    print(f"cabinet-agent demo: a simulated cabinet in {workdir} (Ctrl-C stops everything)", file=out)
    try:
        cab.start(assign_lanes=False)
        assert cab.broker and cab.lockboard and cab.scales and cab.platform and cab.agent
        view.say("setup", f"private Mosquitto on {cab.broker.host}:{cab.broker.port}")
        view.say("setup", f"lock board simulator on {cab.lockboard.port}, scales on {cab.scales.port}")
        view.say("setup", f"agent running (pid {cab.agent.pid}), config {cab.config_path}")
        view.start()
        for ln in cab.lane_specs:
            product = cab.products[ln.product]
            cab.command_ok("set_lane", {"lane": ln.lane, "gtin": product["gtin"], "price_cents": ln.price_cents})
            view.say("platform", f"set_lane {ln.lane}: {product['name']} at {ln.price_cents / 100:.2f}")
        n = 0
        while sessions == 0 or n < sessions:
            n += 1
            door = rng.choice(sorted({ln.door for ln in cab.lane_specs}))
            lanes = [ln for ln in cab.lane_specs if ln.door == door]
            takes = {ln.lane: rng.choice([0, 1, 1, 2]) for ln in lanes} if n % 5 else {}
            takes = {k: v for k, v in takes.items() if v}
            shopper = f"shopper-{1000 + n}"
            auth = rng.choice(["face", "qr"])
            view.say("platform", f"open_door door {door} for {shopper} ({auth}), signed")
            sid = cab.authorize(door, shopper, auth)
            view.say("cabinet", f"door {door} unlocked, session {sid[:8]}")
            cab.lockboard.open_door(door)
            cab.wait_door_seen_open(door)
            view.say("shopper", f"{shopper} opens door {door}")
            time.sleep(0.8 * pace)
            if not takes:
                view.say("shopper", "looks, takes nothing")
            for lane, qty in takes.items():
                cab.take(lane, qty)
                view.say("shopper", f"takes {qty} x {cab.products[cab.lane(lane).product]['name']} from {lane}")
                time.sleep(0.5 * pace)
            cab.lockboard.close_door(door)
            view.say("shopper", f"shuts door {door}; the scales settle")
            cab.wait_session_end(sid, timeout=30)
            time.sleep(0.7 * pace)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:   # cabinetctl, as an operator would ask
            st = cab.ctl("status", "--json")
            if st.returncode == 0 and json.loads(st.stdout)["unsynced"] == 0:
                break
            time.sleep(0.3)
        view.stop()
        result = cab.ctl("status")
        print("\n" + result.stdout.rstrip(), file=out)
        sales = cab.platform.sales()
        total = sum(s["total_cents"] for s in sales)
        print(f"\n{len(sales)} sales, {total / 100:.2f} in total; the platform holds records"
              f" 1..{cab.platform.contiguous_upto}"
              f" with {len(cab.platform.chain_errors)} chain errors and acknowledged them all.", file=out)
        print_supervision_report(cab, f"sqlite:///{platform_db}", out)
        return 0
    except KeyboardInterrupt:
        print("\nstopping...", file=out)
        return 0
    finally:
        view.stop() if view._thread.is_alive() else None
        cab.stop()
        shutil.rmtree(workdir, ignore_errors=True)

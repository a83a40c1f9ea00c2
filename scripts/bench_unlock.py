#!/usr/bin/env python3
"""Benchmark: unlock latency, signed open_door published -> unlock frame on the lock board's pty.

Runs >= 100 sessions against the real agent (subprocess), a private Mosquitto and the lock
board simulator, and prints p50/p99 next to the same run's floor: an MQTT loopback round trip
on the same broker + one Ed25519 verification of the command + the unlock frame's time on a
9600-baud line (5 bytes x 10 bits). A pty delivers bytes instantly, so the frame time is added
to the measured figures too (the frame is only complete on a real line after it).

Usage: python scripts/bench_unlock.py [--sessions 100]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.sim.cabinet import SimulatedCabinet, Timings  # noqa: E402
from agent.mqtt_link import set_no_delay  # noqa: E402
from agent.protocol import canonical, verify_signed  # noqa: E402
from drivers.lockboard.codec import UnlockRequest  # noqa: E402

FRAME_S = 5 * 10 / 9600


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def mqtt_round_trips(host: str, port: int, n: int, payload: bytes) -> list[float]:
    """Publish (QoS 1) from one client, receive on another, on the same broker."""
    got = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{uuid.uuid4().hex[:6]}")
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:6]}")
    for c in (sub, pub):
        c.on_socket_open = set_no_delay
    sub.on_message = lambda *_a: got.set()
    subscribed = threading.Event()
    sub.on_subscribe = lambda *_a: subscribed.set()
    sub.connect(host, port)
    sub.loop_start()
    sub.subscribe("bench/rtt", qos=1)
    subscribed.wait(5)
    pub.connect(host, port)
    pub.loop_start()
    out = []
    for _ in range(n):
        got.clear()
        t0 = time.perf_counter()
        pub.publish("bench/rtt", payload, qos=1)
        if not got.wait(5):
            raise TimeoutError("round trip lost")
        out.append(time.perf_counter() - t0)
    for c in (pub, sub):
        c.loop_stop()
        c.disconnect()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--sessions", type=int, default=100)
    args = ap.parse_args()
    timings = Timings(latch_release_s=0.05, settle_s=0.2, open_timeout_s=5, door_open_alarm_s=60, ack_timeout_s=5)
    with tempfile.TemporaryDirectory(prefix="bench-unlock-") as tmp:
        cab = SimulatedCabinet(Path(tmp), cabinet_id="CAB-BENCH", timings=timings, log_level="warning")
        cab.start()
        try:
            assert cab.platform and cab.lockboard and cab.broker
            lat: list[float] = []
            for n in range(args.sessions):
                door = 1 + n % 2
                frame = UnlockRequest(1, door).to_bytes()
                since = len(cab.lockboard.received)
                sid = str(uuid.uuid4())
                cmd = cab.platform.make_command("open_door", {"door": door, "session_id": sid,
                                                              "shopper": f"b{n}", "auth": "face"})
                payload = canonical(cmd)
                t0 = time.monotonic()
                cab.platform.publish_raw("cmd", payload)
                hit = cab.lockboard.wait_for_frame(lambda f, fr=frame: f == fr, 5, since=since)
                if hit is None:
                    raise TimeoutError(f"no unlock frame for session {n}")
                lat.append(hit[0] - t0)
                cab.platform.wait_reply(cmd["id"], 5)
                # finish the session quickly: open, shut, settle -> session_empty
                cab.lockboard.open_door(door)
                cab.wait_door_seen_open(door)
                cab.lockboard.close_door(door)
                cab.wait_session_end(sid, 10)
            # floor, same run, same broker
            rtt = mqtt_round_trips(cab.broker.host, cab.broker.port, args.sessions, payload)
            key = cab.platform.private_key.public_key()
            sig = []
            for _ in range(args.sessions):
                t0 = time.perf_counter()
                verify_signed(cmd, key)
                sig.append(time.perf_counter() - t0)
        finally:
            cab.stop()
    ms = 1000.0
    floor50 = (statistics.median(rtt) + statistics.median(sig) + FRAME_S) * ms
    floor99 = (pct(rtt, 0.99) + pct(sig, 0.99) + FRAME_S) * ms
    p50, p99 = statistics.median(lat) * ms, pct(lat, 0.99) * ms
    print(f"unlock latency over {len(lat)} sessions (signed open_door published -> unlock frame on the pty)")
    print(f"  slowest five: {', '.join(f'{v * ms:.1f}' for v in sorted(lat)[-5:])} ms")
    print(f"  measured on the pty        p50 {p50:7.2f} ms   p99 {p99:7.2f} ms")
    print(f"  + frame time on 9600 baud  p50 {p50 + FRAME_S * ms:7.2f} ms   p99 {p99 + FRAME_S * ms:7.2f} ms")
    print(f"  floor: MQTT round trip p50 {statistics.median(rtt) * ms:.2f} ms / p99 {pct(rtt, 0.99) * ms:.2f} ms,"
          f" Ed25519 verify {statistics.median(sig) * ms:.3f} ms, frame {FRAME_S * ms:.2f} ms")
    print(f"  floor                      p50 {floor50:7.2f} ms   p99 {floor99:7.2f} ms")
    ratio = (p99 + FRAME_S * ms) / floor50
    print(f"  p99 (with frame time) / floor p50 = {ratio:.2f}x   (goal <= 3x: {'met' if ratio <= 3 else 'NOT met'})")
    print(f"  p99 (with frame time) / floor p99 = {(p99 + FRAME_S * ms) / floor99:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

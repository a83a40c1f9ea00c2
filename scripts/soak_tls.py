#!/usr/bin/env python3
"""Soak: the platform link over TLS for minutes of traffic, and across many starts, without a drop.

The old link dropped itself within a second of about one connect in four ("Unspecified error";
the broker logged "decryption failed or bad record mac"): two threads used one SSLSocket. Here
commands flow in (QoS 1) while three threads hand records to the link, against a private
Mosquitto with a TLS listener and a CA made on the spot; then the link is started and stopped
``--starts`` times with traffic in each. Any LinkDown while running is a failure.
tests/component/test_mqtt_link_tls.py runs a short version of this in CI.

Usage: python scripts/soak_tls.py [--minutes 3] [--starts 50]
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from agent.config import PlatformConfig  # noqa: E402
from agent.events import Inbound, LinkDown, LinkUp  # noqa: E402
from agent.mqtt_link import MqttLink  # noqa: E402
from agent.protocol import public_key_b64  # noqa: E402
from agent.sim.broker import PrivateBroker, TlsListener  # noqa: E402
from agent.sim.pki import make_pki  # noqa: E402

CAB = "CAB-SOAK"
CMD, RECORDS, STATUS = f"cab/v1/{CAB}/cmd", f"cab/v1/{CAB}/records", f"cab/v1/{CAB}/status"


class Session:
    """One run of the link: start, traffic for ``seconds``, stop; counts what happened."""

    def __init__(self, cfg: PlatformConfig, peer: mqtt.Client, received: queue.Queue[Any]) -> None:
        self.cfg, self.peer, self.received = cfg, peer, received
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.link = MqttLink(cfg, CAB, self.inbox, [CMD], b'{"online":false}', STATUS)
        self.sent = self.commands = self.inbound = self.drops = 0

    def run(self, seconds: float) -> None:
        self.link.start()
        if not isinstance(self.inbox.get(timeout=15), LinkUp):
            raise RuntimeError("the link did not come up")
        time.sleep(0.2)  # let the SUBACK arrive (a soak, not a test: no condition to wait on)
        stop = threading.Event()
        workers = [threading.Thread(target=self._publish, args=(stop,)) for _ in range(3)]
        for w in workers:
            w.start()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.peer.publish(CMD, b"c" * 200, qos=1)
            self.commands += 1
            self._drain()
            time.sleep(0.002)
        stop.set()
        for w in workers:
            w.join()
        deadline = time.monotonic() + 10
        while self.inbound < self.commands and time.monotonic() < deadline:
            self._drain(0.1)
        self.link.stop()

    def _publish(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if self.link.publish(RECORDS, b"r" * 300) is not None:
                self.sent += 1
            time.sleep(0.001)

    def _drain(self, timeout: float = 0.0) -> None:
        try:
            while True:
                item = self.inbox.get(timeout=timeout) if timeout else self.inbox.get_nowait()
                if isinstance(item, Inbound):
                    self.inbound += 1
                elif isinstance(item, LinkDown):
                    self.drops += 1
                    print(f"  DROP: {item.reason}", flush=True)
        except queue.Empty:
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--starts", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-tls-") as tmp:
        pki = make_pki(Path(tmp) / "pki", client_name=CAB)
        broker = PrivateBroker(log_dir=Path(tmp), tls=TlsListener(pki.server.cert, pki.server.key))
        received: queue.Queue[Any] = queue.Queue()
        peer = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="soak-platform")
        peer.on_message = lambda _c, _u, m: received.put(m.topic)
        try:
            peer.connect(broker.host, broker.port)
            peer.loop_start()
            peer.subscribe(RECORDS, qos=1)
            cfg = PlatformConfig(host=broker.host, port=broker.tls_port, tls=True, ca_file=str(pki.ca),
                                 public_key=public_key_b64(Ed25519PrivateKey.generate()))
            print(f"load average {os.getloadavg()[0]:.2f}; {args.minutes:g} min of TLS traffic in one connection")
            long = Session(cfg, peer, received)
            long.run(args.minutes * 60)
            print(f"  {long.commands} commands in, {long.inbound} received; {long.sent} records out; "
                  f"{long.drops} drops")
            drops = long.drops + (long.inbound < long.commands)
            print(f"{args.starts} starts with 0.5 s of traffic each")
            for n in range(args.starts):
                short = Session(cfg, peer, received)
                short.run(0.5)
                drops += short.drops + (short.inbound < short.commands)
                if short.drops:
                    print(f"  start {n}: {short.drops} drops")
            log = broker.log_path.read_text(errors="replace")
            bad_mac = log.count("bad record mac") + log.count("decryption failed")
            print(f"drops: {drops}; broker log TLS errors: {bad_mac}")
            return 0 if drops == 0 and bad_mac == 0 else 1
        finally:
            peer.loop_stop()
            broker.close()


if __name__ == "__main__":
    sys.exit(main())

"""When the link spreads its reconnects (``reconnect_spread_s``): only after the broker ended an
established connection; not before the first connection, not after our own keepalive timeout."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import agent.mqtt_link as mqtt_link
from agent.events import LinkDown, LinkUp
from agent.sim.broker import PrivateBroker
from agent.sim.tcpproxy import TcpProxy
from helpers import wait_until
from linkkit import LinkRig, platform_config


@pytest.fixture
def proxy(broker: PrivateBroker) -> Iterator[TcpProxy]:
    with TcpProxy(broker.host, broker.port) as p:
        yield p


@pytest.fixture
def delays(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool, float]]:
    """Every (attempt, after_loss, spread_s) the link asks the policy for; the wait itself is cut short."""
    calls: list[tuple[int, bool, float]] = []

    def spy(attempt: int, *, after_loss: bool, spread_s: float, **kw: Any) -> float:
        calls.append((attempt, after_loss, spread_s))
        return 0.05

    monkeypatch.setattr(mqtt_link, "reconnect_delay", spy)
    return calls


def test_the_first_connection_uses_the_plain_backoff_and_a_cut_one_the_spread(
        proxy: TcpProxy, delays: list[tuple[int, bool, float]]) -> None:
    proxy.refusing = True
    rig = LinkRig(platform_config(proxy.host, proxy.port, reconnect_spread_s=7.0))
    rig.link.start()
    try:
        wait_until(lambda: len(delays) >= 2, 10, "retries before the first connection")
        proxy.refusing = False
        rig.next(LinkUp, 10)
        before = len(delays)
        assert delays and all(not after_loss for _, after_loss, _ in delays[:before])
        assert {spread for _, _, spread in delays} == {7.0}

        proxy.refusing = True          # the broker ends the connection and refuses for a while
        proxy.cut()
        rig.next(LinkDown)
        wait_until(lambda: len(delays) >= before + 3, 10, "retries after the cut")
        proxy.refusing = False
        rig.next(LinkUp, 10)
        assert all(after_loss for _, after_loss, _ in delays[before:])   # every one until stable again
    finally:
        rig.stop()


class SilentBroker:
    """Answers CONNECT with a CONNACK (MQTT 3.1.1), then never a byte more: no PINGRESP."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.conns: queue.Queue[socket.socket] = queue.Queue()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            conn.recv(65536)                       # the CONNECT
            conn.sendall(b"\x20\x02\x00\x00")      # CONNACK: no session, accepted
            self.conns.put(conn)

    def close(self) -> None:
        self.server.close()
        while not self.conns.empty():
            self.conns.get().close()


def test_a_keepalive_timeout_is_ours_and_reconnects_without_the_spread(
        delays: list[tuple[int, bool, float]]) -> None:
    silent = SilentBroker()
    # keepalive_s is at least 5 in a config; 1 s here keeps the test short (paho: PINGREQ at 1 s, gone at 2 s)
    cfg = platform_config("127.0.0.1", silent.port, mqtt_version="3.1.1", reconnect_spread_s=7.0)
    rig = LinkRig(cfg.model_copy(update={"keepalive_s": 1}))
    rig.link.start()
    try:
        rig.next(LinkUp, 10)
        t0 = time.monotonic()
        down = rig.next(LinkDown, 10)
        assert "Keep alive" in down.reason and time.monotonic() - t0 < 5
        rig.next(LinkUp, 10)
        assert delays and not delays[0][1], delays
    finally:
        rig.stop(timeout_s=0.2)
        silent.close()

"""The link over TLS and mutual TLS against a real Mosquitto, with a CA made by the test:
the right CA works; a wrong CA, an expired or a wrong-host certificate never connects and never
sends a byte of MQTT in the clear; a hanging handshake is bounded; passwords, also from systemd
credentials; and a TLS link that holds under traffic from several threads."""

from __future__ import annotations

import functools
import logging
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import PlatformConfig
from agent.events import LinkDown, LinkUp
from agent.sim.broker import PrivateBroker, TlsListener
from agent.sim.pki import Pki, make_pki
from agent.sim.tcpproxy import TcpProxy
from helpers import wait_until
from linkkit import CAB, CMD, RECORDS, LinkRig, Peer, platform_config

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), client_name=CAB)


def _broker(tmp_path: Path, pki: Pki, *, cert: str = "server", mutual: bool = False, **kw: object) -> PrivateBroker:
    issued = getattr(pki, cert)
    tls = TlsListener(issued.cert, issued.key, cafile=pki.ca if mutual else None, require_certificate=mutual)
    return PrivateBroker(log_dir=tmp_path / "broker-log", tls=tls, **kw)  # type: ignore[arg-type]


@pytest.fixture
def tls_broker(tmp_path: Path, pki: Pki) -> Iterator[PrivateBroker]:
    b = _broker(tmp_path, pki)
    try:
        yield b
    finally:
        b.close()


def _tls(host: str, port: int, pki: Pki, **kw: object) -> PlatformConfig:
    kw.setdefault("ca_file", str(pki.ca))
    return platform_config(host, port, tls=True, **kw)


def _no_connection(rig: LinkRig, proxy: TcpProxy, attempts: int = 3) -> None:
    """The link keeps trying (``attempts`` TCP connections) and never gets a CONNACK, and no MQTT
    byte went out in the clear (a CONNECT starts with the protocol name "MQTT" and our client id)."""
    proxy.wait_connections(attempts, timeout=15)
    assert not rig.link.connected and rig.link.stats.connects == 0
    assert b"MQTT" not in proxy.captured_up and rig.link.client_id.encode() not in proxy.captured_up
    assert proxy.captured_up.startswith(b"\x16\x03")  # every connection began with a TLS handshake record


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_tls_with_the_right_ca(tls_broker: PrivateBroker, pki: Pki, version: str) -> None:
    rig = LinkRig(_tls(tls_broker.host, tls_broker.tls_port, pki, mqtt_version=version)).start()
    peer = Peer(tls_broker.host, tls_broker.port)
    try:
        peer.publish(CMD, b"over tls")
        assert rig.inbound(CMD).payload == b"over tls"
    finally:
        peer.close()
        rig.stop()


@pytest.mark.parametrize("case", ["wrong CA", "expired", "wrong host"])
def test_a_certificate_that_does_not_verify_never_connects(tmp_path: Path, pki: Pki, case: str) -> None:
    cert = {"wrong CA": "server", "expired": "expired", "wrong host": "wrong_host"}[case]
    broker = _broker(tmp_path, pki, cert=cert)
    try:
        with TcpProxy(broker.host, broker.tls_port) as proxy:
            ca = pki.other_ca if case == "wrong CA" else pki.ca
            rig = LinkRig(_tls(proxy.host, proxy.port, pki, ca_file=str(ca)), backoff_base_s=0.05,
                          backoff_cap_s=0.3)
            rig.link.start()
            try:
                _no_connection(rig, proxy)
                assert rig.inbox.empty()
            finally:
                rig.stop()
    finally:
        broker.close()


def test_retries_back_off(tmp_path: Path, pki: Pki) -> None:
    """Against a certificate that never verifies the link keeps trying, spread out by full-jitter
    backoff (base 0.2 s, cap 2 s: about six attempts in 3 s; without backoff, hundreds)."""
    broker = _broker(tmp_path, pki, cert="expired")
    try:
        with TcpProxy(broker.host, broker.tls_port) as proxy:
            rig = LinkRig(_tls(proxy.host, proxy.port, pki), backoff_base_s=0.2, backoff_cap_s=2.0)
            rig.link.start()
            try:
                proxy.wait_connections(2, timeout=10)
                with pytest.raises(TimeoutError):
                    proxy.wait_connections(16, timeout=3.0)
            finally:
                rig.stop()
            assert rig.link.stats.connects == 0
    finally:
        broker.close()


def test_a_tls_handshake_that_hangs_is_bounded(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """A server that accepts TCP and then says nothing: each attempt ends after connect_timeout_s."""
    silent = socket.create_server(("127.0.0.1", 0), backlog=16)  # the kernel completes the handshake
    try:
        port = silent.getsockname()[1]
        caplog.set_level(logging.WARNING, logger="agent.mqtt_link")
        rig = LinkRig(_tls("127.0.0.1", port, pki, connect_timeout_s=0.4), backoff_base_s=0.05, backoff_cap_s=0.1)
        started = time.monotonic()
        rig.link.start()
        try:
            wait_until(lambda: sum("cannot connect" in r.message for r in caplog.records) >= 2, 5,
                       "two bounded attempts")
        finally:
            rig.stop()
        assert time.monotonic() - started < 4
        assert not rig.link.connected
    finally:
        silent.close()


def test_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    broker = _broker(tmp_path, pki, mutual=True)
    try:
        with TcpProxy(broker.host, broker.tls_port) as proxy:
            without = LinkRig(_tls(proxy.host, proxy.port, pki))
            without.link.start()
            try:
                _no_connection(without, proxy, attempts=2)  # the broker wants our certificate
            finally:
                without.stop()
        rig = LinkRig(_tls(broker.host, broker.tls_port, pki, cert_file=str(pki.client.cert),
                           key_file=str(pki.client.key))).start()
        peer = Peer(broker.host, broker.port)
        try:
            peer.publish(CMD, b"mutual")
            assert rig.inbound(CMD).payload == b"mutual"
        finally:
            peer.close()
            rig.stop()
    finally:
        broker.close()


def _passwd(path: Path, *users: tuple[str, str]) -> Path:
    for n, (user, password) in enumerate(users):
        subprocess.run(["mosquitto_passwd", *(["-c"] if n == 0 else []), "-b", str(path), user, password],
                       check=True, capture_output=True)
    return path


def test_username_and_password_from_systemd_credentials(tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    passwd = _passwd(tmp_path / "passwd", (CAB, "s3cret pass"), ("platform", "p"))
    broker = _broker(tmp_path, pki, password_file=passwd)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt-password").write_text("s3cret pass\n")  # one trailing newline is not part of it
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    try:
        cfg = _tls(broker.host, broker.tls_port, pki, username=CAB,
                   password_file="$CREDENTIALS_DIRECTORY/mqtt-password")
        assert cfg.password() == "s3cret pass" and cfg.warnings() == []
        rig = LinkRig(cfg).start()
        rig.stop()

        (creds / "mqtt-password").write_text("wrong\n")
        refused = LinkRig(_tls(broker.host, broker.tls_port, pki, username=CAB,
                               password_file="${CREDENTIALS_DIRECTORY}/mqtt-password"))
        caplog.set_level(logging.ERROR, logger="agent.mqtt_link")
        refused.link.start()
        try:
            wait_until(lambda: sum("Not authorized" in r.message for r in caplog.records) >= 2, 10,
                       "the broker refusing the password, twice")
            assert not refused.link.connected and refused.inbox.empty()
        finally:
            refused.stop()
    finally:
        broker.close()


def test_a_password_without_tls_is_warned_about(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("x")
    cfg = platform_config("127.0.0.1", 1, username=CAB, password_file=str(tmp_path / "pw"))
    assert cfg.warnings() == ["platform.password_file: the password would be sent in plaintext: set tls = true"]
    caplog.set_level(logging.WARNING, logger="agent.mqtt_link")
    LinkRig(cfg)
    assert any("plaintext" in r.message for r in caplog.records)


def _received_all(rig: LinkRig, n: int) -> bool:
    return len(rig.inbounds(CMD)) >= n


def _publish_until(rig: LinkRig, stop: threading.Event, sent: list[int], n: int) -> None:
    """What the core does: hand records to the link from its own thread, as fast as it likes."""
    while not stop.is_set():
        if rig.link.publish(RECORDS, b"r" * 300) is not None:
            sent[n] += 1
        time.sleep(0.001)


def test_a_tls_link_holds_under_traffic_and_across_restarts(tls_broker: PrivateBroker, pki: Pki) -> None:
    """CI variant of scripts/soak_tls.py: commands in, records out from three threads, over TLS;
    no drop in one long connection, nor in any of many short ones (the old link dropped itself
    within a second of about one connect in four)."""
    peer = Peer(tls_broker.host, tls_broker.port)
    peer.subscribe(RECORDS)
    cfg = _tls(tls_broker.host, tls_broker.tls_port, pki)
    try:
        for cycle in range(12):
            long_run = cycle == 0
            rig = LinkRig(cfg, held=()).start()
            stop = threading.Event()
            sent = [0, 0, 0]
            workers = [threading.Thread(target=_publish_until, args=(rig, stop, sent, n)) for n in range(3)]
            for w in workers:
                w.start()
            end = time.monotonic() + (6.0 if long_run else 0.4)
            n_cmds = 0
            while time.monotonic() < end:
                peer.client.publish(CMD, b"c" * 200, qos=1)
                n_cmds += 1
                time.sleep(0.002)
            stop.set()
            for w in workers:
                w.join()
            wait_until(functools.partial(_received_all, rig, n_cmds), 10, "every command")
            rig.stop()
            assert not any(isinstance(m, LinkDown) for m in rig.seen[:-1]), f"cycle {cycle}: the link dropped"
            assert rig.link.stats.connects == 1 and sum(isinstance(m, LinkUp) for m in rig.seen) == 1
            assert sum(sent) > 0
    finally:
        peer.close()

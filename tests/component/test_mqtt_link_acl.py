"""config/mosquitto.example.conf and config/mosquitto-cabinet.acl, run by a real Mosquitto: each
cabinet gets its own topics and read access to the catalog, and nothing of another cabinet's."""

from __future__ import annotations

import logging
import queue
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.events import Inbound, LinkUp
from agent.mqtt_link import MqttLink, catalog_topics
from agent.sim.broker import PrivateBroker, free_port
from agent.sim.pki import Pki, make_pki
from helpers import wait_until
from linkkit import LinkRig, Peer, platform_config

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]
A, B = "CAB-A", "CAB-B"


def example_config(pki: Pki, passwd: Path, tls_port: int) -> str:
    """The example config with its paths and port pointed at this test's files."""
    text = (ROOT / "config" / "mosquitto.example.conf").read_text()
    replacements = {
        "/etc/mosquitto/cabinet.passwd": str(passwd),
        "/etc/mosquitto/cabinet.acl": str(ROOT / "config" / "mosquitto-cabinet.acl"),
        "/etc/mosquitto/certs/server.pem": str(pki.server.cert),
        "/etc/mosquitto/certs/server.key": str(pki.server.key),
        "listener 8883": f"listener {tls_port} 127.0.0.1",
    }
    for old, new in replacements.items():
        assert old in text, f"the example config no longer names {old}"
        text = text.replace(old, new)
    # PrivateBroker writes these itself (and persistence to a place of its own)
    return "\n".join(line for line in text.splitlines()
                     if not re.match(r"(per_listener_settings|allow_anonymous|persistence)", line))


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrivateBroker, Pki, int]]:
    tmp = tmp_path_factory.mktemp("acl")
    pki = make_pki(tmp / "pki")
    passwd = tmp / "passwd"
    for n, user in enumerate((A, B, "platform")):
        subprocess.run(["mosquitto_passwd", *(["-c"] if n == 0 else []), "-b", str(passwd), user, f"pw-{user}"],
                       check=True, capture_output=True)
    tls_port = free_port()
    broker = PrivateBroker(log_dir=tmp / "log", password_file=None, allow_anonymous=False,
                           extra_config=example_config(pki, passwd, tls_port))
    try:
        yield broker, pki, tls_port
    finally:
        broker.close()


def _cabinet(broker: PrivateBroker, user: str) -> Peer:
    return Peer(broker.host, broker.port, username=user, password=f"pw-{user}")


def test_the_agent_logs_in_over_tls_and_gets_its_own_topics(acl_broker: tuple[PrivateBroker, Pki, int],
                                                            tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broker, pki, tls_port = acl_broker
    (tmp_path / "pw").write_text(f"pw-{A}\n")
    cfg = platform_config(broker.host, tls_port, tls=True, ca_file=str(pki.ca), username=A,
                          password_file=str(tmp_path / "pw"))
    inbox: queue.Queue[Any] = queue.Queue()
    subscriptions = [f"cab/v1/{A}/records/ack", f"cab/v1/{A}/cmd", *catalog_topics(A)]
    link = MqttLink(cfg, A, inbox, subscriptions, b'{"online":false}', f"cab/v1/{A}/status",
                    backoff_base_s=0.05, backoff_cap_s=0.5)
    platform = _cabinet(broker, "platform")
    link.start()
    try:
        assert isinstance(inbox.get(timeout=10), LinkUp)
        wait_until(lambda: link.stats.subacks >= 1, 10, "SUBACK")
        assert link.stats.subscriptions_refused == 0  # every topic of its own is granted
        platform.publish(f"cab/v1/{A}/cmd", b"for A")
        msg = inbox.get(timeout=10)
        assert isinstance(msg, Inbound) and msg.payload == b"for A"
    finally:
        link.stop()
        platform.close()
    # a cabinet without an account (or with a wrong password) does not get in
    (tmp_path / "pw").write_text("not the password\n")
    caplog.set_level(logging.ERROR, logger="agent.mqtt_link")
    refused = LinkRig(platform_config(broker.host, tls_port, tls=True, ca_file=str(pki.ca), username=A,
                                      password_file=str(tmp_path / "pw")))
    refused.link.start()
    try:
        wait_until(lambda: sum("Not authorized" in r.message for r in caplog.records) >= 2, 10, "refused twice")
        assert refused.link.stats.connects == 0
    finally:
        refused.stop()


def test_a_cabinet_cannot_read_anothers_commands_nor_write_anothers_records(
        acl_broker: tuple[PrivateBroker, Pki, int]) -> None:
    broker, _pki, _ = acl_broker
    platform = _cabinet(broker, "platform")
    cab_a = _cabinet(broker, A)
    try:
        platform.subscribe("cab/v1/+/records")
        platform.subscribe("cab/v1/catalog")
        # A's own command topic and the catalog: granted; B's command topic: refused or never delivered
        cab_a.subscribe(f"cab/v1/{A}/cmd")
        cab_a.subscribe("cab/v1/catalog")
        spy = cab_a.subscribe(f"cab/v1/{B}/cmd")
        platform.publish(f"cab/v1/{B}/cmd", b"for B only")
        platform.publish(f"cab/v1/{A}/cmd", b"for A")
        platform.publish("cab/v1/catalog", b"catalog for all", retain=False)
        assert cab_a.message(f"cab/v1/{A}/cmd").payload == b"for A"
        assert cab_a.message("cab/v1/catalog").payload == b"catalog for all"
        received = [cab_a.messages.get_nowait().topic for _ in range(cab_a.messages.qsize())]
        assert f"cab/v1/{B}/cmd" not in received, (received, spy)

        cab_a.publish(f"cab/v1/{B}/records", b"forged records for B")
        cab_a.publish("cab/v1/catalog", b"forged catalog")
        cab_a.publish(f"cab/v1/{A}/records", b"A's records")  # barrier: delivered in order
        got = platform.message(f"cab/v1/{A}/records")
        assert got.payload == b"A's records"
        others = [platform.messages.get_nowait() for _ in range(platform.messages.qsize())]
        assert [(m.topic, m.payload) for m in others] == [], others
    finally:
        cab_a.close()
        platform.close()

"""The daemon over TLS with a username and a password that comes from systemd credentials
(``$CREDENTIALS_DIRECTORY``, as ``LoadCredential=`` provides it): a sale end to end, and a
command that waits in the session while the agent is down (issue 9)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import agent.sim.cabinet as cabinet_module
from agent.sim.broker import PrivateBroker, TlsListener
from agent.sim.cabinet import SimulatedCabinet, Timings
from agent.sim.pki import make_pki

pytestmark = pytest.mark.timeout(120)
CAB = "CAB-TLS"


@pytest.fixture
def cabinet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimulatedCabinet]:
    pki = make_pki(tmp_path / "pki", client_name=CAB)
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), CAB, "tls-and-a-secret"], check=True,
                   capture_output=True)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt-password").write_text("tls-and-a-secret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))  # the agent subprocess inherits it
    platform: dict[str, Any] = {"tls": True, "ca_file": str(pki.ca), "username": CAB,
                                "password_file": "$CREDENTIALS_DIRECTORY/mqtt-password"}

    def broker(log_dir: Path | None = None, **kw: Any) -> PrivateBroker:
        # the reference platform stays on the plain listener (anonymous); the agent gets the TLS one
        b = PrivateBroker(log_dir=log_dir, tls=TlsListener(pki.server.cert, pki.server.key), password_file=passwd,
                          allow_anonymous=True, **kw)
        platform["port"] = b.tls_port
        return b

    monkeypatch.setattr(cabinet_module, "PrivateBroker", broker)
    cab = SimulatedCabinet(tmp_path / "cab", cabinet_id=CAB, timings=Timings.fast(),
                           config_extra={"platform": platform})
    try:
        cab.start()
        yield cab
    finally:
        cab.stop()


def test_a_sale_over_tls_with_a_password_from_credentials(cabinet: SimulatedCabinet) -> None:
    cab = cabinet
    assert cab.broker is not None and cab.config()["platform"]["port"] == cab.broker.tls_port
    sid = cab.shop(2, {"B1": 1}, shopper="tls-shopper")
    sale = cab.wait_session_end(sid)
    assert sale["type"] == "sale" and [i["lane"] for i in sale["body"]["items"]] == ["B1"]
    assert "password would be sent in plaintext" not in cab.agent_log.read_text()

    # a command queued in the persistent session while the agent is down is served after its restart
    cab.stop_agent()
    assert cab.platform is not None
    cid = cab.platform.send_command("status", {})
    cab.start_agent()
    assert cab.platform.wait_reply(cid, 20)["ok"] is True
    assert "disconnected from the platform" not in cab.agent_log.read_text()

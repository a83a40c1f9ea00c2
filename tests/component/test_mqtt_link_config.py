"""[platform] keys of the link (operations.md v1.1): mqtt_version, max_message_mb, TLS files,
passwords and systemd credentials, and the plaintext-password warning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.config import parse_config
from agent.errors import ConfigError
from linkkit import PUBLIC_KEY


def cfg(**platform: Any) -> Any:
    return parse_config({"cabinet": {"id": "CAB-1"}, "platform": {"public_key": PUBLIC_KEY, **platform}}).platform


def problems(**platform: Any) -> list[str]:
    with pytest.raises(ConfigError) as err:
        cfg(**platform)
    return err.value.problems


def test_defaults() -> None:
    p = cfg()
    assert (p.mqtt_version, p.max_message_mb, p.max_message_bytes, p.connect_timeout_s) == ("5", 64, 64 << 20, 10)
    assert p.warnings() == [] and p.password() is None


def test_mqtt_version_and_size_limits() -> None:
    assert cfg(mqtt_version="3.1.1").mqtt_version == "3.1.1"
    assert problems(mqtt_version="4")[0].startswith("platform.mqtt_version: ")
    assert problems(mqtt_version=5)[0].startswith("platform.mqtt_version: ")  # a string, as in the spec
    assert problems(max_message_mb=0)[0].startswith("platform.max_message_mb: ")
    assert problems(max_message_mb=257)[0].startswith("platform.max_message_mb: ")


def test_tls_files_need_tls_and_go_in_pairs() -> None:
    assert problems(ca_file="/ca.pem") == ["platform.ca_file: is only used with tls = true"]
    assert problems(tls=True, cert_file="/c.pem") == [
        "platform.key_file: cert_file and key_file go together (the client certificate for mutual TLS)"]
    assert cfg(tls=True, cert_file="/c.pem", key_file="/k.pem").key_file == "/k.pem"
    assert problems(password_file="/pw") == ["platform.password_file: a password needs a username"]


def test_password_file_and_systemd_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("secret\n")
    assert cfg(tls=True, username="u", password_file=str(tmp_path / "pw")).password() == "secret"
    (tmp_path / "pw").write_text("two\n\n")
    assert cfg(tls=True, username="u", password_file=str(tmp_path / "pw")).password() == "two\n"  # one newline off

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    p = cfg(tls=True, username="u", password_file="$CREDENTIALS_DIRECTORY/mqtt-password")
    with pytest.raises(ConfigError) as err:
        p.password()
    assert err.value.problems[0].startswith("platform.password_file: $CREDENTIALS_DIRECTORY/mqtt-password names")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    (tmp_path / "mqtt-password").write_text("from systemd\n")
    assert p.password() == "from systemd"
    assert p.resolve_path("password_file") == tmp_path / "mqtt-password"
    q = cfg(tls=True, ca_file="${CREDENTIALS_DIRECTORY}/ca.pem")
    assert q.resolve_path("ca_file") == tmp_path / "ca.pem"
    with pytest.raises(ConfigError) as err:
        cfg(tls=True, username="u", password_file=str(tmp_path / "missing")).password()
    assert err.value.problems[0].startswith("platform.password_file: cannot read ")


def test_a_password_without_tls_is_a_warning_not_an_error(tmp_path: Path) -> None:
    p = cfg(username="u", password_file=str(tmp_path / "pw"))
    assert p.warnings() == ["platform.password_file: the password would be sent in plaintext: set tls = true"]
    assert cfg(tls=True, username="u", password_file=str(tmp_path / "pw")).warnings() == []

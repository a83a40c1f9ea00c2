"""Broker addresses (``mqtt://host:port``, ``mqtts://host:port``) and the paho clients of the tools.

Every platform-side client is MQTT 5 with a clean session: the tools and the ingest workers
keep nothing on the broker (the cabinets' persistent sessions are where the backlog lives).
Callbacks are the caller's; ``suppress_exceptions`` keeps a bug in one from killing paho's
network thread.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.errors import AgentError
from agent.mqtt_link import set_no_delay

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


class BrokerUrlError(AgentError, ValueError):
    """A broker address that is not ``mqtt://host:port`` or ``mqtts://host:port``."""


@dataclass(frozen=True)
class TlsFiles:
    """``--ca-file``, ``--cert-file``, ``--key-file``: used for ``mqtts://`` brokers."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class BrokerUrl:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, text: str) -> BrokerUrl:
        parts = urlsplit(text)
        if parts.scheme not in DEFAULT_PORTS:
            raise BrokerUrlError(f"broker {text!r}: the scheme must be mqtt:// or mqtts://")
        try:
            port = parts.port or DEFAULT_PORTS[parts.scheme]
        except ValueError:
            raise BrokerUrlError(f"broker {text!r}: the port is not a number from 1 to 65535") from None
        if not parts.hostname:
            raise BrokerUrlError(f"broker {text!r}: no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise BrokerUrlError(f"broker {text!r}: nothing may follow host:port")
        return cls(parts.hostname, port, parts.scheme == "mqtts")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def new_client(client_id: str, broker: BrokerUrl, tls: TlsFiles | None = None, *,
               manual_ack: bool = False) -> mqtt.Client:
    """An MQTT 5 paho client for ``broker`` (not yet connected)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                         manual_ack=manual_ack)
    client.suppress_exceptions = True
    client.on_socket_open = set_no_delay
    if broker.tls:
        files = tls or TlsFiles()
        client.tls_set(ca_certs=files.ca_file, certfile=files.cert_file, keyfile=files.key_file,
                       cert_reqs=ssl.CERT_REQUIRED)
    return client

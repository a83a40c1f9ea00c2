"""paho's Client with the socket behaviour the platform link needs, and nothing else.

Two things paho does not do, both on the read side of the socket:

- **Large PUBLISH bodies are streamed, never held.** paho reads a whole packet into one
  bytearray and slices it into new bytes objects (about three times a payload at the peak); a
  national catalog snapshot is hundreds of MB. Here a PUBLISH larger than ``spool_above`` is
  read in 1 MiB chunks into a file the link provides (or discarded as it is read, when the link
  says it is too large or a redelivery it does not need), and the link is told when it is
  complete. Smaller packets take paho's own path unchanged.
- **Immediate TCP ACKs.** ``quickack()`` sets TCP_QUICKACK, which sends an ACK the kernel has
  delayed and leaves its "interactive" delayed-ACK mode. The link calls it after every read
  and write: a broker without ``set_tcp_nodelay`` (Mosquitto's default) holds its next small
  packet to us (the next command) until our ACK for the previous one (a PUBACK) arrives, and a
  delayed ACK is 40 ms.

This overrides paho internals (``_packet_read``, ``_in_packet``, ``_sock``): the project pins
paho-mqtt 2.x, and tests/component/test_mqtt_link_client.py exercises both paths against a real
broker so that a paho upgrade that changes them fails loudly.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import paho.mqtt.client as mqtt
from paho.mqtt.client import MQTTErrorCode

log = logging.getLogger(__name__)

SPOOL_ABOVE = 1 << 20
"""PUBLISH packets larger than this (1 MiB) are streamed; commands and acks are far smaller."""

_CHUNK = 1 << 20
_CHUNKS_PER_CALL = 64   # then give the loop a turn: writes, keepalive, the handoff queue
_HEADER_MAX = 65_535 + 2 + 2 + (1 << 20)  # topic, packet id, MQTT 5 properties (bounded by us)
_PUBLISH = 0x30
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
QUICKACK = os.environ.get("CABINET_AGENT_QUICKACK", "1") != "0"
"""On unless the environment says ``CABINET_AGENT_QUICKACK=0``: a diagnostic switch, so that
``scripts/bench_unlock.py --no-quickack`` can show what the option is worth."""


@dataclass
class LargePublish:
    """A large PUBLISH as soon as its header is read; ``size`` is the payload's length."""

    topic: str | None   # None when the topic is not valid UTF-8
    mid: int
    qos: int
    dup: bool
    retain: bool
    size: int


BeginLarge = Callable[[LargePublish], BinaryIO | None]
EndLarge = Callable[[LargePublish, BinaryIO | None, bool], None]


class _Large:
    """Read state of one large PUBLISH."""

    def __init__(self, command: int, remaining: int) -> None:
        self.command = command
        self.remaining = remaining
        self.header = bytearray()
        self.msg: LargePublish | None = None
        self.left = 0
        self.sink: BinaryIO | None = None
        self.write_failed = False


def _fresh_in_packet() -> dict[str, Any]:
    return {"command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1,
            "remaining_length": 0, "packet": bytearray(b""), "to_process": 0, "pos": 0}


def header_length(buf: bytes | bytearray, qos: int, v5: bool) -> int:
    """Bytes of a PUBLISH variable header, or how many are needed to tell (a lower bound).

    Raises ValueError on a malformed property length.
    """
    if len(buf) < 2:
        return 2
    n = 2 + int.from_bytes(buf[0:2], "big") + (2 if qos else 0)
    if not v5:
        return n
    length, mult, i = 0, 1, n
    while True:
        if i >= len(buf):
            return i + 1
        byte = buf[i]
        length += (byte & 0x7F) * mult
        mult *= 128
        i += 1
        if not byte & 0x80:
            return i + length
        if i - n >= 4:
            raise ValueError("property length longer than 4 bytes")


class LinkClient(mqtt.Client):
    """A paho Client whose large PUBLISH bodies go to ``begin_large``'s file (see the module doc)."""

    def __init__(self, *args: Any, begin_large: BeginLarge, end_large: EndLarge,
                 spool_above: int = SPOOL_ABOVE, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._begin_large = begin_large
        self._end_large = end_large
        self.spool_above = spool_above
        self._large: _Large | None = None
        self._chunk: bytearray | None = None  # only while a large message is read (a fleet has many links)

    # -- TCP ------------------------------------------------------------------------------------
    def quickack(self) -> None:
        """Send a delayed ACK now and leave the kernel's interactive (delayed-ACK) mode."""
        sock = cast(socket.socket | None, self._sock)
        if sock is None or _TCP_QUICKACK is None or not QUICKACK:
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        except (OSError, AttributeError, ValueError):
            pass

    # -- reading ---------------------------------------------------------------------------------
    def reconnect(self) -> MQTTErrorCode:
        self.abort_large()
        return super().reconnect()

    def abort_large(self) -> None:
        """Forget a large PUBLISH cut short by a lost connection (the broker sends it again)."""
        large, self._large = self._large, None
        self._chunk = None
        if large is not None and large.sink is not None:
            log.info("connection lost %d bytes into a %d-byte message; it is dropped",
                     large.remaining - large.left, large.remaining)
            try:
                large.sink.close()
            except OSError:
                pass

    def _packet_read(self) -> MQTTErrorCode:
        if self._large is not None:
            return self._read_large()
        packet = self._in_packet
        if packet["command"] == 0 or not packet["have_remaining"]:
            rc = self._read_fixed_header()
            if rc is not None:
                return rc
        if (packet["command"] & 0xF0) == _PUBLISH and packet["remaining_length"] > self.spool_above:
            self._large = _Large(packet["command"], packet["remaining_length"])
            return self._read_large()
        return super()._packet_read()  # paho skips the header it finds already read

    def _recv(self, n: int) -> bytes | MQTTErrorCode:
        try:
            data = self._sock_recv(n)
        except BlockingIOError:
            return MQTTErrorCode.MQTT_ERR_AGAIN
        except OSError as exc:
            log.debug("receive failed: %s", exc)
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        if not data:
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        return data

    def _read_fixed_header(self) -> MQTTErrorCode | None:
        """paho's own reading of the command byte and the remaining length (resumable)."""
        packet = self._in_packet
        if packet["command"] == 0:
            data = self._recv(1)
            if isinstance(data, MQTTErrorCode):
                return data
            packet["command"] = data[0]
        while not packet["have_remaining"]:
            data = self._recv(1)
            if isinstance(data, MQTTErrorCode):
                return data
            byte = data[0]
            packet["remaining_count"].append(byte)
            if len(packet["remaining_count"]) > 4:
                return MQTTErrorCode.MQTT_ERR_PROTOCOL
            packet["remaining_length"] += (byte & 127) * packet["remaining_mult"]
            packet["remaining_mult"] *= 128
            if not byte & 128:
                packet["have_remaining"] = 1
                packet["to_process"] = packet["remaining_length"]
        return None

    def _read_large(self) -> MQTTErrorCode:
        large = self._large
        assert large is not None
        if large.msg is None:
            rc = self._read_large_header(large)
            if rc is not None:
                return rc
        if self._chunk is None:
            self._chunk = bytearray(_CHUNK)
        view = memoryview(self._chunk)
        for _ in range(_CHUNKS_PER_CALL):
            if large.left == 0:
                break
            try:
                n = self._recv_into(view[:min(len(view), large.left)])
            except BlockingIOError:
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError as exc:
                log.debug("receive failed: %s", exc)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            if n == 0:
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            if large.sink is not None:
                try:
                    large.sink.write(view[:n])
                except OSError as exc:
                    log.error("cannot spool a %d-byte message: %s; it is dropped", large.remaining, exc)
                    large.sink.close()
                    large.sink, large.write_failed = None, True
            large.left -= n
            self._touch()
        view.release()
        if large.left:
            return MQTTErrorCode.MQTT_ERR_AGAIN
        self._large = None
        self._chunk = None
        self._in_packet = cast(Any, _fresh_in_packet())
        assert large.msg is not None
        self._end_large(large.msg, large.sink, large.write_failed)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _read_large_header(self, large: _Large) -> MQTTErrorCode | None:
        qos = (large.command & 0x06) >> 1
        v5 = self._protocol == mqtt.MQTTv5
        while True:
            try:
                need = header_length(large.header, qos, v5)
            except ValueError:
                return MQTTErrorCode.MQTT_ERR_PROTOCOL
            if need > large.remaining or need > _HEADER_MAX:
                return MQTTErrorCode.MQTT_ERR_PROTOCOL
            if len(large.header) >= need:
                break
            data = self._recv(need - len(large.header))
            if isinstance(data, MQTTErrorCode):
                return data
            large.header += data
            self._touch()
        header = bytes(large.header)
        topic_len = int.from_bytes(header[0:2], "big")
        try:
            topic: str | None = header[2:2 + topic_len].decode("utf-8")
        except UnicodeDecodeError:
            topic = None
        mid = int.from_bytes(header[2 + topic_len:4 + topic_len], "big") if qos else 0
        large.msg = LargePublish(topic, mid, qos, bool(large.command & 0x08), bool(large.command & 0x01),
                                 large.remaining - len(header))
        large.left = large.msg.size
        large.sink = self._begin_large(large.msg)
        return None

    def _recv_into(self, view: memoryview) -> int:
        sock = cast(socket.socket | None, self._sock)
        if sock is None:
            raise ConnectionError("no socket")
        try:
            return sock.recv_into(view)
        except ssl.SSLWantReadError as exc:
            raise BlockingIOError() from exc
        except ssl.SSLWantWriteError as exc:
            self._call_socket_register_write()
            raise BlockingIOError() from exc

    def _touch(self) -> None:
        """What paho does after every read: the keepalive counts from the last byte received."""
        with self._msgtime_mutex:
            self._last_bytes_received = mqtt.time_func()

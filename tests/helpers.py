"""Small helpers shared by the tests of every part (import: ``from helpers import wait_until``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import paho.mqtt.client as mqtt

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.01) -> T:
    """Poll ``predicate`` until it returns something truthy and return that; AssertionError naming ``what``.

    For conditions nobody notifies about (a file appearing, a process state). Prefer a
    notifying wait (``ReferencePlatform.wait_for``, a ``queue.Queue.get``) where one exists.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def subscriber(host: str, port: int, client_id: str, topic: str | list[str],
               on_message: Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None]) -> mqtt.Client:
    """A bystander MQTT 5 client: connected, its network loop running, subscribed to ``topic`` (one or
    several, QoS 1) before it is returned. Stop it with ``disconnect()`` and ``loop_stop()``."""
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect(host, port)
    client.loop_start()
    client.subscribe([(t, 1) for t in ([topic] if isinstance(topic, str) else topic)])
    if not subscribed.wait(10):
        client.loop_stop()
        raise AssertionError(f"{client_id}: not subscribed to {topic} within 10 s")
    return client

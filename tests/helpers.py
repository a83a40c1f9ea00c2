"""Small helpers shared by the tests of every part (import: ``from helpers import wait_until``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

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

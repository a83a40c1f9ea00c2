"""Shared fixtures: a private broker per test, the platform's signing key, reference platforms."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The project is not pip-installed into the venv: make ``import agent`` (and
# ``import tests.helpers``) work however pytest is launched.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from agent.platform.refplatform import ReferencePlatform  # noqa: E402
from agent.sim.broker import PrivateBroker  # noqa: E402

RefPlatformFactory = Callable[..., ReferencePlatform]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    """A fresh Mosquitto on a free port; its log stays in the test's tmp_path for post-mortems."""
    b = PrivateBroker(log_dir=tmp_path / "broker-log")
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def platform_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def refplatform(broker: PrivateBroker, platform_key: Ed25519PrivateKey) -> Iterator[RefPlatformFactory]:
    """``refplatform(cabinet_id="CAB-0001", **kw)`` -> a started ReferencePlatform on ``broker``.

    Signs with ``platform_key`` unless ``private_key=`` is given; every platform made is stopped after the test.
    """
    made: list[ReferencePlatform] = []

    def make(cabinet_id: str = "CAB-0001", **kw: Any) -> ReferencePlatform:
        kw.setdefault("private_key", platform_key)
        platform = ReferencePlatform(broker.host, broker.port, cabinet_id, **kw)
        made.append(platform)
        return platform.start()

    try:
        yield make
    finally:
        for platform in made:
            platform.stop()

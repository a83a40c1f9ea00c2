"""Helpers of the camera tests: hiding a decoder library from a process we start.

A directory put first on ``PYTHONPATH`` holding a package of the library's name that
raises ImportError on import: the process then sees the library as not installed, as on a
cabinet without ``libzbar0`` or without a zxing-cpp wheel.
"""

from __future__ import annotations

import os
from pathlib import Path

MODULES = {"zbar": "pyzbar", "zxing": "zxingcpp"}


def hiding(folder: Path, *decoders: str) -> str:
    """Create the shim directory in ``folder`` for ``decoders`` ("zbar", "zxing"); returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in decoders:
        pkg = folder / MODULES[name]
        pkg.mkdir(exist_ok=True)
        (pkg / "__init__.py").write_text(
            f'raise ImportError("{MODULES[name]} hidden by a test (as if not installed)")\n')
    return str(folder)


def env_hiding(folder: Path, *decoders: str) -> dict[str, str]:
    """``os.environ`` with the shim of ``decoders`` first on PYTHONPATH."""
    shim = hiding(folder, *decoders)
    path = os.pathsep.join(p for p in (shim, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path)

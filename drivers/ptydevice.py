"""A stable name for a simulator's pty: a symlink a config can name (``/tmp/cabinet-sim/lockboard``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def pty_symlink(target: str, link: str | None) -> Iterator[None]:
    """Point ``link`` at ``target`` while the block runs (no-op when ``link`` is None)."""
    if not link:
        yield
        return
    path = Path(link)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if os.readlink(path) == target:
                path.unlink()

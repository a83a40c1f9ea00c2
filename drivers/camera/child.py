"""The camera's child process: ``python -m drivers.camera.child CONFIG_JSON``.

zbar and zxing-cpp are native code and both have had double frees and aborts; a crash or a
hang in them must not take the daemon (and a shopper's session) down. So the camera -- its
source, the barcode pipeline, the decode scheduler -- lives here, and the daemon's
``CameraScanner`` supervises it. Frames stay in this process; what crosses is one JSON
object per line (``loop`` lists them) on the file descriptor named in the config. The
child stops when its stdin reaches end of file (the parent closed it, or died), and asks
the kernel to SIGKILL it if the parent dies while it is stuck in native code.

CONFIG_JSON: ``{"source", "fps", "msg_fd", "stall_s", "max_backoff_s", "start", "t0",
"skip_unchanged", "beat_s", "log_level"}``.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

log = logging.getLogger("drivers.camera.child")


class Pipe:
    """Writes messages as JSON lines; a broken pipe (the parent is gone) stops the child."""

    def __init__(self, fd: int, stop: threading.Event) -> None:
        self._out = os.fdopen(fd, "w", buffering=1, encoding="utf-8")
        self._stop = stop
        self._lock = threading.Lock()

    def __call__(self, msg: dict[str, Any]) -> None:
        line = json.dumps(msg, ensure_ascii=False, separators=(",", ":"))
        with self._lock:
            try:
                self._out.write(line + "\n")
            except (BrokenPipeError, OSError, ValueError):
                self._stop.set()


def _watch_stdin(stop: threading.Event) -> None:
    """The parent closes our stdin to stop us (or it died): either way, stop."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    stop.set()


def _die_with_parent() -> None:
    """Linux: SIGKILL us when the supervising thread's process dies (PR_SET_PDEATHSIG), even
    mid-decode: there is nothing to clean up here, and nobody would read our scans."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: stdin EOF still stops us between frames
        pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg = json.loads(args[0])
    logging.basicConfig(level=getattr(logging, str(cfg.get("log_level", "INFO")).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s camera[%(process)d] %(name)s: %(message)s",
                        stream=sys.stderr)
    _die_with_parent()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the daemon's to handle
    threading.Thread(target=_watch_stdin, args=(stop,), name="stdin-watch", daemon=True).start()
    emit = Pipe(int(cfg["msg_fd"]), stop)

    from drivers.camera.loop import CameraLoop
    from drivers.camera.schedule import DecodeScheduler

    loop = CameraLoop(cfg["source"], float(cfg["fps"]), emit, stop,
                      scheduler=DecodeScheduler(enabled=bool(cfg.get("skip_unchanged", True))),
                      stall_s=float(cfg.get("stall_s", 5.0)), max_backoff_s=float(cfg.get("max_backoff_s", 10.0)),
                      start=int(cfg.get("start", 0)), t0=cfg.get("t0"), beat_s=float(cfg.get("beat_s", 1.0)))
    log.info("camera process for %s started", cfg["source"])
    loop.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

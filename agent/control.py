"""The control socket: a Unix stream socket speaking JSON lines, for ``cabinetctl``.

A request is one line ``{"cmd": ..., "args": {...}}`` (optionally with a file descriptor
passed alongside, SCM_RIGHTS, for ``catalog install``); the answer is zero or more
``{"progress": ...}`` lines and one final ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "...", "exit": 1}`` line. Each connection gets a short-lived thread;
the work itself is done by the handler (the core, through its inbox).
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024

# handler(cmd, args, fds, peer_user, send_progress) -> result dict; raises ControlFailure
Handler = Callable[[str, dict[str, Any], list[int], str, Callable[[Any], None]], Any]


class ControlFailure(Exception):
    """The operation was refused or failed; ``exit_code`` is what cabinetctl exits with."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def peer_user(conn: socket.socket) -> str:
    """The operator's login name from the socket's peer credentials (for service events)."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return pwd.getpwuid(uid).pw_name
    except (OSError, KeyError):
        return "unknown"


class ControlServer:
    def __init__(self, path: str, handler: Handler) -> None:
        self.path = Path(path)
        self.handler = handler
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
                raise RuntimeError(f"another agent is already listening on {self.path}")
            except (ConnectionRefusedError, FileNotFoundError):
                self.path.unlink(missing_ok=True)
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o660)
        sock.listen(16)
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._thread.start()
        log.info("control socket listening on %s", self.path)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread:
            self._thread.join(2.0)
        if self._sock:
            self._sock.close()
        self.path.unlink(missing_ok=True)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("control socket accept failed")
                continue
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        fds: list[int] = []
        with conn:
            conn.settimeout(None)

            def send(obj: Any) -> None:
                conn.sendall(json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n")

            try:
                data, fds = self._read_request(conn)
                try:
                    req = json.loads(data.decode("utf-8"))
                    cmd = req["cmd"]
                    args = req.get("args") or {}
                    if not isinstance(cmd, str) or not isinstance(args, dict):
                        raise TypeError
                except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                    send({"ok": False, "error": "malformed request", "exit": 2})
                    return
                try:
                    result = self.handler(cmd, args, fds, peer_user(conn), lambda p: send({"progress": p}))
                    send({"ok": True, "result": result})
                except ControlFailure as exc:
                    send({"ok": False, "error": str(exc), "exit": exc.exit_code})
                except Exception as exc:  # noqa: BLE001 - report, never kill the daemon
                    log.exception("control command %s failed", cmd)
                    send({"ok": False, "error": f"internal error: {exc}", "exit": 1})
            except (BrokenPipeError, ConnectionResetError):
                log.info("cabinetctl went away before the answer")
            finally:
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass

    @staticmethod
    def _read_request(conn: socket.socket) -> tuple[bytes, list[int]]:
        buf = b""
        fds: list[int] = []
        while b"\n" not in buf and len(buf) < MAX_REQUEST:
            msg, got_fds, _flags, _addr = socket.recv_fds(conn, 4096, 4)
            fds.extend(got_fds)
            if not msg:
                break
            buf += msg
        return buf.split(b"\n", 1)[0], fds


def request(path: str, cmd: str, args: dict[str, Any] | None = None, *, fds: list[int] | None = None,
            on_progress: Callable[[Any], None] | None = None, timeout_s: float | None = 30.0) -> dict[str, Any]:
    """Client side (cabinetctl): send one request, return the final answer object."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    with sock:
        sock.connect(path)
        line = json.dumps({"cmd": cmd, "args": args or {}}).encode("utf-8") + b"\n"
        if fds:
            socket.send_fds(sock, [line], fds)
        else:
            sock.sendall(line)
        reader = sock.makefile("rb")
        for raw in reader:
            msg = json.loads(raw)
            if "progress" in msg and on_progress is not None:
                on_progress(msg["progress"])
            elif "ok" in msg:
                return msg
        raise ConnectionError("the daemon closed the connection without an answer")

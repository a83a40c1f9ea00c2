"""The control socket: a Unix stream socket speaking JSON lines, for ``cabinetctl``.

A request is one line ``{"cmd": ..., "args": {...}}`` (optionally with a file descriptor
passed alongside, SCM_RIGHTS, for ``catalog install``); the answer is zero or more
``{"progress": ...}`` lines and one final ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "...", "exit": 1}`` line. Each connection gets a short-lived thread;
the work itself is done by the handler (the core, through its inbox).

Nothing a client does holds a thread for long: the request line must arrive within
``REQUEST_TIMEOUT_S``, an answer that cannot be delivered within ``SEND_TIMEOUT_S`` ends the
connection, and at most ``MAX_CONNECTIONS`` are served at once (the next ones are told so).
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.errors import AgentError

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
MAX_FDS = 4                 # file descriptors accepted with one request (catalog install passes one)
REQUEST_TIMEOUT_S = 5.0     # cabinetctl sends its request line right after connecting
SEND_TIMEOUT_S = 10.0       # an answer line cabinetctl does not take this long: it is gone
MAX_CONNECTIONS = 16        # served at once; each may wait (a restock scan, an install) for minutes
BUSY_LOG_EVERY_S = 60.0
BUSY_DRAIN_S = 0.2          # a refused client's request is read (briefly) so that closing does not reset it

# handler(cmd, args, fds, peer_user, send_progress) -> result dict; raises ControlFailure
Handler = Callable[[str, dict[str, Any], list[int], str, Callable[[Any], None]], Any]


class ControlSocketInUse(AgentError):
    """Another agent answers on the control socket's path: we must not take it over."""


class ControlSocketPathTaken(AgentError):
    """Something that is not a socket sits at the control socket's path: it is never removed
    (set control_socket to the ledger's path and the ledger must survive)."""


class ControlFailure(Exception):
    """The operation was refused or failed; ``exit_code`` is what cabinetctl exits with."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _RequestTimeout(Exception):
    """The client sent no complete request line in time."""


def peer_user(conn: socket.socket) -> str:
    """The operator's login name from the socket's peer credentials (for service events)."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return pwd.getpwuid(uid).pw_name
    except (OSError, KeyError):
        return "unknown"


def _kind_of(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "not a socket"


def _drain(conn: socket.socket) -> None:
    """Read what the client sent, up to its request line: a socket closed with unread data
    resets the connection, and the client would miss the answer it was given."""
    received = 0
    while received < MAX_REQUEST:
        chunk = conn.recv(4096)
        if not chunk or b"\n" in chunk:
            return
        received += len(chunk)


def _line(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"


class ControlServer:
    def __init__(self, path: str, handler: Handler, *, max_connections: int = MAX_CONNECTIONS,
                 request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.handler = handler
        self.request_timeout_s = request_timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._bound: tuple[int, int] | None = None   # (st_dev, st_ino) of the socket file we made
        self._last_busy_log = -1e9

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Listen on ``path``; ControlSocketInUse / ControlSocketPathTaken (one line) if we must not."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ControlSocketPathTaken(
                f"cannot create the directory of the control socket {self.path}: {exc.strerror or exc}") from None
        self._remove_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            st = os.lstat(self.path)
            self._bound = (st.st_dev, st.st_ino)
            os.chmod(self.path, 0o660)
            sock.listen(MAX_CONNECTIONS)
        except OSError as exc:
            sock.close()
            self._remove_own_socket()
            raise ControlSocketPathTaken(f"cannot listen on the control socket {self.path}: {exc.strerror or exc}") \
                from None
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._thread.start()
        log.info("control socket listening on %s", self.path)

    def _remove_stale_socket(self) -> None:
        """Only a socket that no daemon answers on is removed; anything else at the path is refused."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ControlSocketPathTaken(f"cannot use the control socket path {self.path}: {exc.strerror or exc}") \
                from None
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketPathTaken(
                f"control_socket {self.path} is {_kind_of(st.st_mode)}, not a socket: refusing to remove it "
                "(fix cabinet.control_socket)")
        if self._answers():
            raise ControlSocketInUse(f"another agent is already listening on {self.path}")
        log.info("removing the stale control socket %s", self.path)
        self.path.unlink(missing_ok=True)

    def _answers(self) -> bool:
        """Whether some process accepts connections on the socket at ``path``."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
            return True
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as exc:
            raise ControlSocketPathTaken(f"cannot probe the control socket {self.path}: {exc.strerror or exc}") \
                from None
        finally:
            probe.close()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread:
            self._thread.join(2.0)
        if self._sock:
            self._sock.close()
        self._remove_own_socket()

    def _remove_own_socket(self) -> None:
        """Unlink the socket file we bound, and nothing that may have replaced it."""
        if self._bound is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._bound and stat.S_ISSOCK(st.st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the control socket %s: %s", self.path, exc)
        self._bound = None

    # -- connections -------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("control socket accept failed")
                continue
            self._dispatch(conn)

    def _dispatch(self, conn: socket.socket) -> None:
        """Serve ``conn`` in its own thread if a slot is free; otherwise say we are busy."""
        if not self._slots.acquire(blocking=False):
            self._refuse_busy(conn)
            return
        try:
            threading.Thread(target=self._serve_slot, args=(conn,), name="control-conn", daemon=True).start()
        except RuntimeError:   # no thread can be started
            self._slots.release()
            self._refuse_busy(conn)

    def _refuse_busy(self, conn: socket.socket) -> None:
        now = time.monotonic()
        if now - self._last_busy_log >= BUSY_LOG_EVERY_S:
            self._last_busy_log = now
            log.warning("control socket: %d connections are being served; refusing more", MAX_CONNECTIONS)
        with conn:
            conn.settimeout(BUSY_DRAIN_S)
            try:
                conn.sendall(_line({"ok": False, "exit": 1,
                                    "error": "the daemon is serving too many cabinetctl connections; try again"}))
                conn.shutdown(socket.SHUT_WR)
                _drain(conn)
            except OSError:
                pass

    def _serve_slot(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        finally:
            self._slots.release()

    def _serve(self, conn: socket.socket) -> None:
        fds: list[int] = []
        with conn:
            def send(obj: Any) -> None:
                conn.sendall(_line(obj))

            try:
                data, fds = self._read_request(conn, time.monotonic() + self.request_timeout_s)
                conn.settimeout(SEND_TIMEOUT_S)
                self._answer(data, fds, conn, send)
            except _RequestTimeout:
                log.info("control connection sent no request within %.0f s: closed", self.request_timeout_s)
                try:
                    conn.settimeout(1.0)
                    send({"ok": False, "error": f"no request within {self.request_timeout_s:.0f} s", "exit": 2})
                except OSError:
                    pass
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                log.info("cabinetctl went away before the answer")
            except OSError as exc:
                log.warning("control connection failed: %s", exc)
            finally:
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass

    def _answer(self, data: bytes, fds: list[int], conn: socket.socket, send: Callable[[Any], None]) -> None:
        try:
            req = json.loads(data.decode("utf-8"))
            cmd = req["cmd"]
            args = req.get("args") or {}
            if not isinstance(cmd, str) or not isinstance(args, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            send({"ok": False, "error": "malformed request", "exit": 2})
            return
        try:
            result = self.handler(cmd, args, fds, peer_user(conn), lambda p: send({"progress": p}))
        except ControlFailure as exc:
            send({"ok": False, "error": str(exc), "exit": exc.exit_code})
            return
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            raise
        except Exception as exc:  # noqa: BLE001 - report, never kill the daemon
            log.exception("control command %s failed", cmd)
            send({"ok": False, "error": f"internal error: {exc}", "exit": 1})
            return
        send({"ok": True, "result": result})

    @staticmethod
    def _read_request(conn: socket.socket, deadline: float) -> tuple[bytes, list[int]]:
        """The request line and the descriptors passed with it; _RequestTimeout after ``deadline``."""
        buf = b""
        fds: list[int] = []
        try:
            while b"\n" not in buf and len(buf) < MAX_REQUEST:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _RequestTimeout
                conn.settimeout(remaining)
                try:
                    msg, got_fds, _flags, _addr = socket.recv_fds(conn, 4096, MAX_FDS)
                except TimeoutError:
                    raise _RequestTimeout from None
                fds.extend(got_fds)
                if not msg:
                    break
                buf += msg
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return buf.split(b"\n", 1)[0], fds


def request(path: str, cmd: str, args: dict[str, Any] | None = None, *, fds: list[int] | None = None,
            on_progress: Callable[[Any], None] | None = None, timeout_s: float | None = 30.0) -> dict[str, Any]:
    """Client side (cabinetctl): send one request, return the final answer object."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    with sock:
        sock.connect(path)
        line = json.dumps({"cmd": cmd, "args": args or {}}).encode("utf-8") + b"\n"
        try:
            if fds:
                socket.send_fds(sock, [line], fds)
            else:
                sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError):
            pass   # refused at once (too many connections): its answer may still be there to read
        reader = sock.makefile("rb")
        for raw in reader:
            msg = json.loads(raw)
            if not isinstance(msg, dict):
                raise ConnectionError(f"the daemon answered something that is not an object: {raw[:80]!r}")
            if "progress" in msg and on_progress is not None:
                on_progress(msg["progress"])
            elif "ok" in msg:
                answer: dict[str, Any] = msg
                return answer
        raise ConnectionError("the daemon closed the connection without an answer")

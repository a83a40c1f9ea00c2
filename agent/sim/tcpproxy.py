"""A small TCP proxy that counts bytes and can cut every connection: the 4G link of the tests.

``TcpProxy(upstream_host, upstream_port)`` listens on a free local port; each accepted client
gets its own upstream connection and two pump threads. ``down_bytes`` counts what the upstream
(the broker) sent the clients, ``up_bytes`` what the clients sent; ``captured_up`` keeps the
first bytes each client sent (to prove nothing went out in plaintext). ``cut()`` closes every
open connection, as a dropped mobile link would; the proxy keeps accepting new ones, unless
``refusing`` is set (then each new connection is closed at once).
"""

from __future__ import annotations

import logging
import socket
import threading
from types import TracebackType

log = logging.getLogger(__name__)

_CAPTURE = 64 * 1024


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server((host, 0))
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Condition()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self.down_bytes = 0
        self.up_bytes = 0
        self.connections = 0
        self.captured_up = bytearray()
        self._closed = False
        self.refusing = False  # True: accept and close at once, as a link without coverage would
        self._accepter = threading.Thread(target=self._accept, name="tcpproxy", daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()  # the link is down: connections fail at once
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError as exc:
                log.info("proxy: upstream %s:%d refused: %s", *self.upstream, exc)
                client.close()
                continue
            for s in (client, upstream):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._pairs.append((client, upstream))
                self.connections += 1
                self._lock.notify_all()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                with self._lock:
                    if down:
                        self.down_bytes += len(data)
                    else:
                        self.up_bytes += len(data)
                        room = _CAPTURE - len(self.captured_up)
                        if room > 0:
                            self.captured_up += data[:room]
                    self._lock.notify_all()
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> int:
        """Close every open connection (both sides); returns how many were cut."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        return len(pairs)

    def wait_connections(self, n: int, timeout: float) -> None:
        """Until ``n`` connections were accepted in total; TimeoutError otherwise."""
        with self._lock:
            if not self._lock.wait_for(lambda: self.connections >= n, timeout):
                raise TimeoutError(f"proxy: {self.connections} connections, not {n}, within {timeout} s")

    def close(self) -> None:
        with self._lock:
            self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (close alone does not)
        except OSError:
            pass
        self._listener.close()
        self.cut()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

"""A received message body handed from the link to the thread that owns it (the catalog worker).

A catalog snapshot can be hundreds of MB: the link streams a large PUBLISH from the socket into
an unnamed temporary file (O_TMPFILE: a crash leaves nothing behind) and hands over that file,
never the bytes; a small one stays in memory. Either way the document carries the release of
its MQTT acknowledgement: mqtt.md v1.1 acknowledges a catalog document once it is installed or
rejected, so the broker delivers it again if the agent dies before.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Callable
from typing import BinaryIO

log = logging.getLogger(__name__)


class Document:
    """One message body: in memory (``data``) or in an open unnamed file (``file``)."""

    def __init__(self, topic: str, *, data: bytes | None = None, file: BinaryIO | None = None, size: int | None = None,
                 release: Callable[[], None] | None = None) -> None:
        if (data is None) == (file is None):
            raise ValueError("a document is either in memory or in a file")
        self.topic = topic
        self._data = data
        self._file = file
        self.size = len(data) if data is not None else int(size or 0)
        self._release = release
        self._lock = threading.Lock()
        self._done = False

    @classmethod
    def from_bytes(cls, topic: str, data: bytes, release: Callable[[], None] | None = None) -> Document:
        return cls(topic, data=data, release=release)

    @property
    def in_memory(self) -> bool:
        return self._data is not None

    @property
    def data(self) -> bytes | None:
        return self._data

    def __len__(self) -> int:
        return self.size

    def open(self) -> BinaryIO:
        """A new reader from the start (each install pass opens its own)."""
        if self._data is not None:
            return io.BytesIO(self._data)
        assert self._file is not None
        reader = os.fdopen(os.dup(self._file.fileno()), "rb")
        reader.seek(0)
        return reader

    def read(self) -> bytes:
        """The whole body as bytes (only for the code paths that need bytes: small documents)."""
        if self._data is not None:
            return self._data
        with self.open() as f:
            return f.read()

    def finish(self) -> None:
        """Done with it (installed, rejected, superseded or dropped): acknowledge it, free the file.

        Idempotent and thread-safe; the acknowledgement itself is sent by the link's thread.
        """
        with self._lock:
            if self._done:
                return
            self._done = True
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                log.warning("closing the spool of %s: %s", self.topic, exc)
        self._data = None
        if self._release is not None:
            self._release()

    def __repr__(self) -> str:
        where = "memory" if self.in_memory else "spool file"
        return f"Document({self.topic!r}, {self.size} bytes in {where})"

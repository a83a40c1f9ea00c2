"""Open a WAL-mode SQLite file for reading only, as a user who may not write its directory.

``cabinetctl sales``, ``verify`` and ``export`` read the ledger and must never write it
(operations.md v1.1), also for an operator who can only read ``data_dir``. SQLite's
``mode=ro`` is not enough for that: a reader of a WAL database needs the ``-shm`` index
beside it, and creates it when it is missing, which fails in a directory it cannot write
("attempt to write a readonly database"). So, in order:

1. ``mode=ro``: works whenever the ``-shm`` exists (the daemon runs, or was killed) or can be
   created (the user may write the directory).
2. No ``-wal`` with content (a clean shutdown checkpointed it and removed it): the main file is
   the whole database and is opened ``immutable=1``, which needs no ``-shm``.
3. A ``-wal`` with content but no usable ``-shm`` (a daemon that was killed, then the index
   was lost): the file and its ``-wal`` are copied into a private temporary directory and read
   there, so that no committed record in the ``-wal`` is missed.

Cases 2 and 3 read a snapshot: they are meant for a stopped daemon (a running one keeps its
``-wal`` and ``-shm``, so case 1 applies to it).
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_NEEDS_INDEX = {sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN}   # primary result codes


class ReadOnlyOpenError(Exception):
    """The database cannot be read; the message says why, in one line."""


class ReadOnlyDatabase:
    """A read-only connection to ``path`` (``conn``); ``close()`` also removes a private copy."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._copy_dir: tempfile.TemporaryDirectory[str] | None = None
        self.conn = self._open()

    def close(self) -> None:
        self.conn.close()
        if self._copy_dir is not None:
            self._copy_dir.cleanup()
            self._copy_dir = None

    # -- the three ways in -----------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        if not self.path.exists():
            raise ReadOnlyOpenError(f"no database at {self.path}")
        if not os.access(self.path, os.R_OK):
            raise ReadOnlyOpenError(f"cannot read {self.path}: permission denied")
        try:
            return _connect(self.path, "mode=ro")
        except sqlite3.OperationalError as exc:
            if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) not in _NEEDS_INDEX:
                raise ReadOnlyOpenError(f"cannot read {self.path}: {exc}") from exc
            log.debug("%s: mode=ro needs a -shm we cannot create (%s)", self.path, exc)
        except sqlite3.DatabaseError as exc:
            raise ReadOnlyOpenError(f"cannot read {self.path}: {exc}") from exc
        wal = self.path.with_name(self.path.name + "-wal")
        if not _has_content(wal):
            return self._guarded(self.path, "mode=ro&immutable=1")
        return self._open_copy(wal)

    def _open_copy(self, wal: Path) -> sqlite3.Connection:
        """Read a private copy of the file and its ``-wal`` (committed records may be only there)."""
        self._copy_dir = tempfile.TemporaryDirectory(prefix="cabinet-ledger-read-")
        copy = Path(self._copy_dir.name) / self.path.name
        try:
            shutil.copyfile(self.path, copy)
            shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
        except OSError as exc:
            self._copy_dir.cleanup()
            self._copy_dir = None
            raise ReadOnlyOpenError(f"cannot read {wal.name} beside {self.path}: {exc.strerror or exc}") from None
        log.debug("%s: reading a private copy with its -wal in %s", self.path, copy.parent)
        return self._guarded(copy, "mode=ro")

    def _guarded(self, path: Path, params: str) -> sqlite3.Connection:
        try:
            return _connect(path, params)
        except sqlite3.DatabaseError as exc:
            raise ReadOnlyOpenError(f"cannot read {self.path}: {exc}") from exc


def _connect(path: Path, params: str) -> sqlite3.Connection:
    """A connection that has read the schema (SQLite opens lazily: errors show at the first read)."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?{params}", uri=True, isolation_level=None,
                           check_same_thread=False)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except BaseException:
        conn.close()
        raise
    return conn


def _has_content(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False

"""``--db``: a DSN to a store. ``sqlite:///PATH`` (SQLAlchemy style: ``sqlite:////abs/path.db``) is the
embedded default; ``postgresql://user@host:port/db`` scales out. psycopg is imported only for the latter."""

from __future__ import annotations

from pathlib import Path

from agent.platform.store import DsnError, Store


def open_store(dsn: str, *, create: bool = True) -> Store:
    """The store a DSN names; ``create`` makes the tables (else a missing SQLite file is an error)."""
    if dsn.startswith("sqlite:"):
        if not dsn.startswith("sqlite:///") or dsn == "sqlite:///":
            raise DsnError(f"{dsn!r}: a SQLite DSN is sqlite:///relative.db or sqlite:////absolute/path.db")
        from agent.platform.store_sqlite import SqliteStore

        return SqliteStore(Path(dsn[len("sqlite:///"):]), create=create)
    if dsn.startswith(("postgresql://", "postgres://")):
        from agent.platform.store_pg import PgStore

        return PgStore(dsn, create=create)
    raise DsnError(f"{dsn!r}: --db is sqlite:///PATH or postgresql://user@host:port/db")

"""Where the ingest keeps the feeds: the interface both databases implement (``agent.platform.dsn`` opens one).

The algorithm (what is a duplicate, a conflict, how far the chain is acked) lives in
``agent.platform.intake``; a store only does SQL. The contract a backend must keep:

- ``transaction()`` is one atomic, durable transaction (committed = on disk);
- ``StoreTx.lock(cabinets)`` serialises every writer of those cabinets until the commit
  (PostgreSQL: their rows ``FOR UPDATE`` in sorted order; SQLite: the database write lock),
  so whatever the transaction reads of a locked cabinet stays true until it commits, also
  with several workers on the same database;
- rows are written only for locked cabinets.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from agent.errors import AgentError
from agent.platform.chain import Rec

# (prev, hash) of a stored record, by seq
Links = dict[int, tuple[str, str]]


class StoreError(AgentError):
    """The database failed (unreachable, a lost connection, a failed statement)."""


class DsnError(StoreError, ValueError):
    """A ``--db`` value that is neither ``sqlite:///PATH`` nor a PostgreSQL URL."""


@dataclass
class CabinetState:
    """The ingest's row for a cabinet (the ``cabinets`` table, less the status)."""

    cabinet: str
    acked_upto: int = 0
    acked_hash: str = "0" * 64    # hash of record acked_upto (for a late start: the prev of its first record)
    chain_start: int = 1          # 1, or the seq from which a chain that starts late is acked
    gap_since: float | None = None    # epoch s: since when stored records wait above a missing one
    resend_at: float | None = None    # epoch s: the last resend asked for (by any worker)
    online: bool | None = None
    announced: int = 0            # the last_seq of its latest status: records it holds, here or not


@dataclass(frozen=True)
class Anomaly:
    cabinet: str
    seq: int | None
    kind: str      # conflict | broken_chain | starts_late
    detail: str


@dataclass(frozen=True)
class StatusUpdate:
    cabinet: str
    status_json: str          # canonical JSON of the status object
    online: bool | None
    received_at: str          # RFC 3339, the worker's clock: orders statuses across workers
    last_seq: int | None = None   # what the status says the cabinet holds


class StoreTx(ABC):
    """One open transaction."""

    @abstractmethod
    def lock(self, cabinets: Sequence[str]) -> dict[str, CabinetState]:
        """Lock the cabinets' rows (they exist: ``Store.ensure_cabinets``) and return them."""

    @abstractmethod
    def links(self, ranges: Sequence[tuple[str, int, int]]) -> dict[str, Links]:
        """Stored (prev, hash) of every record with ``lo <= seq <= hi``, per (cabinet, lo, hi)."""

    @abstractmethod
    def links_after(self, cabinet: str, after_seq: int, limit: int) -> list[tuple[int, str, str]]:
        """The first ``limit`` stored (seq, prev, hash) with seq > ``after_seq``, in seq order."""

    @abstractmethod
    def insert_records(self, rows: Sequence[tuple[str, Rec]], received_at: str) -> None:
        """Insert records known to be absent (the cabinets are locked and were checked)."""

    @abstractmethod
    def add_anomalies(self, anomalies: Sequence[Anomaly], at: str) -> None:
        """Record anomalies; one already recorded (same cabinet, seq, kind, detail) is not repeated."""

    @abstractmethod
    def save_states(self, states: Sequence[CabinetState], updated_at: str) -> None:
        """Write acked_upto, acked_hash, chain_start, gap_since and announced of locked cabinets."""

    @abstractmethod
    def save_statuses(self, updates: Sequence[StatusUpdate]) -> None:
        """Store each cabinet's last status unless a later-received one is stored already."""


class Store(ABC):
    """A database connection owned by one thread."""

    @abstractmethod
    def ensure_cabinets(self, cabinets: Sequence[str]) -> None:
        """Create missing ``cabinets`` rows (committed at once, outside any transaction)."""

    @abstractmethod
    @contextlib.contextmanager
    def transaction(self) -> Iterator[StoreTx]:
        """A durable transaction; an exception rolls it back (and is raised as StoreError)."""

    @abstractmethod
    def gapped(self) -> list[CabinetState]:
        """Cabinets with records missing above the acked point (stored above a hole, or announced)."""

    @abstractmethod
    def claim_resend(self, cabinet: str, now: float, every_s: float) -> bool:
        """True for the one worker that may ask ``cabinet`` for a resend now (at most once per ``every_s``)."""

    @abstractmethod
    def mark_busy(self, group: str, at: float) -> None:
        """Say that a worker of ``group`` had a backlog at ``at`` (wall clock, s); kept is the latest."""

    @abstractmethod
    def busy_at(self, group: str) -> float | None:
        """When a worker of ``group`` last said it had a backlog (None: never).

        A record missing at one worker is usually queued at another one that is behind: while any
        worker of the group drains a backlog, none asks for resends.
        """

    # -- the supervision report --------------------------------------------------------------
    @abstractmethod
    def cabinet_rows(self) -> list[dict[str, Any]]:
        """Per cabinet: cabinet, records, acked_upto, online, sales, sales_cents, flagged_sales,
        uncertified_scans, first_seq, last_seq."""

    @abstractmethod
    def gap_rows(self) -> list[tuple[str, int, int]]:
        """(cabinet, from, to) of every run of seqs missing between two stored records."""

    @abstractmethod
    def product_rows(self) -> list[dict[str, Any]]:
        """Per GTIN sold: gtin, name, units, cents."""

    @abstractmethod
    def anomaly_rows(self) -> list[dict[str, Any]]:
        """Every anomaly: cabinet, seq, kind, detail, at (in the order recorded)."""

    @abstractmethod
    def close(self) -> None: ...

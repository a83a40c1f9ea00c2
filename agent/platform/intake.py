"""What the ingest does with what arrived (platform.md, Ingest), independent of MQTT.

``apply_flush`` takes every batch and status a worker received since its last commit and
applies them in ONE transaction: the database's commit rate, not a round trip per message,
bounds the ingest. Under the cabinets' locks (``agent.platform.store``) it

- stores each record once by (cabinet, seq): a duplicate with the same hash is ignored, one
  with another hash is a ``conflict`` (the first stays);
- refuses a record that does not link to its stored neighbours (``broken_chain``);
- walks each cabinet's chain from its acked point over what is now stored, so the ack it
  returns covers only a committed, verified, gap-free prefix.

``due_gaps`` and ``accept_late_start`` are the slow path for records that wait above a
missing one: ask the cabinet for a resend, or accept a chain that starts late.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.platform.chain import Batch, Rec, link_problem
from agent.platform.store import Anomaly, CabinetState, Links, StatusUpdate, Store, StoreTx
from agent.protocol import ts_from_epoch

log = logging.getLogger(__name__)

_ALL = 1 << 63        # "read to the end"
WALK_PAGE = 5000      # stored records read per query when a walk runs past what the flush knew
GAP_GRACE_S = 5.0     # a gap younger than this is usually a batch in flight at another worker


@dataclass
class FlushResult:
    acks: dict[str, int] = field(default_factory=dict)     # cabinet -> acked_upto to publish
    stored: int = 0
    duplicates: int = 0
    anomalies: list[Anomaly] = field(default_factory=list)


@dataclass(frozen=True)
class GapAction:
    """``resend`` (ask for records from ``from_seq``) or ``starts_late`` (accept the chain as it starts)."""

    cabinet: str
    action: str
    from_seq: int


def apply_flush(store: Store, batches: Sequence[Batch], statuses: Sequence[StatusUpdate], now: float) -> FlushResult:
    result = FlushResult()
    incoming: dict[str, dict[int, Rec]] = {}
    for batch in batches:
        for rej in batch.rejected:
            result.anomalies.append(Anomaly(batch.cabinet, rej.seq, rej.kind, rej.detail))
        held = incoming.setdefault(batch.cabinet, {})
        for rec in batch.records:
            first = held.get(rec.seq)
            if first is None:
                held[rec.seq] = rec
            elif first.hash == rec.hash:
                result.duplicates += 1
            else:
                result.anomalies.append(_conflict(batch.cabinet, rec, first.hash))
    announced: dict[str, int] = {}    # the last_seq of each cabinet's latest status in this flush
    for status in sorted(statuses, key=lambda s: s.received_at):
        if status.last_seq is not None:
            announced[status.cabinet] = status.last_seq
    cabinets = sorted(set(incoming) | {s.cabinet for s in statuses} | {a.cabinet for a in result.anomalies})
    if not cabinets:
        return result
    stamp = ts_from_epoch(now)
    store.ensure_cabinets(cabinets)
    with store.transaction() as tx:
        states = tx.lock(cabinets)
        for cabinet, last_seq in announced.items():
            states[cabinet].announced = last_seq
        ranges = [(c, min(recs) - 1, max(recs) + 1) for c, recs in incoming.items() if recs]
        stored_links = tx.links(ranges)
        new_rows: list[tuple[str, Rec]] = []
        chains: dict[str, Links] = {}
        for cabinet, recs in sorted(incoming.items()):
            if not recs:
                continue
            links = stored_links.get(cabinet, {})
            for seq in sorted(recs):
                rec = recs[seq]
                stored = links.get(seq)
                if stored is not None:
                    if stored[1] == rec.hash:
                        result.duplicates += 1
                    else:
                        result.anomalies.append(_conflict(cabinet, rec, stored[1]))
                    continue
                below = links.get(seq - 1)
                # the common case inline (it links to the record below, nothing stored above it);
                # link_problem decides every other one
                if below is None or below[1] != rec.prev or seq == 1 or (seq + 1) in links:
                    problem = link_problem(rec, below, links.get(seq + 1))
                    if problem is not None:
                        result.anomalies.append(Anomaly(cabinet, seq, "broken_chain", problem))
                        continue
                links[seq] = (rec.prev, rec.hash)
                new_rows.append((cabinet, rec))
            chains[cabinet] = links
        tx.insert_records(new_rows, stamp)
        result.stored = len(new_rows)
        changed: list[CabinetState] = [states[c] for c in announced if c not in chains]
        for state in changed:
            if state.announced > state.acked_upto and state.gap_since is None:
                state.gap_since = now       # it holds records we have not seen: asked for if none come
        for cabinet, links in chains.items():
            state = states[cabinet]
            before = (state.acked_upto, state.gap_since)
            advance(tx, state, links, now)
            if (state.acked_upto, state.gap_since) != before or cabinet in announced:
                changed.append(state)
            result.acks[cabinet] = state.acked_upto
        tx.save_states(changed, stamp)
        tx.add_anomalies(result.anomalies, stamp)
        tx.save_statuses(statuses)
    for a in result.anomalies:
        log.warning("anomaly %s: cabinet %s seq %s: %s", a.kind, a.cabinet, a.seq, a.detail)
    return result


def advance(tx: StoreTx, state: CabinetState, links: Links, now: float) -> None:
    """Move ``state.acked_upto`` over every stored record that continues the verified chain.

    ``links`` holds what the caller read or wrote. Stored records above the acked point that
    it did not read exist only while a gap is open (every writer runs this walk under the
    cabinet's lock), so only then are they read, page by page. Sets or clears ``gap_since``:
    records are missing while stored ones wait above a hole, or while the cabinet's latest status
    announced more than is acked.
    """
    upto, tip = state.acked_upto, state.acked_hash
    start = upto
    read_to = upto if state.gap_since is not None else _ALL   # stored records above read_to may be unread
    while True:
        nxt = links.get(upto + 1)
        if nxt is None and upto + 1 > read_to:
            page = tx.links_after(state.cabinet, upto, WALK_PAGE)
            for seq, prev, hash_ in page:
                links[seq] = (prev, hash_)
            read_to = page[-1][0] if len(page) == WALK_PAGE else _ALL
            nxt = links.get(upto + 1)
        if nxt is None:
            break
        if nxt[0] != tip:
            # Stored records always link (they were checked under the lock); never ack past one that does not.
            log.error("cabinet %s: stored seq %d does not link to seq %d; not acking past it",
                      state.cabinet, upto + 1, upto)
            break
        upto, tip = upto + 1, nxt[1]
    state.acked_upto, state.acked_hash = upto, tip
    waiting = state.announced > upto or any(seq > upto for seq in links) or (
        read_to != _ALL and bool(tx.links_after(state.cabinet, upto, 1)))
    if not waiting:
        state.gap_since = None
    elif state.gap_since is None or upto > start:
        state.gap_since = now       # the age of a gap counts from the chain's last step forward


def due_gaps(store: Store, now: float, resend_after_s: float, grace_s: float = GAP_GRACE_S) -> list[GapAction]:
    """What to do about the cabinets whose records wait above a missing one.

    A gap older than the grace is asked for (``resend`` from the first missing seq) at most
    once per ``resend_after_s``; a chain that still starts above seq 1 one period after its
    resend was asked is accepted as it starts (``starts_late``): that cabinet pruned what
    came before.
    """
    actions: list[GapAction] = []
    for state in store.gapped():
        if state.gap_since is None or now - state.gap_since < grace_s or state.online is False:
            continue
        resend_due = state.resend_at is None or now - state.resend_at >= resend_after_s
        if not resend_due:
            continue
        if state.acked_upto == 0 and state.chain_start == 1 and state.resend_at is not None \
                and state.resend_at >= state.gap_since:
            actions.append(GapAction(state.cabinet, "starts_late", 1))
        else:
            actions.append(GapAction(state.cabinet, "resend", state.acked_upto + 1))
    return actions


def accept_late_start(store: Store, cabinet: str, now: float) -> int | None:
    """Accept a chain that starts above seq 1 from its first stored record; returns the new ack.

    Idempotent across workers: under the lock, only a cabinet still acked at 0 with a first
    stored record above 1 is changed (anomaly ``starts_late`` at that seq).
    """
    stamp = ts_from_epoch(now)
    with store.transaction() as tx:
        state = tx.lock([cabinet])[cabinet]
        first = tx.links_after(cabinet, 0, 1)
        if state.acked_upto != 0 or not first or first[0][0] == 1:
            return None
        seq, prev, _hash = first[0]
        state.acked_upto, state.acked_hash, state.chain_start = seq - 1, prev, seq
        advance(tx, state, {}, now)
        tx.save_states([state], stamp)
        anomaly = Anomaly(cabinet, seq, "starts_late", f"no record below seq {seq} after a resend from seq 1;"
                                                        f" acked from seq {seq} on")
        tx.add_anomalies([anomaly], stamp)
    log.warning("anomaly starts_late: cabinet %s: %s", cabinet, anomaly.detail)
    return state.acked_upto


def _conflict(cabinet: str, rec: Rec, held_hash: str) -> Anomaly:
    return Anomaly(cabinet, rec.seq, "conflict", f"holds {held_hash[:16]}, got {rec.hash[:16]}")

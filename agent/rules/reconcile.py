"""Weight reconciliation (operations.md, sessions rule 5): lane weight changes -> sale items.

Pure code: no clock, no I/O. A lane's change against the session baseline becomes an item
when it exceeds the lane's tolerance; the count is the rounded number of units and the
flags say what a person should review. The tolerance for ``qty`` units grows with the square
root of ``qty`` (v1.1: unit weights vary independently). A lane that could not be weighed
(its transmitter faulted, rule 9) is an item with ``qty`` 0, ``weight_g`` null and
``weight_mismatch``, so the platform reviews it instead of never hearing of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# A lane with no product has no tolerance from the catalog; this one keeps sensor jitter
# and crumbs from showing up as "no_product" items.
NO_PRODUCT_TOLERANCE_G = 5.0


@dataclass(frozen=True)
class LaneChange:
    """What is known about one lane at settle time."""

    lane: str
    baseline_g: float | None
    current_g: float | None   # None: no stable reading could be had (rule 9)
    gtin: str | None = None
    name: str | None = None
    cert_id: str | None = None
    unit_weight_g: float | None = None
    tolerance_g: float | None = None
    unit_price_cents: int = 0
    certified: bool = True


@dataclass(frozen=True)
class Reconciled:
    items: list[dict[str, Any]] = field(default_factory=list)
    total_cents: int = 0
    flags: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.items


def tolerance_for(tolerance_g: float, qty: int) -> float:
    """Sessions rule 5 (v1.1): the tolerance of a sum of ``qty`` units."""
    return tolerance_g * math.sqrt(max(1, qty))


def reconcile_lane(lane: LaneChange) -> dict[str, Any] | None:
    """The sale item of one lane, or None when its change is within tolerance."""
    if lane.current_g is None or lane.baseline_g is None:
        return _item(lane, 0, None, ["weight_mismatch"])
    delta = round(lane.current_g - lane.baseline_g, 3)
    flags: list[str] = []
    unit = lane.unit_weight_g if lane.gtin is not None and lane.unit_weight_g and lane.unit_weight_g > 0 else None
    tol = lane.tolerance_g if unit is not None and lane.tolerance_g is not None else NO_PRODUCT_TOLERANCE_G
    if abs(delta) <= tol:
        return None
    qty = 0
    if unit is None:
        flags.append("no_product")
    if delta > tol:
        flags.append("item_added")
    elif unit is not None:
        taken = -delta
        qty = round(taken / unit)
        qty_tol = tolerance_for(tol, qty)
        if abs(taken - qty * unit) > qty_tol:
            flags.append("weight_mismatch")
        if qty_tol >= unit / 2:
            flags.append("weight_ambiguous")
    return _item(lane, qty, delta, flags)


def _item(lane: LaneChange, qty: int, weight_g: float | None, flags: list[str]) -> dict[str, Any]:
    if lane.gtin is not None and not lane.certified:
        flags.append("uncertified_item")
    return {
        "gtin": lane.gtin,
        "name": lane.name,
        "lane": lane.lane,
        "qty": qty,
        "unit_price_cents": lane.unit_price_cents if lane.gtin is not None else 0,
        "cert_id": lane.cert_id,
        "weight_g": weight_g,
        "flags": flags,
    }


def reconcile(lanes: list[LaneChange], scanned_gtins: list[str] | None = None) -> Reconciled:
    """Items in lane order, the total, and the sale flags (union of item flags + scan_mismatch)."""
    items = [item for lane in lanes if (item := reconcile_lane(lane)) is not None]
    total = sum(item["qty"] * item["unit_price_cents"] for item in items)
    flags: list[str] = []
    for item in items:
        for flag in item["flags"]:
            if flag not in flags:
                flags.append(flag)
    if scanned_gtins:
        dropped = {item["gtin"] for item in items if item["weight_g"] is not None and item["weight_g"] < 0
                   and item["gtin"]}
        if any(g not in dropped for g in scanned_gtins):
            flags.append("scan_mismatch")
    return Reconciled(items=items, total_cents=total, flags=flags)

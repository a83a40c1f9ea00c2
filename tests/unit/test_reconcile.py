"""Weight reconciliation (operations.md rule 5; mqtt.md sale body, item and sale flags)."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from agent.rules.reconcile import NO_PRODUCT_TOLERANCE_G, LaneChange, reconcile, reconcile_lane

SHIITAKE = "06901234567892"
TEA = "06901234567809"
HONEY = "06901234567816"


def lane(name: str = "A1", baseline: float = 2000.0, current: float = 2000.0, *, gtin: str | None = SHIITAKE,
         unit: float | None = 250.0, tol: float | None = 6.0, price: int = 1590, certified: bool = True,
         product_name: str | None = "Dried shiitake 250 g", cert_id: str | None = "PA-2026-000123") -> LaneChange:
    return LaneChange(lane=name, baseline_g=baseline, current_g=current, gtin=gtin, name=product_name,
                      cert_id=cert_id, unit_weight_g=unit, tolerance_g=tol, unit_price_cents=price,
                      certified=certified)


def taken(grams: float, **kw) -> LaneChange:
    return lane(baseline=2000.0, current=2000.0 - grams, **kw)


# -- the qty rule ------------------------------------------------------------------------------
def test_two_units_taken_is_a_clean_item() -> None:
    item = reconcile_lane(taken(500.0))
    assert item == {
        "gtin": SHIITAKE, "name": "Dried shiitake 250 g", "lane": "A1", "qty": 2, "unit_price_cents": 1590,
        "cert_id": "PA-2026-000123", "weight_g": -500.0, "flags": [],
    }


@pytest.mark.parametrize(
    ("grams", "qty"),
    [(250.0, 1), (244.0, 1), (256.0, 1), (503.7, 2), (496.3, 2), (745.0, 3), (2500.0, 10)],
)
def test_qty_is_rounded_count_within_tolerance(grams: float, qty: int) -> None:
    item = reconcile_lane(taken(grams))
    assert item is not None
    assert item["qty"] == qty
    assert item["flags"] == []
    assert item["weight_g"] == pytest.approx(-grams, abs=1e-9)


def test_weight_g_is_change_against_baseline() -> None:
    item = reconcile_lane(lane(baseline=1234.5, current=984.1))
    assert item["weight_g"] == pytest.approx(-250.4, abs=1e-9)
    assert item["qty"] == 1


# -- weight_mismatch -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("grams", "qty"),
    [
        (380.0, 2),    # 1.52 units -> 2, 120 g off
        (262.0, 1),    # 12 g off one unit, tolerance 6
        (256.5, 1),    # just past tolerance x 1
        (100.0, 0),    # less than half a unit but beyond tolerance: qty 0, flagged
        (769.0, 3),    # 19 g off three units, tolerance 6 x sqrt(3) = 10.4
        (761.0, 3),    # 11 g off three units
        (1110.0, 4),   # 4.44 units -> 4
    ],
)
def test_weight_mismatch_keeps_rounded_qty(grams: float, qty: int) -> None:
    item = reconcile_lane(taken(grams))
    assert item is not None
    assert item["qty"] == qty
    assert item["flags"] == ["weight_mismatch"]


@pytest.mark.parametrize(("grams", "qty"), [(256.0, 1), (244.0, 1), (760.0, 3), (740.0, 3), (1012.0, 4),
                                           (988.0, 4)])
def test_tolerance_scales_with_sqrt_qty_and_is_inclusive(grams: float, qty: int) -> None:
    # v1.1: |taken - qty*unit| <= tol * sqrt(max(1, qty)) is fine: 6 g for one unit, 10.4 for three, 12 for four
    item = reconcile_lane(taken(grams))
    assert item["qty"] == qty
    assert item["flags"] == []


def test_mismatch_with_qty_zero_contributes_nothing_to_total() -> None:
    r = reconcile([taken(100.0)])
    assert r.items[0]["qty"] == 0
    assert r.total_cents == 0
    assert r.flags == ["weight_mismatch"]


# -- item_added and within-tolerance lanes ----------------------------------------------------------
def test_rise_above_tolerance_is_item_added() -> None:
    item = reconcile_lane(lane(baseline=1000.0, current=1250.0))
    assert item is not None
    assert item["flags"] == ["item_added"]
    assert item["qty"] == 0
    assert item["weight_g"] == 250.0


def test_rise_just_above_tolerance_is_item_added_at_tolerance_is_not() -> None:
    assert reconcile_lane(lane(baseline=1000.0, current=1006.0)) is None
    item = reconcile_lane(lane(baseline=1000.0, current=1006.5))
    assert item is not None and item["flags"] == ["item_added"]


@pytest.mark.parametrize("delta", [0.0, -6.0, 6.0, -5.9, 3.2, -0.001])
def test_within_tolerance_lane_is_no_item(delta: float) -> None:
    assert reconcile_lane(lane(baseline=1000.0, current=1000.0 + delta)) is None
    r = reconcile([lane(baseline=1000.0, current=1000.0 + delta)])
    assert r.empty and r.items == [] and r.total_cents == 0 and r.flags == []


def test_tolerance_is_per_lane() -> None:
    # 8 g off: within a 10 g tolerance, beyond a 6 g one
    assert reconcile_lane(taken(8.0, tol=10.0)) is None
    item = reconcile_lane(taken(8.0, tol=6.0))
    assert item is not None and item["flags"] == ["weight_mismatch"] and item["qty"] == 0


# -- uncertified_item, no_product ----------------------------------------------------------------------
def test_uncertified_item() -> None:
    item = reconcile_lane(taken(250.0, certified=False))
    assert item["flags"] == ["uncertified_item"]
    assert item["qty"] == 1
    assert item["gtin"] == SHIITAKE


def test_uncertified_with_mismatch_carries_both_flags() -> None:
    item = reconcile_lane(taken(380.0, certified=False))
    assert set(item["flags"]) == {"weight_mismatch", "uncertified_item"}


def test_no_product_lane() -> None:
    item = reconcile_lane(taken(300.0, gtin=None, unit=None, tol=None, product_name=None, cert_id=None, price=999))
    assert item is not None
    assert item["flags"] == ["no_product"]
    assert item["qty"] == 0
    assert item["gtin"] is None
    assert item["unit_price_cents"] == 0
    assert item["weight_g"] == -300.0


def test_no_product_lane_rise_is_also_item_added() -> None:
    item = reconcile_lane(lane(baseline=0.0, current=300.0, gtin=None, unit=None, tol=None))
    assert set(item["flags"]) == {"no_product", "item_added"}


def test_no_product_lane_small_jitter_is_no_item() -> None:
    assert reconcile_lane(taken(NO_PRODUCT_TOLERANCE_G, gtin=None, unit=None, tol=None)) is None
    assert reconcile_lane(taken(NO_PRODUCT_TOLERANCE_G + 0.5, gtin=None, unit=None, tol=None)) is not None


# -- the sale: order, total, flags --------------------------------------------------------------------
def test_items_in_lane_order_and_total() -> None:
    lanes = [
        lane("A1", 2000.0, 1500.0, gtin=SHIITAKE, unit=250.0, tol=6.0, price=1590),   # 2 x 1590
        lane("A2", 900.0, 900.0, gtin=TEA, unit=100.0, tol=3.0, price=800),           # unchanged
        lane("B1", 1000.0, 700.0, gtin=TEA, unit=100.0, tol=3.0, price=800),          # 3 x 800
        lane("B2", 600.0, 400.0, gtin=HONEY, unit=200.0, tol=5.0, price=2500),        # 1 x 2500
    ]
    r = reconcile(lanes)
    assert [i["lane"] for i in r.items] == ["A1", "B1", "B2"]
    assert [i["qty"] for i in r.items] == [2, 3, 1]
    assert r.total_cents == 2 * 1590 + 3 * 800 + 1 * 2500
    assert r.flags == []
    assert not r.empty


def test_lane_order_is_the_order_given_not_sorted() -> None:
    r = reconcile([lane("C3", 1000.0, 750.0), lane("B2", 1000.0, 1000.0), lane("A1", 1000.0, 500.0)])
    assert [(i["lane"], i["qty"]) for i in r.items] == [("C3", 1), ("A1", 2)]


def test_total_includes_flagged_items_at_their_rounded_qty() -> None:
    lanes = [lane("A1", 2000.0, 1620.0, price=1000),  # 380 g: qty 2, mismatch
             lane("A2", 500.0, 250.0, gtin=TEA, price=300, certified=False)]  # qty 1, uncertified
    r = reconcile(lanes)
    assert r.total_cents == 2 * 1000 + 1 * 300
    assert r.flags == ["weight_mismatch", "uncertified_item"]


def test_sale_flags_are_union_without_duplicates() -> None:
    lanes = [
        lane("A1", 2000.0, 1620.0),                                  # weight_mismatch
        lane("A2", 2000.0, 1610.0),                                  # weight_mismatch again
        lane("A3", 1000.0, 1300.0),                                  # item_added
        lane("A4", 1000.0, 600.0, gtin=None, unit=None, tol=None),   # no_product
        lane("A5", 1000.0, 750.0, certified=False),                  # uncertified_item
    ]
    r = reconcile(lanes)
    assert sorted(r.flags) == ["item_added", "no_product", "uncertified_item", "weight_mismatch"]
    assert len(r.flags) == len(set(r.flags))
    for item in r.items:
        assert set(item["flags"]) <= set(r.flags)


# -- scan_mismatch -----------------------------------------------------------------------------------------
def test_scan_of_a_product_whose_lane_dropped_is_fine() -> None:
    r = reconcile([lane("A1", 1000.0, 750.0, gtin=SHIITAKE), lane("A2", 1000.0, 1000.0, gtin=TEA)], [SHIITAKE])
    assert r.flags == []


def test_scan_of_a_product_whose_lane_did_not_change_is_scan_mismatch() -> None:
    r = reconcile([lane("A1", 1000.0, 750.0, gtin=SHIITAKE), lane("A2", 1000.0, 1000.0, gtin=TEA)],
                  [SHIITAKE, TEA])
    assert r.flags == ["scan_mismatch"]
    assert all(i["flags"] == [] for i in r.items)


def test_scan_of_a_product_whose_lane_rose_is_scan_mismatch() -> None:
    r = reconcile([lane("A1", 1000.0, 750.0, gtin=SHIITAKE), lane("A2", 1000.0, 1100.0, gtin=TEA, unit=100.0)],
                  [TEA])
    assert "scan_mismatch" in r.flags and "item_added" in r.flags


def test_scan_of_an_unknown_code_with_no_items_is_scan_mismatch() -> None:
    r = reconcile([lane("A1", 1000.0, 1000.0)], [HONEY])
    assert r.items == []
    assert r.flags == ["scan_mismatch"]


@pytest.mark.parametrize("scans", [None, []])
def test_no_scans_no_scan_mismatch(scans: list[str] | None) -> None:
    assert reconcile([lane("A1", 1000.0, 750.0)], scans).flags == []


def test_scan_mismatch_added_once_after_item_flags() -> None:
    r = reconcile([lane("A1", 2000.0, 1620.0)], [TEA, HONEY])
    assert r.flags == ["weight_mismatch", "scan_mismatch"]


# -- properties -------------------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(
    unit=st.floats(min_value=5.0, max_value=2000.0, allow_nan=False),
    tol_frac=st.floats(min_value=0.01, max_value=0.45),
    count=st.integers(min_value=1, max_value=40),
    noise_frac=st.floats(min_value=-0.98, max_value=0.98),
    baseline=st.floats(min_value=0.0, max_value=50_000.0, allow_nan=False),
)
def test_true_count_with_noise_below_tolerance(unit: float, tol_frac: float, count: int, noise_frac: float,
                                              baseline: float) -> None:
    tol = unit * tol_frac
    noise = noise_frac * tol - 0.002 * (1 if noise_frac >= 0 else -1)  # margin for the 3-decimal rounding
    assume(abs(noise) < tol)
    current = baseline - count * unit + noise
    item = reconcile_lane(lane(baseline=baseline, current=current, unit=unit, tol=tol, price=123))
    assert item is not None
    assert item["qty"] == count
    assert "weight_mismatch" not in item["flags"]
    ambiguous = tol * math.sqrt(count) >= unit / 2
    assert item["flags"] == (["weight_ambiguous"] if ambiguous else [])
    r = reconcile([lane(baseline=baseline, current=current, unit=unit, tol=tol, price=123)])
    assert r.total_cents == 123 * count and r.flags == item["flags"]


@settings(max_examples=200, deadline=None)
@given(
    unit=st.floats(min_value=5.0, max_value=2000.0, allow_nan=False),
    tol_frac=st.floats(min_value=0.01, max_value=0.45),
    delta_frac=st.floats(min_value=-0.99, max_value=0.99),
)
def test_changes_within_tolerance_are_never_items(unit: float, tol_frac: float, delta_frac: float) -> None:
    tol = unit * tol_frac
    delta = delta_frac * tol
    assert reconcile_lane(lane(baseline=1000.0, current=1000.0 + delta, unit=unit, tol=tol)) is None


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(min_value=0, max_value=10), min_size=1, max_size=8),
    prices=st.lists(st.integers(min_value=0, max_value=100_000), min_size=8, max_size=8),
)
def test_total_is_sum_of_qty_times_price(counts: list[int], prices: list[int]) -> None:
    lanes = [lane(f"L{i}", 5000.0, 5000.0 - n * 250.0, price=prices[i]) for i, n in enumerate(counts)]
    r = reconcile(lanes)
    assert r.total_cents == sum(n * prices[i] for i, n in enumerate(counts))
    assert [i["lane"] for i in r.items] == [f"L{i}" for i, n in enumerate(counts) if n > 0]
    assert r.total_cents == sum(i["qty"] * i["unit_price_cents"] for i in r.items)


# -- v1.1: weight_ambiguous and lanes that could not be weighed -----------------------------------------
def test_weight_ambiguous_when_the_tolerance_reaches_half_a_unit() -> None:
    # 10 g units with 3 g tolerance: for 3 units tol = 5.2 >= 5, the weight cannot tell 3 from 2 or 4
    item = reconcile_lane(taken(30.0, unit=10.0, tol=3.0))
    assert item is not None and item["qty"] == 3 and item["flags"] == ["weight_ambiguous"]
    one = reconcile_lane(taken(10.0, unit=10.0, tol=3.0))
    assert one is not None and one["qty"] == 1 and one["flags"] == []


def test_a_lane_without_a_reading_is_an_item_for_review() -> None:
    r = reconcile([lane("A1", 1000.0, None)])
    assert not r.empty
    assert r.items[0]["qty"] == 0 and r.items[0]["weight_g"] is None
    assert r.items[0]["flags"] == ["weight_mismatch"] and r.total_cents == 0 and r.flags == ["weight_mismatch"]

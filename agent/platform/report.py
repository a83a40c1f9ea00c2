"""The supervision report (platform.md, Report): what the platform can prove about each cabinet.

Per cabinet: records stored, acked, gaps, whether the chain is intact, online, sales and
their money, flagged sales, uncertified scans; per product: units and money; every
anomaly. The numbers come from SQL in the store (``Store.cabinet_rows`` and friends), so
a report over millions of records does not load them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, TextIO

from agent.platform.store import Store

CHAIN_BREAKING = ("broken_chain", "conflict")


def build(store: Store) -> dict[str, Any]:
    """The report object of platform.md."""
    gaps: dict[str, list[list[int]]] = defaultdict(list)
    for cabinet, lo, hi in store.gap_rows():
        gaps[cabinet].append([lo, hi])
    anomalies = store.anomaly_rows()
    broken = {a["cabinet"] for a in anomalies if a["kind"] in CHAIN_BREAKING}
    cabinets = []
    for row in store.cabinet_rows():
        name = row["cabinet"]
        cab_gaps = list(gaps.get(name, []))
        if row["first_seq"] is not None and row["first_seq"] > 1:
            cab_gaps.insert(0, [1, row["first_seq"] - 1])
        cabinets.append({
            "cabinet": name, "records": row["records"], "acked_upto": row["acked_upto"], "gaps": cab_gaps,
            "chain_ok": not cab_gaps and name not in broken, "online": row["online"],
            "sales": row["sales"], "sales_cents": row["sales_cents"], "flagged_sales": row["flagged_sales"],
            "uncertified_scans": row["uncertified_scans"],
        })
    return {"cabinets": cabinets, "products": store.product_rows(), "anomalies": anomalies}


def write_json(report: dict[str, Any], out: TextIO) -> None:
    out.write(json.dumps(report, ensure_ascii=False) + "\n")


def _money(cents: int) -> str:
    return f"{cents / 100:,.2f}"


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                                 strict=True))).rstrip()
    return [fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def _gaps_text(gaps: list[list[int]]) -> str:
    if not gaps:
        return "-"
    shown = ", ".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in gaps[:3])
    return shown + (f" (+{len(gaps) - 3} more)" if len(gaps) > 3 else "")


def write_tables(report: dict[str, Any], out: TextIO) -> None:
    """The same report as aligned tables (cabinets, products, anomalies) with totals."""
    cabs = report["cabinets"]
    rows = [[c["cabinet"], str(c["records"]), str(c["acked_upto"]), _gaps_text(c["gaps"]),
             "ok" if c["chain_ok"] else "BROKEN", {True: "yes", False: "no", None: "?"}[c["online"]],
             str(c["sales"]), _money(c["sales_cents"]), str(c["flagged_sales"]), str(c["uncertified_scans"])]
            for c in cabs]
    rows.append(["total", str(sum(c["records"] for c in cabs)), "", "",
                 f"{sum(1 for c in cabs if not c['chain_ok'])} broken", f"{sum(1 for c in cabs if c['online'])} online",
                 str(sum(c["sales"] for c in cabs)), _money(sum(c["sales_cents"] for c in cabs)),
                 str(sum(c["flagged_sales"] for c in cabs)), str(sum(c["uncertified_scans"] for c in cabs))])
    lines = [f"cabinets ({len(cabs)})"]
    lines += _table(["cabinet", "records", "acked", "gaps", "chain", "online", "sales", "sales", "flagged",
                     "uncertified scans"], rows, {1, 2, 6, 7, 8, 9})
    products = report["products"]
    lines += ["", f"products ({len(products)})"]
    lines += _table(["gtin", "name", "units", "money"],
                    [[p["gtin"], p["name"] or "", str(p["units"]), _money(p["cents"])] for p in products]
                    + [["total", "", str(sum(p["units"] for p in products)),
                        _money(sum(p["cents"] for p in products))]], {2, 3})
    anomalies = report["anomalies"]
    lines += ["", f"anomalies ({len(anomalies)})"]
    if anomalies:
        lines += _table(["cabinet", "seq", "kind", "detail"],
                        [[a["cabinet"], "" if a["seq"] is None else str(a["seq"]), a["kind"], a["detail"]]
                         for a in anomalies], {1})
    else:
        lines.append("none")
    out.write("\n".join(lines) + "\n")

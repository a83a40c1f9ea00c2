"""``cabinetctl``: the operator's tool (operations.md).

Exit codes: 0 success, 1 refused or failed (reason on stderr), 2 usage or config error,
3 the daemon is not reachable. Reads of the ledger (``sales``, ``verify``, ``export``) open
the database read-only and work whether the daemon runs or not.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import stat
import sys
import time
import zoneinfo
from pathlib import Path
from typing import Any

from agent.config import Config, config_path, load_config
from agent.control import request
from agent.errors import ConfigError, LedgerError
from agent.store.ledger import Ledger
from agent.protocol import format_ts, parse_ts

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class CtlExit(Exception):
    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code


def _err(msg: str) -> None:
    print(f"cabinetctl: {msg}", file=sys.stderr)


def _dump(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=None))


class Ctl:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def call(self, cmd: str, args: dict[str, Any] | None = None, *, fds: list[int] | None = None,
             on_progress: Any = None, timeout_s: float | None = 60.0) -> Any:
        try:
            answer = request(self.cfg.cabinet.control_socket, cmd, args, fds=fds, on_progress=on_progress,
                             timeout_s=timeout_s)
        except (FileNotFoundError, ConnectionRefusedError, ConnectionError, PermissionError) as exc:
            raise CtlExit(EXIT_UNREACHABLE, f"the daemon is not reachable at {self.cfg.cabinet.control_socket}: {exc}")
        except TimeoutError:
            raise CtlExit(EXIT_UNREACHABLE, "the daemon did not answer in time") from None
        if not answer.get("ok"):
            raise CtlExit(int(answer.get("exit", EXIT_FAILED)), str(answer.get("error")))
        return answer.get("result")

    def ledger(self) -> Ledger:
        try:
            return Ledger(self.cfg.data_dir / "ledger.db", readonly=True)
        except LedgerError as exc:
            raise CtlExit(EXIT_FAILED, str(exc)) from None

    # -- commands ---------------------------------------------------------------------------------
    def status(self, a: argparse.Namespace) -> int:
        st = self.call("status")
        if a.json:
            _dump(st)
            return 0
        print(f"cabinet   {st['cabinet']}  (agent {st['agent_version']})  mode: {st['mode']}")
        print(f"platform  {'connected' if st['broker_connected'] else 'NOT connected'};  last seq {st['last_seq']},"
              f" unsynced {st['unsynced']}")
        age = ""
        if st.get("catalog_issued_at"):
            try:
                issued = parse_ts(st["catalog_issued_at"])
                age = f", issued {(dt.datetime.now(dt.timezone.utc) - issued).days} days ago"
            except ValueError:
                pass
        print(f"catalog   version {st['catalog_version']}{age}")
        for d in st["doors"]:
            state = "unknown" if d["open"] is None else ("OPEN" if d["open"] else "shut")
            lock = "unknown" if d["locked"] is None else ("locked" if d["locked"] else "released")
            print(f"door {d['door']}    {state}, {lock}")
        for s in st.get("sessions", []):
            print(f"session   door {s['door']}: {s['session_id']} ({s['phase']})")
        for ln in st["lanes"]:
            w = "no reading" if ln["weight_g"] is None else f"{ln['weight_g']:.1f} g"
            print(f"lane {ln['lane']:<5} {w:>12}  {ln['gtin'] or '(no product)'}")
        print(f"alarms    {', '.join(st['alarms']) if st['alarms'] else 'none'}")
        return 0

    def lanes(self, a: argparse.Namespace) -> int:
        rows = self.call("lanes")
        if a.json:
            _dump(rows)
            return 0
        print(f"{'lane':<6}{'door':>4}{'ch':>4}  {'gtin':<15}{'price':>8}{'weight':>10}{'count':>6}  cert  name")
        for r in rows:
            price = "-" if r["price_cents"] is None else f"{r['price_cents'] / 100:.2f}"
            weight = "-" if r["weight_g"] is None else f"{r['weight_g']:.1f}"
            count = "-" if r["count"] is None else str(r["count"])
            print(f"{r['lane']:<6}{r['door']:>4}{r['channel']:>4}  {r['gtin'] or '-':<15}{price:>8}{weight:>10}"
                  f"{count:>6}  {'yes' if r['certified'] else 'NO ':<4}  {r['name'] or ''}")
        return 0

    def service(self, a: argparse.Namespace) -> int:
        self.call("service", {"on": a.state == "on"})
        print(f"service mode {a.state}")
        return 0

    def unlock(self, a: argparse.Namespace) -> int:
        self.call("unlock", {"door": a.door})
        print(f"door {a.door} unlocked")
        return 0

    def restock(self, a: argparse.Namespace) -> int:
        def progress(p: dict[str, Any]) -> None:
            if "waiting_for_scan" in p:
                print(f"Hold the product's barcode up to the camera (waiting {p['waiting_for_scan']:.0f} s)...",
                      file=sys.stderr, flush=True)
            elif "scanned" in p:
                print(f"scanned {p['scanned']}", file=sys.stderr)

        args = {"lane": a.lane, "qty": a.qty, "code": a.code, "price": a.price, "wait_s": a.wait}
        r = self.call("restock", args, on_progress=progress, timeout_s=a.wait + 30)
        print(f"lane {r['lane']}: restocked {r['qty']} x {r['name']} ({r['gtin']})")
        return 0

    def price(self, a: argparse.Namespace) -> int:
        self.call("price", {"lane": a.lane, "cents": a.cents})
        print(f"lane {a.lane}: price {a.cents} cents")
        return 0

    def tare(self, a: argparse.Namespace) -> int:
        r = self.call("tare", {"lane": a.lane})
        print(f"tared {', '.join(r['tared'])}")
        return 0

    def calibrate(self, a: argparse.Namespace) -> int:
        r = self.call("calibrate", {"lane": a.lane, "grams": a.grams})
        print(f"lane {a.lane}: calibration factor {r['factor']:.6f}")
        return 0

    def catalog(self, a: argparse.Namespace) -> int:
        if a.action is None:
            info = self.call("catalog")
            if a.json:
                _dump(info)
            else:
                print(f"version {info['version']}, issued {info['issued_at']}, {info['products']} products")
            return 0
        if a.action == "lookup":
            if not a.arg:
                raise CtlExit(EXIT_USAGE, "catalog lookup needs a CODE")
            r = self.call("catalog_lookup", {"code": a.arg})
            if a.json:
                _dump(r)
            elif r["certified"]:
                p = r["product"]
                print(f"{r['gtin']}: certified - {p['name']} ({p['cert_id']}, valid until {p['valid_until']})")
            else:
                print(f"{a.arg}: NOT certified - {r['why']}")
                _err(f"{a.arg} is not certified: {r['reason']}")
            return 0 if r["certified"] else EXIT_FAILED
        if a.action == "install":
            if not a.arg:
                raise CtlExit(EXIT_USAGE, "catalog install needs a FILE")
            return self._catalog_install(a.arg)
        raise CtlExit(EXIT_USAGE, f"unknown catalog action {a.action!r}")

    def _catalog_install(self, path: str) -> int:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise CtlExit(EXIT_FAILED, f"cannot read {path}: {exc.strerror}") from None
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            raise CtlExit(EXIT_FAILED, f"{path} is a directory, not a catalog file")
        tty = sys.stderr.isatty()

        def progress(p: dict[str, Any]) -> None:
            total = p.get("total") or 0
            pct = p["done"] * 100 // total if total else 100
            bar = "#" * (pct // 4)
            end = "\r" if tty else "\n"
            print(f"installing [{bar:<25}] {pct:3d}%", end=end, file=sys.stderr, flush=True)

        try:
            r = self.call("catalog_install", fds=[fd], on_progress=progress, timeout_s=600)
        finally:
            os.close(fd)
            if tty:
                print(file=sys.stderr)
        if r["outcome"] == "same_version":
            print(f"catalog version {r['version']} is already installed")
        else:
            print(f"installed catalog version {r['version']} ({'delta' if r['delta'] else 'snapshot'},"
                  f" {r['products']} products)")
        return 0

    def sales(self, a: argparse.Namespace) -> int:
        since = _parse_since(a.since, self.cfg.cabinet.timezone) if a.since else None
        led = self.ledger()
        try:
            records = list(led.records(since_at=since, newest_first=True))
        finally:
            led.close()
        if a.json:
            _dump([r.wire() for r in records])
        elif a.csv:
            w = csv.writer(sys.stdout)
            w.writerow(["seq", "at", "type", "kind", "door", "session_id", "total_cents", "flags", "hash"])
            for r in records:
                b = r.body
                w.writerow([r.seq, r.at, r.type, b.get("kind", ""), b.get("door", ""), b.get("session_id", ""),
                            b.get("total_cents", ""), " ".join(b.get("flags", [])), r.hash])
        else:
            for r in records:
                print(f"{r.seq:>7}  {r.at}  {_summary(r.type, r.body)}")
        return 0

    def sync(self, a: argparse.Namespace) -> int:
        r = self.call("sync")
        print(f"resending from the first unacknowledged record: {r['unsynced']} unsynced")
        if not a.wait:
            return 0
        deadline = time.monotonic() + a.timeout if a.timeout else None
        while True:
            st = self.call("status")
            link = "" if st["broker_connected"] else " (platform not connected)"
            print(f"unsynced {st['unsynced']}, acknowledged up to seq {st['acked_upto']} of {st['last_seq']}{link}",
                  file=sys.stderr, flush=True)
            if st["unsynced"] == 0:
                print("all records acknowledged")
                return 0
            if deadline is not None and time.monotonic() > deadline:
                raise CtlExit(EXIT_FAILED, f"{st['unsynced']} records still unacknowledged")
            time.sleep(1.0)

    def verify(self, a: argparse.Namespace) -> int:
        led = self.ledger()
        try:
            bad, why = led.verify()
        finally:
            led.close()
        if a.json:
            _dump({"ok": bad is None, "bad_seq": bad, "detail": why})
        if bad is None:
            if not a.json:
                print(f"ledger ok: {why}")
            return 0
        print(f"ledger broken at seq {bad}: {why}", file=sys.stderr)
        return EXIT_FAILED

    def export(self, a: argparse.Namespace) -> int:
        led = self.ledger()
        out = Path(a.out)
        tmp = out.with_name(out.name + ".part")
        count = 0
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                for rec in led.records(newest_first=False, from_seq=led.acked_upto + 1):
                    fh.write(json.dumps(rec.wire(), ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n")
                    count += 1
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, out)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise CtlExit(EXIT_FAILED, f"cannot write {out}: {exc.strerror or exc}") from None
        finally:
            led.close()
        print(f"exported {count} unsynced records to {out}")
        return 0


def _parse_since(text: str, tz: str) -> str:
    if len(text) > 10 and text[10] == " ":
        text = text[:10] + "T" + text[11:]   # RFC 3339 allows a space between date and time
    try:
        if "T" in text or "t" in text:
            when = parse_ts(text)   # RFC 3339; a time without a zone is refused
        else:
            day = dt.date.fromisoformat(text)
            when = dt.datetime.combine(day, dt.time(0), zoneinfo.ZoneInfo(tz))
    except ValueError:
        raise CtlExit(EXIT_USAGE, f"--since: {text!r} is neither an RFC 3339 time nor a date (YYYY-MM-DD)") from None
    return format_ts(when)


def _summary(type_: str, body: dict[str, Any]) -> str:
    if type_ == "sale":
        items = ", ".join(f"{i['qty']}x {i.get('name') or i.get('gtin') or i['lane']}" for i in body.get("items", []))
        flags = f"  [{' '.join(body['flags'])}]" if body.get("flags") else ""
        return f"SALE door {body.get('door')} {body.get('total_cents', 0) / 100:.2f}: {items}{flags}"
    rest = {k: v for k, v in body.items() if k != "kind"}
    return f"{body.get('kind')} {json.dumps(rest, ensure_ascii=False)}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cabinetctl", description="Service a cabinet through its running agent.")
    p.add_argument("--config", help="config file (default $CABINET_AGENT_CONFIG or /etc/cabinet-agent/agent.toml)")
    # --config is also accepted after the command (cabinetctl status --config PATH)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    _add = sub.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return _add(name, parents=[common], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]
    s = sub.add_parser("status", help="mode, doors, lanes, sync, alarms")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("service", help="enter or leave service mode")
    s.add_argument("state", choices=["on", "off"])
    s = sub.add_parser("unlock", help="service unlock of a door")
    s.add_argument("door", type=int)
    s = sub.add_parser("restock", help="put a certified product into a lane")
    s.add_argument("lane")
    s.add_argument("--qty", type=int, default=1)
    s.add_argument("--code", help="product code; without it, scan the product with the camera")
    s.add_argument("--price", type=int, help="price in cents (needed for a product new to the lane)")
    s.add_argument("--wait", type=float, default=30.0, help="seconds to wait for a scan")
    s = sub.add_parser("lanes", help="planogram: lane, product, price, weight, count")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("price", help="set a lane's price")
    s.add_argument("lane")
    s.add_argument("cents", type=int)
    s = sub.add_parser("tare", help="zero a lane's scale (or all)")
    s.add_argument("lane")
    s = sub.add_parser("calibrate", help="calibrate a lane's scale with a known weight on it")
    s.add_argument("lane")
    s.add_argument("grams", type=float)
    s = sub.add_parser("catalog", help="catalog info, lookup CODE, install FILE")
    s.add_argument("action", nargs="?", choices=["lookup", "install"])
    s.add_argument("arg", nargs="?", metavar="CODE|FILE")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("sales", help="ledger records, newest first")
    s.add_argument("--since", help="RFC 3339 time or date")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true")
    g.add_argument("--csv", action="store_true")
    s = sub.add_parser("sync", help="resend unacknowledged records")
    s.add_argument("--wait", action="store_true", help="block until every record is acknowledged")
    s.add_argument("--timeout", type=float, default=0, help="with --wait: give up after this many seconds")
    s = sub.add_parser("verify", help="recompute the ledger's hash chain")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("export", help="write unsynced records as JSON lines")
    s.add_argument("--out", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(config_path(args.config))
    except ConfigError as exc:
        for problem in exc.problems:
            _err(problem)
        return EXIT_USAGE
    ctl = Ctl(cfg)
    try:
        return getattr(ctl, args.command)(args)
    except CtlExit as exc:
        if str(exc):
            _err(str(exc))
        return exc.code
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

"""``cabinetctl``: the operator's tool (operations.md).

Exit codes: 0 success, 1 refused or failed (reason on stderr), 2 usage or config error,
3 the daemon is not reachable. Reads of the ledger (``sales``, ``verify``, ``export``) open
the database read-only (agent.store.readonly) and never write it: they work whether the daemon
runs or not, also for an operator who can only read data_dir (operations.md v1.1).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import math
import os
import sqlite3
import stat
import sys
import tempfile
import time
import zoneinfo
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from agent.config import Config, config_path, load_config
from agent.control import request
from agent.errors import ConfigError, LedgerError
from agent.protocol import format_ts, parse_ts
from agent.store.ledger import Ledger

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
SYNC_POLL_S = 0.5
MAX_SCAN_WAIT_S = 600.0


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
             on_progress: Callable[[Any], None] | None = None, timeout_s: float | None = 60.0) -> Any:
        try:
            answer = request(self.cfg.cabinet.control_socket, cmd, args, fds=fds, on_progress=on_progress,
                             timeout_s=timeout_s)
        except (FileNotFoundError, ConnectionRefusedError, ConnectionError, PermissionError) as exc:
            raise CtlExit(EXIT_UNREACHABLE,
                          f"the daemon is not reachable at {self.cfg.cabinet.control_socket}: {exc}") from None
        except TimeoutError:
            raise CtlExit(EXIT_UNREACHABLE, "the daemon did not answer in time") from None
        if not answer.get("ok"):
            raise CtlExit(int(answer.get("exit", EXIT_FAILED)), str(answer.get("error")))
        return answer.get("result")

    @contextlib.contextmanager
    def ledger(self) -> Iterator[Ledger]:
        """The ledger opened read-only (never written: operations.md v1.1), closed afterwards."""
        try:
            led = Ledger(self.cfg.data_dir / "ledger.db", readonly=True)
        except LedgerError as exc:
            raise CtlExit(EXIT_FAILED, str(exc)) from None
        try:
            yield led
        except sqlite3.DatabaseError as exc:
            raise CtlExit(EXIT_FAILED, f"cannot read the ledger {led.path}: {exc}") from None
        finally:
            led.close()

    # -- commands ---------------------------------------------------------------------------------
    def status(self, a: argparse.Namespace) -> int:
        st = self.call("status")
        if a.json:
            _dump(st)
            return EXIT_OK
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
        return EXIT_OK

    def lanes(self, a: argparse.Namespace) -> int:
        rows = self.call("lanes")
        if a.json:
            _dump(rows)
            return EXIT_OK
        print(f"{'lane':<6}{'door':>4}{'ch':>4}  {'gtin':<15}{'price':>8}{'weight':>10}{'count':>6}  cert  name")
        for r in rows:
            price = "-" if r["price_cents"] is None else f"{r['price_cents'] / 100:.2f}"
            weight = "-" if r["weight_g"] is None else f"{r['weight_g']:.1f}"
            count = "-" if r["count"] is None else str(r["count"])
            print(f"{r['lane']:<6}{r['door']:>4}{r['channel']:>4}  {r['gtin'] or '-':<15}{price:>8}{weight:>10}"
                  f"{count:>6}  {'yes' if r['certified'] else 'NO ':<4}  {r['name'] or ''}")
        return EXIT_OK

    def service(self, a: argparse.Namespace) -> int:
        self.call("service", {"on": a.state == "on"})
        print(f"service mode {a.state}")
        return EXIT_OK

    def unlock(self, a: argparse.Namespace) -> int:
        self.call("unlock", {"door": a.door})
        print(f"door {a.door} unlocked")
        return EXIT_OK

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
        return EXIT_OK

    def price(self, a: argparse.Namespace) -> int:
        self.call("price", {"lane": a.lane, "cents": a.cents})
        print(f"lane {a.lane}: price {a.cents} cents")
        return EXIT_OK

    def tare(self, a: argparse.Namespace) -> int:
        r = self.call("tare", {"lane": a.lane})
        print(f"tared {', '.join(r['tared'])}")
        return EXIT_OK

    def calibrate(self, a: argparse.Namespace) -> int:
        r = self.call("calibrate", {"lane": a.lane, "grams": a.grams})
        print(f"lane {a.lane}: calibration factor {r['factor']:.6f}")
        return EXIT_OK

    def catalog(self, a: argparse.Namespace) -> int:
        if a.action is None:
            info = self.call("catalog")
            if a.json:
                _dump(info)
            else:
                print(f"version {info['version']}, issued {info['issued_at']}, {info['products']} products")
            return EXIT_OK
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
            return EXIT_OK if r["certified"] else EXIT_FAILED
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
        return EXIT_OK

    def sales(self, a: argparse.Namespace) -> int:
        since = _parse_since(a.since, self.cfg.cabinet.timezone) if a.since else None
        with self.ledger() as led:
            records = list(led.records(since_at=since, newest_first=True))
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
        return EXIT_OK

    def sync(self, a: argparse.Namespace) -> int:
        r = self.call("sync")
        print(f"resending from the first unacknowledged record: {r['unsynced']} unsynced")
        if not a.wait:
            return EXIT_OK
        deadline = time.monotonic() + a.timeout if a.timeout else None
        while True:
            # sync_progress, not status: its answer comes after the ack watermark is on disk,
            # so an export started once this returns finds nothing unsynced (operations.md)
            st = self.call("sync_progress")
            link = "" if st["broker_connected"] else " (platform not connected)"
            print(f"unsynced {st['unsynced']}, acknowledged up to seq {st['acked_upto']} of {st['last_seq']}{link}",
                  file=sys.stderr, flush=True)
            if st["unsynced"] == 0:
                print("all records acknowledged")
                return EXIT_OK
            if deadline is not None and time.monotonic() > deadline:
                raise CtlExit(EXIT_FAILED, f"{st['unsynced']} records still unacknowledged")
            time.sleep(SYNC_POLL_S)   # the pace of the progress lines, not a synchronisation

    def verify(self, a: argparse.Namespace) -> int:
        with self.ledger() as led:
            bad, why = led.verify()
        if a.json:
            _dump({"ok": bad is None, "bad_seq": bad, "detail": why})
        if bad is None:
            if not a.json:
                print(f"ledger ok: {why}")
            return EXIT_OK
        print(f"ledger broken at seq {bad}: {why}", file=sys.stderr)
        return EXIT_FAILED

    def export(self, a: argparse.Namespace) -> int:
        out = Path(a.out)
        _refuse_symlink(out)
        with self.ledger() as led:
            count = _write_new_file(out, _export_lines(led, self.cfg.cabinet.id))
        print(f"exported {count} unsynced records to {out}")
        return EXIT_OK


def _export_lines(led: Ledger, cabinet: str) -> Iterator[str]:
    """The unsynced records, one JSON line each, as in mqtt.md plus the cabinet id (v1.1)."""
    for rec in led.records(newest_first=False, from_seq=led.acked_upto + 1):
        line = {**rec.wire(), "cabinet": cabinet}
        yield json.dumps(line, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n"


def _refuse_symlink(path: Path) -> None:
    """A symlink planted at the export's name would make us overwrite whatever it points to."""
    if path.is_symlink():
        raise CtlExit(EXIT_FAILED, f"{path} is a symbolic link: refusing to write through it")


def _write_new_file(out: Path, lines: Iterable[str]) -> int:
    """Write ``lines`` to ``out`` through a new file in its directory, renamed into place.

    The new file is created with O_CREAT|O_EXCL under an unpredictable name (mkstemp), so
    nothing planted beside ``out`` is ever followed; ``out`` only ever holds a complete file.
    Returns the number of lines.
    """
    directory = out.parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=directory)
    except OSError as exc:
        raise CtlExit(EXIT_FAILED, f"cannot write {out}: {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())   # mkstemp makes 0600; a plain file as open() would
            for line in lines:
                fh.write(line)
                count += 1
            fh.flush()
            os.fsync(fh.fileno())
        _refuse_symlink(out)   # planted while we wrote
        os.replace(tmp, out)
        _fsync_dir(directory)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CtlExit(EXIT_FAILED, f"cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (a USB stick pulled right after must hold the file)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seconds(text: str) -> float:
    """argparse type: a finite, positive number of seconds (``nan`` is not one)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number of seconds above 0")
    return value


def _scan_wait(text: str) -> float:
    value = _seconds(text)
    if value > MAX_SCAN_WAIT_S:
        raise argparse.ArgumentTypeError(f"{text!r}: at most {MAX_SCAN_WAIT_S:.0f} seconds")
    return value


def _timeout(text: str) -> float:
    """argparse type of ``sync --timeout``: 0 (no limit) or a finite positive number of seconds."""
    try:
        if float(text) == 0:
            return 0.0
    except ValueError:
        pass
    return _seconds(text)


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

    def add(name: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    s = add("status", help="mode, doors, lanes, sync, alarms")
    s.add_argument("--json", action="store_true")
    s = add("service", help="enter or leave service mode")
    s.add_argument("state", choices=["on", "off"])
    s = add("unlock", help="service unlock of a door")
    s.add_argument("door", type=int)
    s = add("restock", help="put a certified product into a lane")
    s.add_argument("lane")
    s.add_argument("--qty", type=int, default=1)
    s.add_argument("--code", help="product code; without it, scan the product with the camera")
    s.add_argument("--price", type=int, help="price in cents (needed for a product new to the lane)")
    s.add_argument("--wait", type=_scan_wait, default=30.0, help="seconds to wait for a scan")
    s = add("lanes", help="planogram: lane, product, price, weight, count")
    s.add_argument("--json", action="store_true")
    s = add("price", help="set a lane's price")
    s.add_argument("lane")
    s.add_argument("cents", type=int)
    s = add("tare", help="zero a lane's scale (or all)")
    s.add_argument("lane")
    s = add("calibrate", help="calibrate a lane's scale with a known weight on it")
    s.add_argument("lane")
    s.add_argument("grams", type=float)
    s = add("catalog", help="catalog info, lookup CODE, install FILE")
    s.add_argument("action", nargs="?", choices=["lookup", "install"])
    s.add_argument("arg", nargs="?", metavar="CODE|FILE")
    s.add_argument("--json", action="store_true")
    s = add("sales", help="ledger records, newest first")
    s.add_argument("--since", help="RFC 3339 time or date")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true")
    g.add_argument("--csv", action="store_true")
    s = add("sync", help="resend unacknowledged records")
    s.add_argument("--wait", action="store_true", help="block until every record is acknowledged")
    s.add_argument("--timeout", type=_timeout, default=0.0, help="with --wait: give up after this many seconds")
    s = add("verify", help="recompute the ledger's hash chain")
    s.add_argument("--json", action="store_true")
    s = add("export", help="write unsynced records as JSON lines")
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
    command: Callable[[argparse.Namespace], int] = getattr(Ctl(cfg), args.command)
    try:
        return command(args)
    except CtlExit as exc:
        if str(exc):
            _err(str(exc))
        return exc.code
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

"""``cabinet-platform``: the platform side of mqtt.md for a pilot (platform.md).

keygen, sign, command and publish-catalog drive cabinets; ingest stores their feeds; report
shows what the platform can prove; fleet simulates cabinets. Exit codes as ``cabinetctl``:
0 success, 1 refused or failed, 2 usage error, 3 unreachable.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from agent.errors import AgentError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

log = logging.getLogger("cabinet-platform")


class CliExit(Exception):
    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code


def _say(msg: str) -> None:
    print(f"cabinet-platform: {msg}", file=sys.stderr)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _key(path: str) -> Any:
    from agent.platform.keys import KeyFileError, load_private_key

    try:
        return load_private_key(Path(path))
    except KeyFileError as exc:
        raise CliExit(EXIT_FAILED, str(exc)) from None


def _brokers(urls: list[str]) -> list[Any]:
    from agent.platform.brokers import BrokerUrl, BrokerUrlError

    try:
        return [BrokerUrl.parse(u) for u in urls]
    except BrokerUrlError as exc:
        raise CliExit(EXIT_USAGE, str(exc)) from None


def _tls(a: argparse.Namespace) -> Any:
    from agent.platform.brokers import TlsFiles

    return TlsFiles(a.ca_file, a.cert_file, a.key_file)


def _read_json_object(path: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliExit(EXIT_FAILED, f"cannot read {path}: {exc}") from None
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise CliExit(EXIT_FAILED, f"{path} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CliExit(EXIT_FAILED, f"{path} is not a JSON object")
    return obj


# -- commands ---------------------------------------------------------------------------------------
def cmd_keygen(a: argparse.Namespace) -> int:
    from agent.platform.keys import KeyFileError, public_key_b64, write_new_key

    try:
        key = write_new_key(Path(a.out), overwrite=a.force)
    except KeyFileError as exc:
        raise CliExit(EXIT_FAILED, str(exc)) from None
    print(public_key_b64(key))
    return EXIT_OK


def cmd_sign(a: argparse.Namespace) -> int:
    from agent.platform.signing import signed_line

    obj = _read_json_object(a.file)
    try:
        print(signed_line(obj, _key(a.key)))
    except (ValueError, UnicodeEncodeError) as exc:
        raise CliExit(EXIT_FAILED, f"{a.file} cannot be signed: {exc}") from None
    return EXIT_OK


def cmd_command(a: argparse.Namespace) -> int:
    from agent.platform.signing import parse_arg
    from agent.platform.tools import BrokerUnreachable, send_command
    from agent.protocol import CABINET_ID_RE, canonical

    if not CABINET_ID_RE.match(a.cabinet):
        raise CliExit(EXIT_USAGE, f"cabinet id {a.cabinet!r} does not match {CABINET_ID_RE.pattern}")
    try:
        args = dict(parse_arg(text) for text in a.args)
    except ValueError as exc:
        raise CliExit(EXIT_USAGE, str(exc)) from None
    broker = _brokers([a.broker])[0]
    key = _key(a.key)
    try:
        command, reply = send_command(broker, key, a.cabinet, a.type, args, wait_s=a.wait, tls=_tls(a))
    except BrokerUnreachable as exc:
        raise CliExit(EXIT_UNREACHABLE, str(exc)) from None
    if reply is None:
        raise CliExit(EXIT_UNREACHABLE, f"no reply from {a.cabinet} to command {command['id']} within {a.wait:g} s")
    print(canonical(reply).decode("utf-8"))
    return EXIT_OK if reply.get("ok") is True else EXIT_FAILED


def cmd_publish_catalog(a: argparse.Namespace) -> int:
    from agent.platform.signing import now_ms, wire_ts
    from agent.platform.tools import BrokerUnreachable, publish_catalog

    doc = _read_json_object(a.file)
    version = doc.get("version")
    if type(version) is not int or version < 1:
        raise CliExit(EXIT_FAILED, f"{a.file}: version must be an integer >= 1")
    base = doc.get("base_version")
    if base is not None and type(base) is not int:
        raise CliExit(EXIT_FAILED, f"{a.file}: base_version must be null (a snapshot) or an integer (a delta)")
    if not isinstance(doc.get("products", []), list) or not isinstance(doc.get("revoked", []), list):
        raise CliExit(EXIT_FAILED, f"{a.file}: products and revoked must be lists")
    doc.setdefault("base_version", None)
    doc.setdefault("products", [])
    doc.setdefault("revoked", [])
    doc.setdefault("issued_at", wire_ts(now_ms()))
    broker = _brokers([a.broker])[0]
    try:
        signed, topic = publish_catalog(broker, _key(a.key), doc, tls=_tls(a))
    except BrokerUnreachable as exc:
        raise CliExit(EXIT_UNREACHABLE, str(exc)) from None
    kind = "snapshot (retained)" if signed["base_version"] is None else f"delta on version {signed['base_version']}"
    print(f"published catalog version {signed['version']}, {kind}, {len(signed['products'])} products,"
          f" {len(signed['revoked'])} revoked, to {topic}")
    return EXIT_OK


def _open_store(dsn: str, *, create: bool) -> Any:
    from agent.platform.dsn import open_store
    from agent.platform.store import DsnError, StoreError

    try:
        return open_store(dsn, create=create)
    except DsnError as exc:
        raise CliExit(EXIT_USAGE, str(exc)) from None
    except StoreError as exc:
        code = EXIT_FAILED if dsn.startswith("sqlite:") else EXIT_UNREACHABLE
        raise CliExit(code, str(exc)) from None


def cmd_ingest(a: argparse.Namespace) -> int:
    from agent.platform.ingest import IngestWorker

    _setup_logging(a.log_level)
    brokers = _brokers(a.broker)
    key = _key(a.key) if a.key else None
    if a.resend_after <= 0 or a.gap_grace < 0:
        raise CliExit(EXIT_USAGE, "--resend-after must be > 0 and --gap-grace >= 0")
    store = _open_store(a.db, create=True)
    worker = IngestWorker(brokers, store, group=a.group, key=key, resend_after_s=a.resend_after,
                          gap_grace_s=a.gap_grace, tls=_tls(a))

    def on_signal(signum: int, frame: FrameType | None) -> None:
        worker.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("ingest group %s on %s into %s", a.group, ", ".join(str(b) for b in brokers), a.db.split("@")[-1])
    worker.start()
    try:
        worker.run()
    finally:
        store.close()
    return EXIT_OK


def cmd_report(a: argparse.Namespace) -> int:
    from agent.platform import report
    from agent.platform.store import StoreError

    store = _open_store(a.db, create=False)
    try:
        data = report.build(store)
    except StoreError as exc:
        raise CliExit(EXIT_FAILED, f"cannot read the report: {exc}") from None
    finally:
        store.close()
    if a.json:
        report.write_json(data, sys.stdout)
    else:
        report.write_tables(data, sys.stdout)
    return EXIT_OK


def cmd_fleet(a: argparse.Namespace) -> int:
    from agent import protocol
    from agent.platform import fleet

    _setup_logging(a.log_level)
    brokers = _brokers(a.broker)
    if a.cabinets < 1:
        raise CliExit(EXIT_USAGE, "--cabinets must be >= 1")
    if a.public_key:
        try:
            protocol.load_public_key(a.public_key)
        except ValueError as exc:
            raise CliExit(EXIT_USAGE, f"--public-key: {exc}") from None
        public = a.public_key
    elif a.key:
        public = protocol.public_key_b64(_key(a.key))
    else:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        public = protocol.public_key_b64(Ed25519PrivateKey.generate())   # no commands will verify
    data_dir = Path(a.data_dir) if a.data_dir else Path(tempfile.mkdtemp(prefix="cabinet-fleet-"))
    spec = fleet.FleetSpec(
        brokers=tuple(str(b) for b in brokers), cabinet_ids=fleet.cabinet_ids(a.cabinets, a.prefix),
        data_dir=str(data_dir), public_key=public, sessions_per_min=a.sessions_per_min,
        status_interval_s=a.status_interval, ack_timeout_s=a.ack_timeout, backlog=a.backlog, tls=_tls(a))
    started = time.monotonic()
    fl = fleet.Fleet(spec, a.processes, log_level=getattr(logging, a.log_level.upper()))
    try:
        fl.wait_ready(120 + a.cabinets * 0.1)
        result = _run_fleet(fl, a, started)
    except fleet.FleetError as exc:
        raise CliExit(EXIT_FAILED, str(exc)) from None
    finally:
        fl.stop()
        if not a.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
    if a.json:
        print(json.dumps(result))
    else:
        print(f"fleet of {a.cabinets}: {result['published']} records published ({result['published_per_s']:.0f}/s),"
              f" {result['acked']} acknowledged ({result['acked_per_s']:.0f}/s) in {result['seconds']:.1f} s;"
              f" ack latency p50 {result['latency_p50_s']}, p99 {result['latency_p99_s']} s;"
              f" {result['undrained']} cabinets with unacked records")
    return EXIT_OK if result["undrained"] == 0 else EXIT_FAILED


def _run_fleet(fl: Any, a: argparse.Namespace, started: float) -> dict[str, Any]:
    from agent.platform.fleet import GroupStats

    latencies: list[float] = []
    first = fl.stats()
    acked0 = first.acked
    t0 = time.monotonic()
    end = t0 + a.duration
    last_print = t0
    last: GroupStats = first
    drain_deadline: float | None = None
    while True:
        time.sleep(0.5)
        st = fl.stats()
        latencies += st.latencies
        now = time.monotonic()
        if now - last_print >= 5.0 and not a.json:
            span = now - last_print
            print(f"{now - started:7.1f}s  online {st.connected}/{st.cabinets}  published {st.published}"
                  f" ({(st.published - last.published) / span:.0f}/s)  acked {st.acked}"
                  f" ({(st.acked - last.acked) / span:.0f}/s)  cabinets waiting for acks {st.undrained}", flush=True)
            last_print, last = now, st
        if now >= end and drain_deadline is None:
            fl.set_rate(0)
            drain_deadline = now + a.drain_timeout
        if drain_deadline is not None and (st.undrained == 0 or now >= drain_deadline):
            break
    elapsed = max(1e-9, time.monotonic() - t0)
    latencies.sort()
    return {"cabinets": st.cabinets, "online": st.connected, "seconds": round(elapsed, 3),
            "published": st.published, "published_per_s": st.published / elapsed,
            "acked": st.acked, "acked_per_s": (st.acked - acked0) / elapsed,
            "appended": st.appended, "undrained": st.undrained,
            "latency_p50_s": _pct(latencies, 0.50), "latency_p99_s": _pct(latencies, 0.99)}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 4)


# -- the parser -------------------------------------------------------------------------------------------
def _tls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca-file", help="CA certificates for mqtts:// brokers (default: the system's)")
    p.add_argument("--cert-file", help="client certificate for mqtts:// brokers")
    p.add_argument("--key-file", help="client certificate key for mqtts:// brokers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cabinet-platform",
                                     description="The platform side of mqtt.md for a pilot (platform.md).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("keygen", help="write a new Ed25519 private key, print its public key")
    p.add_argument("--out", required=True, metavar="KEY", help="where to write the key (PKCS#8 PEM, mode 0600)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("sign", help="sign a catalog document or a command, print it as one line")
    p.add_argument("--key", required=True, metavar="KEY")
    p.add_argument("file", metavar="FILE", help="a JSON object ('-' for standard input)")
    p.set_defaults(func=cmd_sign)

    p = sub.add_parser("command", help="send one signed command and print the reply")
    p.add_argument("--broker", required=True, metavar="URL")
    p.add_argument("--key", required=True, metavar="KEY")
    p.add_argument("--cabinet", required=True, metavar="ID")
    p.add_argument("--wait", type=float, default=10.0, metavar="S", help="seconds to wait for the reply (10)")
    p.add_argument("type", metavar="TYPE", help="open_door, resend, status, set_lane")
    p.add_argument("args", nargs="*", metavar="ARG=VALUE", help="VALUE is read as JSON when it is JSON (door=1)")
    _tls_args(p)
    p.set_defaults(func=cmd_command)

    p = sub.add_parser("publish-catalog", help="sign and publish a catalog snapshot or delta")
    p.add_argument("--broker", required=True, metavar="URL")
    p.add_argument("--key", required=True, metavar="KEY")
    p.add_argument("file", metavar="FILE", help="the catalog document (JSON; '-' for standard input)")
    _tls_args(p)
    p.set_defaults(func=cmd_publish_catalog)

    p = sub.add_parser("ingest", help="the reference ingest worker (runs until SIGTERM)")
    p.add_argument("--broker", required=True, action="append", metavar="URL", help="repeat for every shard")
    p.add_argument("--db", required=True, metavar="DSN", help="sqlite:///PATH or postgresql://user@host:port/db")
    p.add_argument("--group", default="ingest", metavar="NAME", help="shared subscription group (ingest)")
    p.add_argument("--key", metavar="KEY", help="sign resend commands for gaps with this key")
    p.add_argument("--resend-after", type=float, default=30.0, metavar="S",
                   help="ask a cabinet for a gap at most once per S seconds (30)")
    p.add_argument("--gap-grace", type=float, default=5.0, metavar="S",
                   help="a gap is asked for once it is S seconds old (5): younger ones are mostly in flight")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _tls_args(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("report", help="the supervision report")
    p.add_argument("--db", required=True, metavar="DSN")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("fleet", help="N simulated cabinets running the agent's ledger, sync and link")
    p.add_argument("--broker", required=True, action="append", metavar="URL",
                   help="repeat to shard the cabinets over several brokers")
    p.add_argument("--cabinets", required=True, type=int, metavar="N")
    p.add_argument("--sessions-per-min", type=float, default=1.0, metavar="R", help="per cabinet (1)")
    p.add_argument("--duration", type=float, default=60.0, metavar="S", help="seconds of sessions (60)")
    p.add_argument("--backlog", type=int, default=0, metavar="N", help="records each cabinet holds at start (0)")
    p.add_argument("--processes", type=int, default=None, metavar="P",
                   help="fleet processes (default: one per 100 cabinets)")
    p.add_argument("--prefix", default="FLEET", help="cabinet ids are PREFIX-0001, ... (FLEET)")
    p.add_argument("--data-dir", metavar="DIR", help="keep the ledgers here (default: a temporary directory)")
    p.add_argument("--key", metavar="KEY", help="the platform's private key: the cabinets trust its public half")
    p.add_argument("--public-key", metavar="B64", help="the platform public key the cabinets trust")
    p.add_argument("--status-interval", type=float, default=60.0, metavar="S")
    p.add_argument("--ack-timeout", type=float, default=30.0, metavar="S")
    p.add_argument("--drain-timeout", type=float, default=60.0, metavar="S",
                   help="after the sessions, how long to wait for every record to be acknowledged (60)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    _tls_args(p)
    p.set_defaults(func=cmd_fleet)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CliExit as exc:
        if str(exc):
            _say(str(exc))
        return exc.code
    except AgentError as exc:
        _say(str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

"""``cabinet-agent``: run the daemon, check a config, decode images, or run the demo."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

from agent import __version__
from agent.cli.early import EarlyStop
from agent.errors import AgentError, ConfigError


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _stop_on_signals(stop: threading.Event | None = None) -> threading.Event:
    """SIGTERM/SIGINT set the returned event, from the first moment of ``run`` on: a signal that
    arrives while the daemon is still starting stops it cleanly with exit 0 (operations.md v1.1).
    ``stop``: the event the entry point's early handler may already have set (agent.cli.entry)."""
    stop = stop if stop is not None else threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logging.getLogger("agent.daemon").info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def cmd_run(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    stop = _stop_on_signals(stop)
    from agent.config import config_path, load_config  # heavy imports after the handlers
    from agent.daemon import Daemon

    _setup_logging(args.log_level)
    try:
        cfg = load_config(config_path(args.config))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    if stop.is_set():
        return 0
    try:
        daemon = Daemon(cfg, stop)
    except AgentError as exc:  # the ledger, the catalog cache, another daemon on data_dir
        print(f"cabinet-agent: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cabinet-agent: cannot use {cfg.cabinet.data_dir}: {exc}", file=sys.stderr)
        return 1
    try:
        return daemon.run_forever()
    except AgentError as exc:  # a start that fails says why in one line (operations.md)
        print(f"cabinet-agent: {exc}", file=sys.stderr)
        return 1


def cmd_check_config(args: argparse.Namespace) -> int:
    """Exit 0, or 2 with one ``key.path: ...`` line per problem on stderr (operations.md);
    besides the keys, v1.1 checks that the files the config names can be read."""
    from agent.config import config_path, file_problems, load_config

    path = config_path(args.config)
    try:
        cfg = load_config(path)
        problems = file_problems(cfg)
    except ConfigError as exc:
        problems = exc.problems
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        return 2
    for warning in cfg.platform.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: ok")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from agent.cli.decode import run

    return run(args.images, args.json)


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.sim.demo import run_demo

    return run_demo(sessions=args.sessions, speed=args.speed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cabinet-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cabinet-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the daemon")
    p.add_argument("--config", help="config file (default $CABINET_AGENT_CONFIG or /etc/cabinet-agent/agent.toml)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("--config")
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("decode", help="run the barcode pipeline on image files")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_decode)
    p = sub.add_parser("demo", help="a simulated cabinet, broker and platform running shopping sessions")
    p.add_argument("--sessions", type=int, default=8, help="how many shopping sessions to run (0 = until Ctrl-C)")
    p.add_argument("--speed", type=float, default=1.0, help="pace of the simulated shoppers (2 = twice as fast)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None, early: EarlyStop | None = None) -> int:
    """``early``: the handlers the entry point installed before this module was imported."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        if early is not None:
            early.release()
        raise
    if args.func is cmd_run:
        return int(cmd_run(args, early.event if early is not None else None))
    if early is not None:
        early.release()
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

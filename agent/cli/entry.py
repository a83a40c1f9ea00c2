"""``cabinet-agent``'s entry point: SIGTERM and SIGINT are caught before anything heavy loads.

Under ``Restart=always`` a stop may come at any moment of a start, and it must end the daemon
with exit 0 (operations.md v1.1). Importing argparse, logging, the config and the daemon takes
tens of milliseconds on a small board, more on a busy one; the handlers are in place before
that. A command other than ``run`` gets the default dispositions back, and a signal that came
meanwhile is delivered again, so ``decode`` or ``check-config`` stop on a signal as before.
"""

from __future__ import annotations

from agent.cli.early import EarlyStop


def main() -> int:
    early = EarlyStop().install()
    from agent.cli.main import main as cli_main

    return cli_main(early=early)

"""What the daemon imports: a cabinet runs ``cabinet-agent run`` with the runtime
dependencies only, so the demo extra (``pip install .[demo]``) and the code that never runs
on a cabinet must stay out of its import closure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The demo extra, and the packages that exist for the demo, the tests and the platform side.
NOT_ON_A_CABINET = ("barcode", "segno", "tomli_w", "PIL", "agent.sim", "agent.platform")


def _closure(*modules: str) -> set[str]:
    """Every module a fresh interpreter holds after importing ``modules`` (as the daemon does)."""
    code = f"import {', '.join(modules)}; import sys; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         check=True)
    return set(out.stdout.split())


def test_daemon_imports_no_demo_dependencies() -> None:
    # drivers.camera.scanner is imported by the daemon when a camera is configured.
    loaded = _closure("agent.daemon", "agent.cli.main", "drivers.camera.scanner")
    assert "agent.daemon" in loaded and "drivers.camera.scanner" in loaded  # the probe itself works
    found = sorted(m for m in loaded if any(m == bad or m.startswith(bad + ".") for bad in NOT_ON_A_CABINET))
    assert found == [], f"the daemon imports {found}"

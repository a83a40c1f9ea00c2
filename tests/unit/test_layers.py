"""The house rules, read from the source with ``ast`` (imports under TYPE_CHECKING count too).

- no import cycle among the modules of agent/ and drivers/;
- drivers/ imports nothing from agent/;
- agent.rules imports only agent.protocol, agent.config and agent.errors (besides itself);
- agent.store imports only agent.protocol and agent.errors (besides itself) and drivers;
- nothing outside agent.cli imports agent.sim, and nothing on the cabinet imports agent.platform;
- agent.sessions and agent.status never import agent.core.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("agent", "drivers")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module ``name`` refers to (a name imported from a module may be a module)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    is_pkg = MODULES[module].name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module if is_pkg else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            target = _resolve(name)
            if target is not None and target != module and not module.startswith(target + "."):
                found.add(target)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_was_read() -> None:
    assert "agent.core" in GRAPH and "agent.sessions" in GRAPH["agent.core"]
    assert "drivers.gs1" in GRAPH["agent.core"]


def test_no_import_cycles() -> None:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}   # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])
    assert cycles == []


def _violations(source_pkg: str, allowed: tuple[str, ...], outside: tuple[str, ...] = PACKAGES) -> list[str]:
    bad = []
    for module, targets in GRAPH.items():
        if not _in(module, source_pkg):
            continue
        for t in targets:
            if any(_in(t, o) for o in outside) and not any(_in(t, a) for a in allowed):
                bad.append(f"{module} -> {t}")
    return sorted(bad)


def test_drivers_import_nothing_from_agent() -> None:
    assert _violations("drivers", ("drivers",)) == []


def test_rules_import_only_protocol_config_errors() -> None:
    assert _violations("agent.rules", ("agent.rules", "agent.protocol", "agent.config", "agent.errors",
                                       "drivers.gs1", "drivers.errors")) == []


def test_store_imports_only_protocol_and_errors() -> None:
    assert _violations("agent.store", ("agent.store", "agent.protocol", "agent.errors", "drivers")) == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _in(m, "agent") and not _in(m, "agent.cli")
                                          and not _in(m, "agent.sim")))
def test_only_the_cli_imports_sim(module: str) -> None:
    assert [t for t in GRAPH[module] if _in(t, "agent.sim")] == []


def test_nothing_on_the_cabinet_imports_the_platform_side() -> None:
    cabinet = [m for m in MODULES if _in(m, "agent") and not any(_in(m, p) for p in
                                                                  ("agent.cli", "agent.sim", "agent.platform"))]
    assert sorted(f"{m} -> {t}" for m in cabinet for t in GRAPH[m] if _in(t, "agent.platform")) == []


@pytest.mark.parametrize("module", ["agent.sessions", "agent.status", "agent.recorder", "agent.state"])
def test_collaborators_never_import_the_core(module: str) -> None:
    assert "agent.core" not in GRAPH[module]

"""The layout's rules (DESIGN.md), read from the source: no import circles, reusable components that
know no system, and a system known by name only inside its own package (and the registry's list).

Module-level imports only: an import inside a function (loaded on first use) or under
``if TYPE_CHECKING`` cannot make a circle at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

from edgeav.systems import SYSTEMS

ROOT = Path(__file__).resolve().parents[1]
# Import name -> source folder (pyproject's package-dir).
PACKAGES = {"edgeav": "edgeav", "edgeav.cli": "cli", "edgeav.export": "export", "edgeav.kernels": "kernels",
            "edgeav.bench": "bench"}
# The benchmark folder holds Crab's demo world and the script that trains the demo model on it.
MAY_NAME_A_SYSTEM = ("edgeav.bench",)


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if package == "edgeav" and parts[0] in {p.split(".")[1] for p in PACKAGES if "." in p}:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _top_level_imports(path: Path, module: str, modules: dict[str, Path]) -> set[str]:
    """The edgeav modules ``module`` imports when it is imported."""
    tree = ast.parse(path.read_text(), str(path))
    statements = list(tree.body)
    names: set[str] = set()
    while statements:
        node = statements.pop()
        if isinstance(node, ast.If) and not _is_type_checking(node):
            statements += node.body + node.orelse
        elif isinstance(node, ast.Try):
            statements += node.body + node.orelse + node.finalbody
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                      for alias in node.names}
    return {name for name in names if name in modules and name != module}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _top_level_imports(path, name, modules) for name, path in modules.items()}


def test_the_package_map_finds_every_layer():
    modules = _modules()
    for expected in ("edgeav.runtime", "edgeav.systems", "edgeav.systems.crab.pipeline", "edgeav.systems.ullava.model",
                     "edgeav.models.sam", "edgeav.stream.pipeline", "edgeav.export.exporter", "edgeav.cli.inference"):
        assert expected in modules
    assert "edgeav.systems.crab.model" in _graph()["edgeav.systems.crab.checkpoints"]


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(path[path.index(target):] + [target] if target in path else [module, target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def _inside(module: str, system: str) -> bool:
    """``module`` is system ``system``'s package or one of its modules (``crab`` is not ``crabplus``)."""
    return module == f"edgeav.systems.{system}" or module.startswith(f"edgeav.systems.{system}.")


def test_components_and_shared_modules_know_no_system():
    graph = _graph()
    offenders = {}
    for module, targets in graph.items():
        own = next((s for s in SYSTEMS if _inside(module, s)), None)
        if module.startswith(MAY_NAME_A_SYSTEM):
            continue
        named = {t for t in targets for s in SYSTEMS if _inside(t, s) and s != own}
        if named:
            offenders[module] = sorted(named)
    assert offenders == {}


def test_models_import_no_system_at_all():
    source = "\n".join(path.read_text() for path in (ROOT / "edgeav" / "models").glob("*.py"))
    assert "edgeav.systems" not in source

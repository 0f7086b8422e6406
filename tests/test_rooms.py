"""The house: imports point one way between the rooms, with no circle and no reach into private names.

Rooms, bottom to top (a module may import its own room and the rooms below it):

    version, errors, devices, bits, safeio, config  <  data  <  storage  <  analysis  <  training  <  runs  <  report
      <  plugin  <  cli

Every import counts, at the top of a module or inside a function (a lazy import is still a
dependency); only `if TYPE_CHECKING:` blocks are left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flannel_repro"
ROOMS = {
    "version": 0,
    "errors": 0,
    "devices": 0,
    "bits": 0,
    "safeio": 0,
    "config": 0,
    "data": 1,
    "storage": 2,
    "analysis": 3,
    "training": 4,
    "runs": 5,
    "report": 6,
    "plugin": 7,
    "cli": 8,
    "__main__": 8,
    "__init__": 8,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("flannel_repro",) + (parts[:-1] if parts[-1] == "__init__" else parts))
        out[name] = path
    return out


MODULES = _modules()


def _room(module: str) -> int:
    parts = module.split(".")
    return ROOMS[parts[1] if len(parts) > 1 else "__init__"]


def _resolve(base: str, name: str | None) -> str:
    """`from base import name`: the submodule when `name` is one, else `base` itself."""
    if name is not None and f"{base}.{name}" in MODULES:
        return f"{base}.{name}"
    return base


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """(module imported, name imported from it) for every import outside `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.extend((a.name, None) for a in node.names if a.name.startswith("flannel_repro"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flannel_repro"):
            found.extend((_resolve(node.module, a.name), a.name) for a in node.names)
    return found


GRAPH = {m: sorted({target for target, _ in _imports(p) if target != m}) for m, p in MODULES.items()}


def test_imports_point_down_the_rooms():
    upward = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets if t in MODULES and _room(t) > _room(m)]
    assert upward == []


def test_no_import_circle():
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in GRAPH.get(m, []):
            if state.get(t) == 1:
                return path[path.index(t) :] + [t]
            if t not in state:
                cycle = visit(t)
                if cycle:
                    return cycle
        path.pop()
        state[m] = 2
        return None

    for m in GRAPH:
        if m not in state:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)


def test_nothing_imports_the_plugin_and_no_private_names_cross_modules():
    into_plugin = [
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        for t in targets
        if t.startswith("flannel_repro.plugin") and not m.startswith("flannel_repro.plugin")
    ]
    assert into_plugin == []
    private = [
        f"{m}: {name} from {t}"
        for m, p in MODULES.items()
        for t, name in _imports(p)
        if name is not None and name.startswith("_") and name != "__version__" and t != m
    ]
    assert private == []


def test_every_module_imports_in_a_fresh_interpreter_in_room_order():
    order = sorted(MODULES, key=lambda m: (_room(m), m))
    order = [m for m in order if not m.endswith("__main__")]  # runs the CLI when imported
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('ok', len(sys.argv) - 1)"
    done = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"ok {len(order)}"

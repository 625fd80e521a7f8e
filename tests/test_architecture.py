"""The layout's rules: fdrl.core needs neither Ray nor MLflow, and no fdrl module imports itself
back through another (no import cycles, counting imports inside functions too)."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "fdrl"

BLOCKER = """
import importlib.abc, pkgutil, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "mlflow"):
            raise ImportError(f"{name} is not importable in this test")

sys.meta_path.insert(0, Refuse())
import fdrl.core
for info in pkgutil.iter_modules(fdrl.core.__path__, "fdrl.core."):
    __import__(info.name)
    print(info.name)
"""


def test_core_imports_without_ray_or_mlflow():
    proc = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True,
                          env={"PYTHONPATH": str(PACKAGE.parent), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    imported = set(proc.stdout.split())
    on_disk = {f"fdrl.core.{p.stem}" for p in (PACKAGE / "core").glob("*.py") if p.stem != "__init__"}
    assert imported == on_disk and len(on_disk) >= 6


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """fdrl modules that ``path`` imports anywhere in its body (``from fdrl.x import y`` counts
    fdrl.x.y when that is a module, else fdrl.x)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in modules}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: _imports(path, modules) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == "fdrl":  # the package root only sets environment defaults
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert "fdrl.core.sampler" in graph and "fdrl.tracking.registry" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_core_depends_on_nothing_outside_core():
    for name, deps in import_graph().items():
        if name.startswith("fdrl.core"):
            outside = {d for d in deps if not d.startswith("fdrl.core") and d != "fdrl"}
            assert not outside, f"{name} imports {sorted(outside)}"

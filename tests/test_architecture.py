"""The layering table of docs/architecture.md, enforced: which fdrl packages each package may
import, which third-party frameworks each may import (Ray only in fdrl.distributed, MLflow only
in fdrl.tracking), that every module of those two is glue of its framework, that fdrl.core
imports with Ray and MLflow unimportable, and that there are no import cycles."""

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "fdrl"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

# package -> the fdrl packages it may import (besides itself). The same table as the docs'.
ALLOWED = {
    "fdrl.env": set(),
    "fdrl.core": set(),
    "fdrl.data": {"fdrl.core", "fdrl.env"},
    "fdrl.config": {"fdrl.core", "fdrl.data", "fdrl.env"},
    "fdrl.eval": {"fdrl.core", "fdrl.data", "fdrl.env"},
    "fdrl.tracking": {"fdrl.core", "fdrl.data", "fdrl.eval", "fdrl.config", "fdrl.env"},
    "fdrl.distributed": {"fdrl.core", "fdrl.data", "fdrl.eval", "fdrl.config", "fdrl.env"},
    "fdrl.workflows": {"fdrl.core", "fdrl.data", "fdrl.eval", "fdrl.config", "fdrl.env",
                       "fdrl.tracking", "fdrl.distributed", "fdrl.presets"},
    "fdrl.presets": {"fdrl.config", "fdrl.data"},
    "fdrl.cli": {"fdrl.config", "fdrl.workflows", "fdrl.distributed"},
}
# framework -> the only package that may import it; every module of that package does.
FRAMEWORKS = {"ray": "fdrl.distributed", "mlflow": "fdrl.tracking"}

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


def _imported_names(path: Path) -> set[str]:
    """Every module name ``path`` imports anywhere in its body, absolute form."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _files() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """fdrl module -> the fdrl modules it imports (``from fdrl.x import y`` counts fdrl.x.y when
    that is a module, else fdrl.x)."""
    files = _files()
    modules = set(files)
    graph = {}
    for name, path in files.items():
        names = _imported_names(path)
        graph[name] = {n for n in names if n in modules} - {name}
    return graph


def package_of(module: str) -> str:
    """fdrl.core.flow -> fdrl.core; a top-level module (fdrl.cli) is its own package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def layer_breaks(graph: dict[str, set[str]]) -> list[str]:
    breaks = []
    for module, deps in sorted(graph.items()):
        if module == "fdrl":
            continue
        own = package_of(module)
        allowed = ALLOWED[own] | {own, "fdrl"}
        breaks += [f"{module} imports {dep}" for dep in sorted(deps) if package_of(dep) not in allowed]
    return breaks


def framework_breaks() -> list[str]:
    """Ray or MLflow imported outside its glue package, and modules of a glue package that are
    not glue: a module is glue when it imports the framework, or imports or is imported by a glue
    module of its package (the machinery behind it, like the tracker's spool)."""
    files, graph = _files(), import_graph()
    roots = {m: {n.split(".")[0] for n in _imported_names(p)} for m, p in files.items()}
    breaks = []
    for framework, home in FRAMEWORKS.items():
        members = {m for m in files if package_of(m) == home and m != home}
        breaks += [f"{m} imports {framework} (only {home} may)" for m in sorted(files)
                   if framework in roots[m] and m not in members]
        glue = {m for m in members if framework in roots[m]}
        while True:
            more = {m for m in members - glue if graph[m] & glue or any(m in graph[g] for g in glue)}
            if not more:
                break
            glue |= more
        breaks += [f"{m} is in {home} but is no {framework} glue" for m in sorted(members - glue)]
    return breaks


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


def test_every_package_is_in_the_table():
    packages = {package_of(m) for m in _files()} - {"fdrl"}
    assert packages == set(ALLOWED)


def test_packages_import_only_the_layers_below():
    assert layer_breaks(import_graph()) == []


def test_ray_and_mlflow_stay_in_their_glue_packages():
    assert framework_breaks() == []


def test_the_checks_catch_breaks():
    graph = {"fdrl.core.flow": {"fdrl.tracking.registry"}, "fdrl.eval.fid": {"fdrl.core.flow"}}
    assert layer_breaks(graph) == ["fdrl.core.flow imports fdrl.tracking.registry"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    graph = import_graph()
    assert "fdrl.core.sampler" in graph and "fdrl.tracking.registry" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_docs_table_is_this_table():
    """docs/architecture.md's layering table lists, per package, exactly the packages ALLOWED
    gives it: the documentation and the check cannot drift apart."""
    rows = {}
    for line in DOCS.read_text().splitlines():
        m = re.match(r"\|\s*`(fdrl\.\w+)`[^|]*\|[^|]*\|\s*([^|]*)\|", line)
        if m:
            rows[m.group(1)] = set(re.findall(r"`(fdrl\.\w+)`", m.group(2)))
    assert rows == ALLOWED

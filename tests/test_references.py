"""Names that only a reader would catch going stale: the fdrl modules and names that jobs,
benchmarks, dataset tools and examples import (benchmarks run by hand, so no other test imports
them), and the source files the docs point to."""

import ast
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for folder in ("jobs", "benchmarks", "datasets", "docs/examples")
                 for p in (REPO / folder).glob("*.py"))
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def fdrl_imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) for every ``from fdrl... import name`` and (module, None) for ``import fdrl...``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fdrl":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "fdrl"]
    return found


def test_scripts_are_found():
    assert len(SCRIPTS) > 20 and any(p.parent.name == "benchmarks" for p in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_fdrl_import_of_a_script_resolves(script):
    missing = []
    for module, name in fdrl_imports(script):
        try:
            imported = importlib.import_module(module)
        except ImportError as err:
            missing.append(f"{module}: {err}")
            continue
        if name is not None and not hasattr(imported, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{module}.{name}")
    assert not missing, f"{script.relative_to(REPO)} imports what does not exist: {missing}"


def test_every_source_file_the_docs_name_exists():
    pattern = re.compile(r"\b(?:platform/)?(fdrl/[\w/]+\.py)\b")
    stale = [f"{doc.name}: {m}" for doc in DOCS for m in sorted(set(pattern.findall(doc.read_text())))
             if not (REPO / "platform" / m).is_file()]
    assert not stale, stale


def test_every_job_and_script_the_docs_name_exists():
    # lower-case names only: the README's jobs/X.py stands for any job
    pattern = re.compile(r"\b((?:jobs|benchmarks|datasets|docs/examples)/[a-z][\w-]*\.py)\b")
    stale = [f"{doc.name}: {m}" for doc in DOCS for m in sorted(set(pattern.findall(doc.read_text())))
             if not (REPO / m).is_file()]
    assert not stale, stale

"""The library apart from the benchmark harness.

``import bingo`` and the trainer integrations never load :mod:`bingo.bench`
(datasets, model zoo, training loops, baselines, reports, the CLI), nor the
harness's own dependencies, matplotlib, scikit-learn and tqdm; and the core's
source never imports those three at all, not even inside a function.

Each import is checked in a fresh interpreter, since this test process has
loaded the harness long ago. ``import torch`` loads tqdm by itself when it is
installed (``torch.hub`` uses it for progress bars), and Lightning and
Transformers load what they need, so what counts is what *bingo* adds: the
modules new in ``sys.modules`` after the module under test is imported on top
of those, and every ``import`` statement executed by a core module (an
``__import__`` hook), which catches a core module importing tqdm even though
torch has loaded it already.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bingo

FORBIDDEN = ("bingo.bench", "matplotlib", "sklearn", "tqdm")
CORE = Path(bingo.__file__).resolve().parent

#: the one place each core file may name the harness: the lazy wrapper of ``bingo.export_checkpoint``, and ``python -m bingo``
LAZY_HARNESS_IMPORTS = {"export.py": {"export_checkpoint"}, "__main__.py": {"<module>"}}

PROBE = r"""
import builtins, importlib, importlib.util, json, sys

FORBIDDEN = {forbidden!r}
real_import = builtins.__import__
statements = []


def forbidden(name):
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def spy(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {{}}).get("__name__") or ""
    if importer.split(".")[0] == "bingo" and not forbidden(importer):
        base = importlib.util.resolve_name("." * level + name, globals.get("__package__")) if level else name
        for target in (base, *(base + "." + item for item in fromlist or ())):
            if forbidden(target):
                statements.append([importer, target])
    return real_import(name, globals, locals, fromlist, level)


for name in {baseline!r}:
    importlib.import_module(name)
before = set(sys.modules)
builtins.__import__ = spy
importlib.import_module({module!r})
builtins.__import__ = real_import
loaded = sorted(m for m in set(sys.modules) - before if forbidden(m))
print(json.dumps({{"loaded": loaded, "statements": statements}}))
"""


def probe(module: str, baseline: tuple[str, ...] = ("torch",), path: Path = CORE.parent) -> dict:
    """Import ``baseline`` then ``module`` in a fresh interpreter: what of :data:`FORBIDDEN` ``module`` brought in.

    ``{"loaded": new modules in sys.modules, "statements": [[core module, forbidden name it imported], ...]}``.
    """
    code = PROBE.format(forbidden=FORBIDDEN, baseline=baseline, module=module)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_bingo_loads_no_harness():
    """``import bingo`` in a fresh interpreter: nothing of the harness beyond what ``import torch`` alone loads (tqdm, by torch.hub)."""
    by_torch = probe("torch", baseline=())["loaded"]
    assert {m.split(".")[0] for m in by_torch} <= {"tqdm"}
    result = probe("bingo", baseline=())
    assert result["loaded"] == by_torch, f"import bingo loads {sorted(set(result['loaded']) - set(by_torch))}"
    assert result["statements"] == [], f"core modules import {result['statements']}"


INTEGRATIONS = [
    ("bingo.integrations", ("torch",)),
    ("bingo.integrations.session", ("torch",)),
    ("bingo.integrations.lightning", ("torch", "lightning")),
    ("bingo.integrations.transformers", ("torch", "transformers")),
]


@pytest.mark.parametrize(("module", "baseline"), INTEGRATIONS, ids=[module for module, _ in INTEGRATIONS])
def test_integrations_load_no_harness(module, baseline):
    """Each integration on top of torch (and its trainer, which may load what it likes): bingo adds nothing of the harness."""
    for name in baseline:
        pytest.importorskip(name)
    result = probe(module, baseline)
    assert result["loaded"] == [], f"import {module} loads {result['loaded']}"
    assert result["statements"] == [], f"core modules import {result['statements']}"


def test_the_probe_sees_a_harness_import(tmp_path):
    """The check would fail: a core module importing the harness, or tqdm (already loaded by torch), is caught."""
    package = tmp_path / "bingo"
    (package / "bench").mkdir(parents=True)
    (package / "__init__.py").write_text("from . import core\n")
    (package / "core.py").write_text("import tqdm  # noqa\nfrom .bench import training  # noqa\n")
    (package / "bench" / "__init__.py").write_text("")
    (package / "bench" / "training.py").write_text("import tqdm  # noqa: the harness may\n")
    result = probe("bingo", baseline=("tqdm",), path=tmp_path)
    assert result["loaded"] == ["bingo.bench", "bingo.bench.training"]
    assert result["statements"] == [["bingo.core", "tqdm"], ["bingo.core", "bingo.bench"], ["bingo.core", "bingo.bench.training"]]


def _imports(tree: ast.AST, package: str) -> list[tuple[str, str, int]]:
    """``(absolute name, enclosing top-level function or class or "<module>", line)`` of every import in a file of ``package``."""
    found = []

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and scope == "<module>" else scope
            if isinstance(child, ast.Import):
                found.extend((alias.name, scope, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - child.level + 1] + ([child.module] if child.module else []))
                else:
                    base = child.module or ""
                found.append((base, scope, child.lineno))
                found.extend((f"{base}.{alias.name}", scope, child.lineno) for alias in child.names)
            visit(child, inner)

    visit(tree, "<module>")
    return found


def test_core_source_never_imports_the_harness_or_its_dependencies():
    """Not even lazily: matplotlib, scikit-learn and tqdm are used only in bingo.bench; bench is named only by two lazy entry points."""
    offences = []
    for path in sorted(CORE.rglob("*.py")):
        relative = path.relative_to(CORE)
        if relative.parts[0] == "bench":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, scope, line in _imports(tree, ".".join(["bingo", *relative.parts[:-1]])):
            top = name.split(".")[0]
            if top in ("matplotlib", "sklearn", "tqdm"):
                offences.append(f"{relative}:{line} imports {name}")
            elif name == "bingo.bench" or name.startswith("bingo.bench."):
                allowed = LAZY_HARNESS_IMPORTS.get(str(relative), set())
                if scope not in allowed:
                    offences.append(f"{relative}:{line} imports {name} in {scope}")
    assert offences == []

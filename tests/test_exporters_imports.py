"""The exporters import at module top and one way only: no module imports one that (indirectly) imports it back."""

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

EXPORTERS = Path(__file__).resolve().parents[1] / "exporters"
PACKAGE = "laser_batch.exporters"
MODULES = sorted(p.stem for p in EXPORTERS.glob("*.py") if p.stem != "__init__")
# Imported where used, on purpose: importing it configures the root logger (see exporters/quantize.py `_nbits`).
LAZY = {("quantize", "onnxruntime.quantization.matmul_nbits_quantizer")}


def _tree(module: str) -> ast.Module:
    return ast.parse((EXPORTERS / f"{module}.py").read_text())


def _exporters_imported(tree: ast.Module) -> set[str]:
    """The exporters modules that a module imports."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == PACKAGE:
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(f"{PACKAGE}."):
            found.add(node.module.removeprefix(f"{PACKAGE}."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix(f"{PACKAGE}.") for a in node.names if a.name.startswith(f"{PACKAGE}.")}
    return found


def test_the_modules_are_the_ones_the_package_documents():
    assert MODULES == ["export", "gate", "manifest", "parts", "quantize", "smooth", "validate"]


@pytest.mark.parametrize("module", MODULES)
def test_every_import_sits_at_module_top(module):
    tree = _tree(module)
    top = {id(node) for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)}
    nested = [(node.lineno, node.module) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom | ast.Import)
              and id(node) not in top and (module, getattr(node, "module", None)) not in LAZY]
    assert nested == [], f"exporters/{module}.py imports inside a function or block: {nested}"


def test_the_exporters_import_each_other_one_way():
    graph = {module: _exporters_imported(_tree(module)) for module in MODULES}
    assert graph["quantize"] >= {"validate"} and "export" not in graph["quantize"] | graph["validate"]
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        pytest.fail(f"exporters import each other in a loop: {e.args[1]}")
    assert order[-1] == "export"  # the entry point: nothing imports it


def test_each_module_imports_first_in_a_fresh_interpreter_and_leaves_logging_alone():
    """Import each module first (the others after it), each time with every exporters module unloaded.

    Importing them must not configure logging: the CLI sets up its handler, and a root handler would print every
    line twice.
    """
    script = f"""
import importlib, logging, sys
modules = {MODULES!r}
for first in modules:
    for name in [n for n in sys.modules if n == {PACKAGE!r} or n.startswith({PACKAGE!r} + ".")]:
        del sys.modules[name]
    for module in [first, *reversed([m for m in modules if m != first])]:
        importlib.import_module({PACKAGE!r} + "." + module)
    print("imported", first, "first")
print("root handlers", logging.getLogger().handlers)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:-1] == [*(f"imported {m} first" for m in MODULES), "root handlers []"]

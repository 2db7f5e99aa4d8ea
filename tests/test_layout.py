"""The package layout is an architecture rule: the compiler core never imports a workflow.

Core = the ``djpq_compiler`` top level (minus the CLI entry points), the integer IR
(``djpq_compiler.ir``), ``passes/``, ``backends/``, ``modules/`` and ``testing/``. Workflows
(``djpq_compiler.workflows``: data, zoo, training, demo, compress, reports) and the CLI are
applications of the core and may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE_DIRS = ("djpq_compiler", "djpq_compiler/ir", "djpq_compiler/modules", "djpq_compiler/testing",
             "passes", "passes/dependency", "passes/lowering", "backends", "backends/tvm",
             "backends/tvm/kernels", "backends/onnx")
APPLICATIONS = ("djpq_compiler.workflows", "djpq_compiler.cli", "djpq_compiler.__main__")
NOT_CORE = {"djpq_compiler/cli.py", "djpq_compiler/__main__.py"}


def core_files() -> list[Path]:
    files = [p for d in CORE_DIRS for p in sorted((ROOT / d).glob("*.py"))]
    return [p for p in files if str(p.relative_to(ROOT)) not in NOT_CORE]


def imported_modules(path: Path) -> list[str]:
    """Absolute module names imported by ``path`` (``from a.b import c`` gives ``a.b.c``)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_core_files_are_found():
    files = {str(p.relative_to(ROOT)) for p in core_files()}
    assert {"djpq_compiler/convert.py", "djpq_compiler/ir/modules.py", "passes/to_integer.py",
            "backends/tvm/build.py", "backends/onnx/export.py"} <= files
    assert not files & NOT_CORE


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_never_imports_an_application(path):
    bad = [name for name in imported_modules(path)
           if any(name == app or name.startswith(app + ".") for app in APPLICATIONS)]
    assert not bad, f"{path.relative_to(ROOT)} imports application module(s) {bad}"


def test_workflows_are_not_at_the_top_level():
    for name in ("data", "zoo", "train", "finetune", "demo", "demo_stages", "compress", "report"):
        assert not (ROOT / "djpq_compiler" / f"{name}.py").exists(), name
        assert (ROOT / "djpq_compiler" / "workflows" / f"{name}.py").exists(), name


def test_the_integer_ir_is_not_a_backend():
    assert not (ROOT / "backends" / "reference").exists()
    assert (ROOT / "djpq_compiler" / "ir" / "modules.py").exists()

"""Architecture rules: the core never imports slicer/qt/vtk; numpy-side modules never load TensorFlow."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO_ROOT

CORE = REPO_ROOT / "DeepAbdominalRegistration" / "dareg"
FORBIDDEN_IN_CORE = {"slicer", "qt", "ctk", "vtk", "PythonQt"}
TENSORFLOW_FREE = [
    "dareg.io",
    "dareg.geometry",
    "dareg.metrics",
    "dareg.phantom",
    "dareg.initialize",
    "dareg.register",
    "dareg.outputs",
    "dareg.cli",
    "dareg.commands",
    "dareg.models.registry",
    "dareg.models.config",
]


def imported_roots(path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_never_imports_slicer_qt_or_vtk():
    offenders = {str(p.relative_to(CORE)): imported_roots(p) & FORBIDDEN_IN_CORE for p in CORE.rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_numpy_side_modules_do_not_load_tensorflow():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in TENSORFLOW_FREE)
        + "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert completed.stdout.strip() == "[]"

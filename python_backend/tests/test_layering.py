"""Imports go one way: the backend never imports Slicer, Qt, VTK or CTK, and a lower module never
imports a higher one (see the module order below)."""
from __future__ import annotations

import ast
from pathlib import Path

import anymc3d

#: lowest first; a module may import only modules of a lower rank
ORDER = ["errors", "contract", "fileio", "backbone", "lora", "pooling", "heatmap", "preprocessing", "synthetic",
         "augment", "losses", "calibration", "evaluation", "data", "decoder", "plugin", "model",
         "engine", "train", "demo", "cli", "__main__"]
FORBIDDEN = {"slicer", "qt", "vtk", "ctk", "mrml", "vtkmodules"}
PACKAGE = Path(anymc3d.__file__).parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "anymc3d":
                names.update(f"anymc3d.{alias.name}" for alias in node.names)
    return names


def test_every_module_is_ranked():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules <= set(ORDER), modules - set(ORDER)


def test_no_slicer_import_and_no_upward_import():
    for path in PACKAGE.glob("*.py"):
        if path.stem == "__init__":
            continue
        rank = ORDER.index(path.stem)
        for name in _imports(path):
            assert name.split(".")[0].lower() not in FORBIDDEN, f"{path.name} imports {name}"
            if name.startswith("anymc3d."):
                target = name.split(".")[1]
                if target == "__version__":
                    continue
                assert ORDER.index(target) < rank, f"{path.name} imports the higher module {target}"

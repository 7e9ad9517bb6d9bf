"""Imports go one way: the backend never imports Slicer, Qt, VTK or CTK, and a lower module never
imports a higher one (see the module order below)."""
from __future__ import annotations

import ast
from pathlib import Path

import anymc3d

#: lowest first; a module may import only modules of a lower rank
#: (subpackage modules by dotted name, e.g. "planecycle.op"; a subpackage's __init__ must stay import-free)
ORDER = ["errors", "safeio", "contract", "manifest_rules", "plugin_file", "testing", "fileio", "device", "planecycle.config", "layouts", "catalog", "backbone", "imgfocus",
         "hub", "lora", "pooling",
         "planecycle.op", "planecycle.converter", "planecycle.head", "heatmap", "preprocess_config", "image_reading",
         "image_writing", "intensity", "modality", "preprocessing", "synthetic",
         "augment", "losses", "calibration", "evaluation", "localisation", "data", "cases", "dicom_source", "dicom_out", "encoders",
         "planecycle.encoder", "decoder", "plugin", "model", "planecycle.fit", "engine", "planecycle.features", "records", "runner",
         "training.config", "training.distributed", "training.standardize", "training.batching",
         "training.checkpoints", "training.trainer", "training.evaluate", "training.command", "demo",
         "scoring", "planecycle.cache", "planecycle.commands", "cli", "__main__"]
#: Slicer and its toolkits, and the packages above the backend (the Slicer Logic, the web review, trame)
FORBIDDEN = {"slicer", "qt", "vtk", "ctk", "mrml", "vtkmodules", "anymc3dslicerlogic", "anymc3d_review", "trame",
             "trame_slicer", "trame_server", "wslink"}
PACKAGE = Path(anymc3d.__file__).parent


def _module(path: Path) -> str:
    """'cli' for anymc3d/cli.py, 'planecycle.op' for anymc3d/planecycle/op.py, 'planecycle' for its __init__."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute dotted names imported by ``path`` (relative imports resolved; ``from a import b`` gives a and a.b)."""
    package = ["anymc3d", *path.relative_to(PACKAGE).parts[:-1]]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            if module.startswith("anymc3d"):
                names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _ranked(name: str) -> str | None:
    """The ranked module an ``anymc3d.*`` import refers to (the longest ranked prefix), or None."""
    parts = name.split(".")[1:]
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in ORDER:
            return ".".join(parts[:n])
    return None


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_is_ranked():
    modules = {_module(p) for p in _sources() if p.stem != "__init__"}
    assert modules <= set(ORDER), modules - set(ORDER)


def test_subpackage_inits_import_nothing_of_ours():
    """A subpackage's __init__ runs before any of its modules, so it must not pull in higher modules."""
    for path in _sources():
        if path.stem == "__init__" and path.parent != PACKAGE:
            assert not any(n.startswith("anymc3d") for n in _imports(path)), f"{path} imports package modules"


def test_no_slicer_import_and_no_upward_import():
    for path in _sources():
        if path.stem == "__init__":
            continue
        module = _module(path)
        rank = ORDER.index(module)
        for name in _imports(path):
            assert name.split(".")[0].lower() not in FORBIDDEN, f"{module} imports {name}"
            if not name.startswith("anymc3d.") or name == "anymc3d.__version__":
                continue
            target = _ranked(name)
            assert target is not None, f"{module} imports {name}, which is not a ranked module"
            assert ORDER.index(target) < rank, f"{module} imports the higher module {target}"


def test_the_check_sees_subpackage_imports():
    """The import reader sees subpackage imports and ranks them (else the rank check would see nothing)."""
    assert "anymc3d.planecycle.config" in _imports(PACKAGE / "planecycle" / "op.py")
    assert _ranked("anymc3d.planecycle.converter.PlaneCycleEncoder") == "planecycle.converter"
    assert _ranked("anymc3d.preprocessing.prepare") == "preprocessing"

"""What the Slicer side installs covers what the backend imports: the list is the backend's own package metadata."""

import ast
import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from AnyMC3DSlicerLogic import DependencyChecker
from AnyMC3DSlicerLogic.dependencies import SHIPPED_WITH_SLICER, TORCH_DISTRIBUTIONS
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .slicer_testing import REPO_ROOT

BACKEND = os.path.join(REPO_ROOT, "python_backend")


def thirdPartyImports():
    """{top-level name: imported at module level?} for python_backend/anymc3d/**/*.py (anywhere in a file)."""
    found = {}
    for path in sorted(Path(BACKEND, "anymc3d").rglob("*.py")):  # subpackages too
        with open(path, encoding="utf-8") as file:
            tree = ast.parse(file.read())
        moduleLevel = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module.split(".")[0]]
            for name in names:
                found[name] = found.get(name, False) or id(node) in moduleLevel
    return {name: top for name, top in found.items()
            if name not in sys.stdlib_module_names and name not in ("anymc3d", "__future__")}


def optionalExtras():
    """Distributions of the backend's optional extras (e.g. ray for ``predict --ray``), test extra excluded."""
    with open(os.path.join(BACKEND, "pyproject.toml"), "rb") as file:
        extras = tomllib.load(file)["project"].get("optional-dependencies", {})
    return {canonicalize_name(Requirement(r).name) for name, reqs in extras.items() if name != "test" for r in reqs}


def test_every_backend_import_is_installed_by_the_slicer_side():
    """Every third-party import is in the list the Slicer side installs; the only exceptions are imports made inside a
    function for an optional extra the module never uses (ray, for ``predict --ray`` on a cluster) and what only
    training and evaluation import (``TRAINING_ONLY``; the slow test below runs prediction and similarity without
    them)."""
    from AnyMC3DSlicerLogic.dependencies import TRAINING_ONLY

    checker = DependencyChecker()  # the default: anymc3d.contract.requirements(), i.e. the package metadata
    installs = {canonicalize_name(r.name) for r in checker.requirements}
    distributions = importlib.metadata.packages_distributions()
    imports = thirdPartyImports()
    assert {"torch", "timm", "peft", "jsonschema", "tqdm", "SimpleITK"} <= set(imports)  # the scan sees them

    def dists(name):
        return {canonicalize_name(d) for d in distributions.get(name, [name])}

    uncovered = {name: sorted(dists(name)) for name, moduleLevel in imports.items()
                 if not dists(name) & (installs | set(TRAINING_ONLY))
                 and (moduleLevel or not dists(name) & optionalExtras())}
    assert not uncovered, f"imported by the backend, never installed in Slicer: {uncovered}"
    assert not any(imports[name] for name in imports if dists(name) & optionalExtras() - installs)  # lazily only


def test_each_requirement_has_a_route_and_keeps_its_pin():
    checker = DependencyChecker(versionOf=lambda name: None)  # a fresh Slicer with nothing installed
    plan = checker.plan()
    routed = plan["torch"] + plan["pip"] + plan["shipped"]
    assert sorted(routed) == sorted(str(r) for r in checker.requirements)
    assert {canonicalize_name(Requirement(r).name) for r in plan["torch"]} == set(TORCH_DISTRIBUTIONS)
    assert {canonicalize_name(Requirement(r).name) for r in plan["shipped"]} == set(SHIPPED_WITH_SLICER)
    pip = {canonicalize_name(Requirement(r).name): r for r in plan["pip"]}
    assert {"timm", "peft", "jsonschema", "tqdm", "safetensors", "nibabel"} <= set(pip)
    assert Requirement(pip["timm"]).specifier.contains("1.0.20") and not Requirement(pip["timm"]).specifier.contains("1.1.0")


def test_bundled_backend_without_metadata_uses_the_same_list():
    """The extension bundles anymc3d without its .dist-info: contract's fallback list must equal pyproject's."""
    from anymc3d import contract

    with open(os.path.join(BACKEND, "pyproject.toml"), "rb") as file:
        declared = tomllib.load(file)["project"]["dependencies"]
    assert sorted(contract._FALLBACK_REQUIREMENTS) == sorted(declared)
    assert sorted(str(r) for r in DependencyChecker(list(contract._FALLBACK_REQUIREMENTS)).requirements) == \
        sorted(str(Requirement(r)) for r in declared)


def test_prediction_requirements_leave_the_training_extras_out():
    """What the module installs for prediction and similarity: the backend's list less monai, scikit-learn and
    matplotlib (monai's own torch pin could make pip replace Slicer's torch); everything else stays."""
    from anymc3d.contract import requirements
    from AnyMC3DSlicerLogic.dependencies import TRAINING_ONLY, backendRequirements

    names = {canonicalize_name(Requirement(r).name) for r in backendRequirements()}
    everything = {canonicalize_name(Requirement(r).name) for r in requirements()}
    assert names == everything - set(TRAINING_ONLY)
    assert set(TRAINING_ONLY) <= everything  # the filter removes something real
    assert {"torch", "timm", "peft", "safetensors", "nibabel"} <= names


@pytest.mark.slow
def test_prediction_and_similarity_run_without_the_training_extras(demo, tmp_path):
    """The independent check of TRAINING_ONLY: with monai, scikit-learn (sklearn) and matplotlib absent from the
    interpreter, ``anymc3d predict`` and ``anymc3d similarity`` run the demo to the end."""
    from .test_module_in_slicer_standin import BLOCKER

    log = tmp_path / "attempts.log"
    env = dict(os.environ, ANYMC3D_TEST_BLOCK="monai,sklearn,matplotlib", ANYMC3D_TEST_BLOCK_LOG=str(log))
    env["PYTHONPATH"] = os.pathsep.join([BLOCKER, BACKEND, env.get("PYTHONPATH", "")])
    commands = {
        "predict": ["predict", demo["volume"], "--backbone", demo["backbone"], "--plugin", demo["plugin"], "--device", "cpu",
                    "--json", str(tmp_path / "out.json")],
        "similarity": ["similarity", demo["volume"], "--backbone", demo["backbone"], "--seed", "2,2,2", "--input-size", "112",
                       "--out", str(tmp_path / "similarity.nii.gz")],
    }
    for name, arguments in commands.items():
        completed = subprocess.run([sys.executable, "-m", "anymc3d", *arguments], capture_output=True, text=True, encoding="utf-8", env=env,
                                   check=False, timeout=600)
        assert completed.returncode == 0, (name, completed.stderr[-3000:])
    assert (tmp_path / "out.json").is_file() and (tmp_path / "similarity.nii.gz").is_file()

"""What the Slicer side installs covers what the backend imports: the list is the backend's own package metadata."""

import ast
import importlib.metadata
import os
import sys
import tomllib
from pathlib import Path

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
    function for an optional extra the module never uses (ray, for ``predict --ray`` on a cluster)."""
    checker = DependencyChecker()  # the default: anymc3d.contract.requirements(), i.e. the package metadata
    installs = {canonicalize_name(r.name) for r in checker.requirements}
    distributions = importlib.metadata.packages_distributions()
    imports = thirdPartyImports()
    assert {"torch", "timm", "peft", "jsonschema", "tqdm", "SimpleITK"} <= set(imports)  # the scan sees them

    def dists(name):
        return {canonicalize_name(d) for d in distributions.get(name, [name])}

    uncovered = {name: sorted(dists(name)) for name, moduleLevel in imports.items()
                 if not dists(name) & installs and (moduleLevel or not dists(name) & optionalExtras())}
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

"""What the Slicer side installs covers what the backend imports: the list is the backend's own package metadata."""

import ast
import importlib.metadata
import os
import sys
import tomllib

from AnyMC3DSlicerLogic import DependencyChecker
from AnyMC3DSlicerLogic.dependencies import SHIPPED_WITH_SLICER, TORCH_DISTRIBUTIONS
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .slicer_testing import REPO_ROOT

BACKEND = os.path.join(REPO_ROOT, "python_backend")


def thirdPartyImports():
    """Top-level names imported anywhere in python_backend/anymc3d/*.py (module level or inside functions)."""
    names = set()
    folder = os.path.join(BACKEND, "anymc3d")
    for fileName in sorted(os.listdir(folder)):
        if not fileName.endswith(".py"):
            continue
        with open(os.path.join(folder, fileName), encoding="utf-8") as file:
            tree = ast.parse(file.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return sorted(names - set(sys.stdlib_module_names) - {"anymc3d", "__future__"})


def test_every_backend_import_is_installed_by_the_slicer_side():
    checker = DependencyChecker()  # the default: anymc3d.contract.requirements(), i.e. the package metadata
    installs = {canonicalize_name(r.name) for r in checker.requirements}
    distributions = importlib.metadata.packages_distributions()
    imports = thirdPartyImports()
    assert {"torch", "timm", "peft", "jsonschema", "tqdm", "SimpleITK"} <= set(imports)  # the scan sees them
    uncovered = {name: distributions.get(name) for name in imports
                 if not {canonicalize_name(d) for d in distributions.get(name, [name])} & installs}
    assert not uncovered, f"imported by the backend, never installed in Slicer: {uncovered}"


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

"""One Logic package, one name: ``AnyMC3DSlicerLogic``, whether pip-installed (``Logic/pyproject.toml``), installed
by the extension beside the module, or found by the module file's one fallback in a source tree. No ``sys.path``
edits anywhere else."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import AnyMC3DSlicerLogic
import pytest

from .slicer_testing import BACKEND_PATH, REPO_ROOT
from .test_module_in_slicer_standin import BLOCKER, STANDINS

LOGIC_DIR = os.path.join(REPO_ROOT, "Logic")
DESCRIBE = """
import hashlib, importlib, json, os, pkgutil, sys
before = list(sys.path)
if len(sys.argv) > 1 and sys.argv[1] == "module":
    import slicer_app; slicer_app.install()
    import AnyMC3DSlicer
package = importlib.import_module("AnyMC3DSlicerLogic")
folder = os.path.dirname(package.__file__)
names = sorted(m.name for m in pkgutil.iter_modules([folder]))
for name in names:
    importlib.import_module("AnyMC3DSlicerLogic." + name)
import anymc3d, anymc3d.contract
print(json.dumps({"name": package.__name__, "folder": folder, "all": sorted(package.__all__),
    "modules": {n[:-3]: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
                for n in os.listdir(folder) if n.endswith(".py")},
    "sameClass": sys.modules["AnyMC3DSlicerLogic.logic"].AnyMC3DSlicerLogic is package.AnyMC3DSlicerLogic,
    "anymc3d": anymc3d.__file__, "schemaFields": len(anymc3d.contract.record_schema()["required"]),
    "pathUnchanged": [p for p in sys.path if p not in before] == [], "hasLogicName": "Logic" in sys.modules}))
"""


def describe(pythonPath, *arguments, block=""):
    env = dict(os.environ, ANYMC3D_TEST_BLOCK=block, PYTHONPATH=os.pathsep.join(pythonPath))
    completed = subprocess.run([sys.executable, "-c", DESCRIBE, *arguments], capture_output=True, text=True, encoding="utf-8", env=env,
                               cwd=tempfile.gettempdir(), check=False, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def sourceHashes():
    return {name[:-3]: hashlib.sha256(open(os.path.join(LOGIC_DIR, name), "rb").read()).hexdigest()
            for name in os.listdir(LOGIC_DIR) if name.endswith(".py")}


@pytest.fixture(scope="module")
def pipInstalled(tmp_path_factory):
    """``pip install Logic`` into a folder (a copy of Logic/, so the source tree gets no build files)."""
    pytest.importorskip("setuptools", minversion="68")
    root = tmp_path_factory.mktemp("pip")
    shutil.copytree(LOGIC_DIR, root / "Logic", ignore=shutil.ignore_patterns("__pycache__"))
    completed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                                "--target", str(root / "target"), str(root / "Logic")], capture_output=True, text=True, encoding="utf-8",
                               check=False, timeout=300)
    assert completed.returncode == 0, completed.stderr
    return root / "target"


def test_pip_installed_and_source_tree_layouts_import_the_same_package(pipInstalled):
    installed = describe([str(pipInstalled), BACKEND_PATH])
    assert installed["name"] == "AnyMC3DSlicerLogic" and installed["folder"] == str(pipInstalled / "AnyMC3DSlicerLogic")
    # Source tree: the installed package is absent; the module file's fallback loads Logic/ (and the backend)
    source = describe([BLOCKER, STANDINS, os.path.join(REPO_ROOT, "AnyMC3DSlicer")], "module",
                      block="AnyMC3DSlicerLogic,anymc3d")
    assert source["name"] == "AnyMC3DSlicerLogic" and source["folder"] == LOGIC_DIR
    assert source["anymc3d"] == os.path.join(BACKEND_PATH, "anymc3d", "__init__.py") and source["schemaFields"] == 6
    assert source["pathUnchanged"] and not source["hasLogicName"] and source["sameClass"]
    assert installed["modules"] == source["modules"] == sourceHashes()
    assert installed["all"] == source["all"] == sorted(AnyMC3DSlicerLogic.__all__)


def test_this_test_run_imports_the_source_tree_package():
    """The tests import the package plainly (``pip install -e Logic``): it is this checkout's Logic/."""
    assert os.path.dirname(os.path.abspath(AnyMC3DSlicerLogic.__file__)) == LOGIC_DIR
    assert "Logic" not in sys.modules


def test_no_sys_path_edits_outside_the_one_fallback():
    pattern = re.compile(r"sys\.path\.(insert|append|extend)|sys\.path\s*(\+?=)|site\.addsitedir")
    offenders = []
    for folder in ("AnyMC3DSlicer", "Logic", "Testing", os.path.join("WebReview", "anymc3d_review"), os.path.join("WebReview", "tests")):
        for base, _, files in os.walk(os.path.join(REPO_ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(base, name), encoding="utf-8") as file:
                        offenders += [f"{os.path.join(base, name)}:{i}" for i, line in enumerate(file, 1)
                                      if pattern.search(line) and "pattern = re.compile" not in line]
    assert offenders == []
    with open(os.path.join(REPO_ROOT, "AnyMC3DSlicer", "AnyMC3DSlicer.py"), encoding="utf-8") as file:
        module = file.read()
    assert module.count("spec_from_file_location") == 1 and module.count("def importLogicPackage") == 1
    assert not re.search(r"^\s*(from|import) Logic\b", module, re.MULTILINE)


#: what sits above the Logic: the module file (its Widget) and the web review; the Logic never imports them
ABOVE_THE_LOGIC = {"AnyMC3DSlicer", "anymc3d_review", "WebReview", "trame", "trame_slicer", "trame_server"}


def logicImports():
    """{file name: top-level names it imports (anywhere in the file; relative imports left out)}."""
    import ast

    found = {}
    for name in sorted(os.listdir(LOGIC_DIR)):
        if name.endswith(".py"):
            with open(os.path.join(LOGIC_DIR, name), encoding="utf-8") as file:
                tree = ast.parse(file.read())
            found[name] = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                           for alias in node.names}
            found[name] |= {node.module.split(".")[0] for node in ast.walk(tree)
                            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    return found


def test_logic_never_imports_the_widget_or_the_review():
    imports = logicImports()
    assert "anymc3d" in imports["logic.py"] and "qt" in imports["process.py"]  # the scan sees real imports
    offending = {name: sorted(found & ABOVE_THE_LOGIC) for name, found in imports.items() if found & ABOVE_THE_LOGIC}
    assert offending == {}


def test_the_module_file_uses_only_the_logic_packages_public_names():
    """The Widget goes through the Logic package's API (its ``__all__``), never below it (``LogicPackage.outputs.X``)."""
    import ast

    with open(os.path.join(REPO_ROOT, "AnyMC3DSlicer", "AnyMC3DSlicer.py"), encoding="utf-8") as file:
        tree = ast.parse(file.read())
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "LogicPackage"}
    assert {"DependencyChecker", "nodeRole"} <= used  # the scan sees the uses
    assert used - set(AnyMC3DSlicerLogic.__all__) == set()

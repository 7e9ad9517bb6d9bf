"""CMake (from PyPI) configures, builds and installs the extension against stand-ins of Slicer's and CTK's CMake
macros (Testing/cmake_standins: the real macros' argument checks and install destinations); the installed tree is
checked, then opened in a Slicer-like Python without torch (the installed layout, no source tree)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .slicer_testing import REPO_ROOT
from .test_module_in_slicer_standin import FRESH_SLICER_LACKS, runScenario

STANDINS = os.path.join(REPO_ROOT, "Testing", "cmake_standins")
SCRIPTED = "lib/Slicer-5.10/qt-scripted-modules"


def cmakeExecutable():
    try:
        import cmake
    except ImportError:
        pytest.skip("cmake from PyPI is not installed (requirements-test.txt)")
    return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")


def run(*command, cwd=None, check=True):
    completed = subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=cwd, check=False, timeout=600)
    if check:
        assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    return completed


def configure(cmake, source, build, version="5.10", extra=()):
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    return run(cmake, "-S", source, "-B", build, *generator, f"-DSlicer_DIR={STANDINS}", f"-DSTANDIN_SLICER_VERSION={version}",
               f"-DPython3_EXECUTABLE={sys.executable}", "-DBUILD_TESTING=ON", *extra, check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("no C++ compiler: project() cannot configure")
    cmake = cmakeExecutable()
    root = tmp_path_factory.mktemp("extension")
    build, prefix = root / "build", root / "install"
    configured = configure(cmake, REPO_ROOT, build)
    assert configured.returncode == 0, configured.stdout[-4000:] + configured.stderr[-4000:]
    run(cmake, "--build", build)
    run(cmake, "--install", build, "--prefix", prefix)
    return {"cmake": cmake, "build": build, "prefix": prefix, "modules": prefix / SCRIPTED}


def test_installed_tree(installed):
    modules = installed["modules"]
    assert (modules / "AnyMC3DSlicer.py").read_bytes() == Path(REPO_ROOT, "AnyMC3DSlicer", "AnyMC3DSlicer.py").read_bytes()
    logicFiles = sorted(name for name in os.listdir(os.path.join(REPO_ROOT, "Logic")) if name.endswith(".py"))
    assert sorted(p.name for p in (modules / "AnyMC3DSlicerLogic").glob("*.py")) == logicFiles
    assert not (modules / "Logic").exists()
    source = Path(REPO_ROOT, "python_backend", "anymc3d")
    backendFiles = sorted(str(p.relative_to(source)) for p in source.rglob("*.py") if "__pycache__" not in p.parts)
    assert sorted(str(p.relative_to(modules / "anymc3d")) for p in (modules / "anymc3d").rglob("*.py")
                  if "__pycache__" not in p.parts) == backendFiles  # subpackages too
    assert {"plugin_file.py", "contract.py", "planecycle/__init__.py"} <= set(backendFiles)
    assert sorted(p.name for p in (modules / "anymc3d" / "schemas").glob("*.json")) == ["plugin.schema.json", "record.schema.json"]
    for resource in ("Icons/AnyMC3DSlicer.png", "UI/AnyMC3DSlicer.ui", "SampleData/AnyMC3DSyntheticCT.nrrd"):
        assert (modules / "Resources" / resource).read_bytes() == Path(REPO_ROOT, "Resources", resource).read_bytes()
    assert list((modules / "AnyMC3DSlicerLogic" / "__pycache__").glob("*.pyc"))  # byte-compiled at build time


def test_tests_registered_and_description(installed):
    listed = run(os.path.join(os.path.dirname(installed["cmake"]), "ctest"), "-N", cwd=installed["build"]).stdout
    assert "py_AnyMC3DSlicer" in listed and "py_nomainwindow_qSlicerAnyMC3DSlicerModuleGenericTest" in listed
    description = (installed["build"] / "AnyMC3D.s4ext").read_text()
    urls = re.findall(r"https://raw\.githubusercontent\.com/AnyMC3D/AnyMC3D/main/(\S+)", description)
    assert len(urls) == 2 and all(os.path.isfile(os.path.join(REPO_ROOT, path)) for path in urls), urls
    assert "DEPENDS PyTorch" in description and "Slicer 5.10" in description


def test_installed_module_opens_without_torch_and_lists_plugins(installed, demo, tmp_path):
    """The installed layout in a fresh Slicer: Logic and backend import from beside the module (no source tree on
    the path, torch & co. absent); plugins are listed and Apply offers the installation."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    shutil.copy(demo["plugin"], folder)
    modules = str(installed["modules"])
    seen = runScenario("construct", moduleDir=modules, extraPaths=(), block=FRESH_SLICER_LACKS)
    assert seen["logicPackage"] == "AnyMC3DSlicerLogic" and seen["logicFile"].startswith(modules)
    assert seen["anymc3dFile"].startswith(modules) and seen["backendPath"] == modules
    assert seen["resources"].startswith(modules)
    seen = runScenario("freshInstall", {"pluginFolder": str(folder), "backbone": demo["backbone"], "importPlugin": demo["plugin"],
                                        "batchFolder": str(tmp_path)}, moduleDir=modules, extraPaths=(), block=FRESH_SLICER_LACKS)
    assert seen["listed"] == ["demo_findings"] and seen["torchInstalls"] and not seen["jobStarted"]
    assert seen["afterImport"] == ["demo_findings"]  # same file name: refused (already installed), shown as an error
    assert any("already installed" in text for kind, text in seen["dialogs"] if kind == "errorDisplay")


def test_standin_macros_check_arguments_as_the_real_ones(installed, tmp_path):
    """What stopped the old CMake lists: ctkMacroCompilePythonScript with an empty SCRIPTS; and a Slicer older than
    the declared minimum is refused by the extension itself."""
    project = tmp_path / "empty_scripts"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.16)\nproject(P NONE)\nfind_package(Slicer REQUIRED)\ninclude(${Slicer_USE_FILE})\n"
        "ctkMacroCompilePythonScript(TARGET_NAME R SCRIPTS \"\" RESOURCES \"a.png\" DESTINATION_DIR ${CMAKE_BINARY_DIR}/r "
        "INSTALL_DIR r NO_INSTALL_SUBDIR)\n")
    failed = configure(installed["cmake"], project, tmp_path / "b1")
    assert failed.returncode != 0 and "SCRIPTS is mandatory" in failed.stdout + failed.stderr
    old = configure(installed["cmake"], REPO_ROOT, tmp_path / "b2", version="5.8")
    assert old.returncode != 0 and "AnyMC3D needs Slicer 5.10 or later" in old.stdout + old.stderr

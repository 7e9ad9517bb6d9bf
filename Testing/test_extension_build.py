"""CMake (from PyPI) configures, builds and installs the extension against stand-ins of Slicer's and CTK's CMake
macros (Testing/cmake_standins: the real macros' argument checks and install destinations); the installed tree is
checked, then opened in a Slicer-like Python without torch (the installed layout, no source tree)."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .slicer_testing import REPO_ROOT
from .test_module_in_slicer_standin import BLOCKER, FRESH_SLICER_LACKS, runScenario

pytestmark = pytest.mark.slow  # CMake configure, build and install, child-process Slicer scenarios

STANDINS = os.path.join(REPO_ROOT, "Testing", "cmake_standins")
SCRIPTED = "lib/Slicer-5.10/qt-scripted-modules"


def cmakeExecutable():
    try:
        import cmake
    except ImportError:
        pytest.skip("cmake from PyPI is not installed (requirements-test.txt)")
    return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")


def run(*command, cwd=None, check=True):
    completed = subprocess.run([str(c) for c in command], capture_output=True, text=True, encoding="utf-8", cwd=cwd, check=False, timeout=600)
    if check:
        assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    return completed


def pythonOf(version):
    """An interpreter of Python ``version`` ("3.12": what Slicer 5.10 ships, and byte-compiles the scripts with), or
    None."""
    candidates = [shutil.which(f"python{version}"), *glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}*/bin/python{version}"))]
    for candidate in filter(None, candidates):
        completed = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                   capture_output=True, text=True, encoding="utf-8", check=False)
        if completed.returncode == 0 and completed.stdout.strip() == version:
            return candidate
    return None


def configure(cmake, source, build, version="5.10", extra=(), slicerPython=None):
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    slicerPython = slicerPython or pythonOf("3.12") or pytest.skip("no Python 3.12 (Slicer 5.10's) to byte-compile with")
    return run(cmake, "-S", source, "-B", build, *generator, f"-DSlicer_DIR={STANDINS}", f"-DSTANDIN_SLICER_VERSION={version}",
               f"-DPython3_EXECUTABLE={sys.executable}", f"-DPYTHON_EXECUTABLE={slicerPython}", "-DBUILD_TESTING=ON",
               *extra, check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("no C++ compiler: project() cannot configure")
    cmake = cmakeExecutable()
    root = tmp_path_factory.mktemp("extension")
    build, prefix = root / "build", root / "install"
    configured = configure(cmake, REPO_ROOT, build, extra=[f"-DPyTorch_DIR={root / 'PyTorch-build'}"])
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
    widgetFiles = sorted(p.name for p in Path(REPO_ROOT, "AnyMC3DSlicer", "AnyMC3DSlicerLib").glob("*.py"))
    assert {"__init__.py", "selftest.py"} <= set(widgetFiles)
    assert sorted(p.name for p in (modules / "AnyMC3DSlicerLib").glob("*.py")) == widgetFiles
    source = Path(REPO_ROOT, "python_backend", "anymc3d")
    backendFiles = sorted(str(p.relative_to(source)) for p in source.rglob("*.py") if "__pycache__" not in p.parts)
    assert sorted(str(p.relative_to(modules / "anymc3d")) for p in (modules / "anymc3d").rglob("*.py")
                  if "__pycache__" not in p.parts) == backendFiles  # subpackages too
    assert {"plugin_file.py", "contract.py", "planecycle/__init__.py"} <= set(backendFiles)
    schemas = sorted(p.name for p in Path(REPO_ROOT, "python_backend", "anymc3d", "schemas").glob("*.json"))
    assert {"plugin.schema.json", "record.schema.json"} <= set(schemas)
    assert sorted(p.name for p in (modules / "anymc3d" / "schemas").glob("*.json")) == schemas
    for resource in ("Icons/AnyMC3DSlicer.png", "UI/AnyMC3DSlicer.ui", "SampleData/AnyMC3DSyntheticCT.nrrd"):
        assert (modules / "Resources" / resource).read_bytes() == Path(REPO_ROOT, "Resources", resource).read_bytes()
    assert list((modules / "AnyMC3DSlicerLogic" / "__pycache__").glob("*.cpython-312.pyc"))  # by Slicer's Python


def test_each_file_is_installed_once(installed):
    """slicerMacroBuildScriptedModule installs the whole qt-scripted-modules build folder: nothing in it may be
    installed a second time by another rule (CMake's install manifest lists every file each time it is installed)."""
    manifest = (installed["build"] / "install_manifest.txt").read_text(encoding="utf-8").splitlines()
    counts = {}
    for path in manifest:
        counts[path] = counts.get(path, 0) + 1
    assert len(manifest) > 20 and any(path.endswith("AnyMC3DSlicerLogic/logic.py") for path in manifest)
    assert {path: n for path, n in counts.items() if n > 1} == {}


def test_tests_registered_and_description(installed):
    listed = run(os.path.join(os.path.dirname(installed["cmake"]), "ctest"), "-N", cwd=installed["build"]).stdout
    assert "py_AnyMC3DSlicer" in listed and "py_nomainwindow_qSlicerAnyMC3DSlicerModuleGenericTest" in listed
    paths = (installed["build"] / "AdditionalModulePaths.txt").read_text(encoding="utf-8").splitlines()  # EXTENSION_DEPENDS looked up
    assert paths == [f"{installed['build']}/{SCRIPTED}", f"{installed['build'].parent / 'PyTorch-build'}/{SCRIPTED}"]
    description = (installed["build"] / "AnyMC3D.s4ext").read_text(encoding="utf-8")
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
    old = configure(installed["cmake"], REPO_ROOT, tmp_path / "b2", version="5.8", slicerPython=pythonOf("3.9") or "")
    assert old.returncode != 0
    said = " ".join((old.stdout + old.stderr).split())
    assert "AnyMC3D needs Slicer 5.10 or later" in said or "Slicer 5.8 ships Python 3.9" in said  # without a Python 3.9 here, the stand-in stops first
    wrong = configure(installed["cmake"], REPO_ROOT, tmp_path / "b3", slicerPython=sys.executable)
    assert wrong.returncode != 0 and "Slicer 5.10 ships Python 3.12" in " ".join((wrong.stdout + wrong.stderr).split())


def test_ctest_runs_the_self_test_as_the_build_machines_do(installed):
    """The registered command, run by ctest in the build tree, offline and without the Python packages (a fresh
    Slicer): the self-test is skipped, not failed, installs nothing, and the test has its own TIMEOUT."""
    ctest = os.path.join(os.path.dirname(installed["cmake"]), "ctest")
    shown = json.loads(run(ctest, "--show-only=json-v1", cwd=installed["build"]).stdout)
    (selfTest,) = [test for test in shown["tests"] if test["name"] == "py_AnyMC3DSlicer"]
    properties = {p["name"]: p["value"] for p in selfTest["properties"]}
    assert 0 < float(properties["TIMEOUT"]) <= 1200 and properties["RUN_SERIAL"]
    assert "--python-code" in selfTest["command"] and "--additional-module-paths" in selfTest["command"]
    env = dict(os.environ, ANYMC3D_TEST_BLOCK=FRESH_SLICER_LACKS)
    env["PYTHONPATH"] = os.pathsep.join([BLOCKER, env.get("PYTHONPATH", "")])
    completed = subprocess.run([ctest, "-R", "^py_AnyMC3DSlicer$", "-V"], cwd=installed["build"], env=env,
                               capture_output=True, text=True, encoding="utf-8", check=False, timeout=900)
    assert completed.returncode == 0, completed.stdout[-5000:]
    assert "skipped" in completed.stdout and "Python packages not installed" in completed.stdout

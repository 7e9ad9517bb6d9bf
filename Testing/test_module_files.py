"""Checks of the files that can only run inside Slicer: the module file, the .ui, the CMake lists."""

import ast
import dataclasses
import os
import py_compile
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from AnyMC3DSlicerLogic.parameters import DisplayOptions, PredictionOptions

from .slicer_testing import REPO_ROOT

MODULE_FILE = os.path.join(REPO_ROOT, "AnyMC3DSlicer", "AnyMC3DSlicer.py")
WIDGET_DIR = os.path.join(REPO_ROOT, "AnyMC3DSlicer", "AnyMC3DSlicerLib")
UI_FILE = os.path.join(REPO_ROOT, "Resources", "UI", "AnyMC3DSlicer.ui")
MODULE_CMAKE = os.path.join(REPO_ROOT, "AnyMC3DSlicer", "CMakeLists.txt")
TOP_CMAKE = os.path.join(REPO_ROOT, "CMakeLists.txt")


def read(path):
    with open(path, encoding="utf-8") as file:
        return file.read()


def test_module_file_compiles(tmp_path):
    py_compile.compile(MODULE_FILE, cfile=str(tmp_path / "module.pyc"), doraise=True)


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or pytest.skip("ruff is not installed")
    paths = [MODULE_FILE, os.path.join(REPO_ROOT, "Logic"), os.path.join(REPO_ROOT, "Testing")]
    completed = subprocess.run([ruff, "check", *paths], capture_output=True, text=True, encoding="utf-8", check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_ruff_finds_no_pyflakes_error_in_the_whole_tree():
    """Unused imports, undefined names and syntax errors, everywhere (the Slicer side above: ruff's defaults)."""
    ruff = shutil.which("ruff") or pytest.skip("ruff is not installed")
    paths = [os.path.join(REPO_ROOT, p) for p in ("python_backend", "WebReview", "Logic", "Testing", "AnyMC3DSlicer",
                                                  "benchmarks")]
    completed = subprocess.run([ruff, "check", "--select", "F,E9", *paths], capture_output=True, text=True, encoding="utf-8", check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_module_classes_follow_slicer_conventions():
    tree = ast.parse(read(MODULE_FILE))
    classes = {node.name: [base.id if isinstance(base, ast.Name) else ast.unparse(base) for base in node.bases]
               for node in tree.body if isinstance(node, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["AnyMC3DSlicer"]
    assert "ScriptedLoadableModuleWidget" in classes["AnyMC3DSlicerWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["AnyMC3DSlicerLogic"]
    assert classes["AnyMC3DSlicerTest"] == ["selftest.EndToEndTest"]  # its body is in AnyMC3DSlicerLib/selftest.py
    selftestTree = ast.parse(read(os.path.join(WIDGET_DIR, "selftest.py")))
    (endToEnd,) = [node for node in selftestTree.body if isinstance(node, ast.ClassDef) and node.name == "EndToEndTest"]
    assert [base.id for base in endToEnd.bases] == ["ScriptedLoadableModuleTest"]
    source = read(MODULE_FILE)
    assert 'categories = ["Classification"]' in source
    assert "import imp\n" not in source


def moduleFiles():
    """The module file and the widget's parts (AnyMC3DSlicerLib/)."""
    return [MODULE_FILE, *sorted(os.path.join(WIDGET_DIR, name) for name in os.listdir(WIDGET_DIR) if name.endswith(".py"))]


def uiWidgets():
    root = ET.parse(UI_FILE).getroot()
    return {widget.get("name"): widget for widget in root.iter("widget")}


def test_ui_has_every_widget_the_module_uses():
    widgets = uiWidgets()
    used = set(re.findall(r"self\.ui\.([A-Za-z0-9_]+)", "".join(read(path) for path in moduleFiles())))
    missing = sorted(used - set(widgets))
    assert not missing, missing


def test_ui_parameter_names_exist_in_the_parameter_node():
    packs = {"options": PredictionOptions, "display": DisplayOptions}
    topLevel = {"inputVolume", "secondView", "options", "display", "resultTable"}
    source = read(MODULE_FILE)
    for name in topLevel:
        assert re.search(rf"^    {name}: ", source, re.MULTILINE), name
    for name, widget in uiWidgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                parameter = prop.find("string").text
                head, _, member = parameter.partition(".")
                assert head in topLevel, (name, parameter)
                if member:
                    assert member in {field.name for field in dataclasses.fields(packs[head])}, (name, parameter)


def test_cmake_lists_name_every_logic_file_and_resource():
    cmake = read(MODULE_CMAKE)
    # every Logic/*.py, by a glob re-checked at each build (test_extension_build.py checks the installed files)
    assert "file(GLOB LOGIC_PYTHON_SCRIPTS RELATIVE ${LOGIC_SOURCE_DIR} CONFIGURE_DEPENDS ${LOGIC_SOURCE_DIR}/*.py)" in cmake
    assert "set(LOGIC_SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR}/../Logic)" in cmake
    resources = re.search(r"set\(MODULE_RESOURCES(.*?)\)", cmake, re.DOTALL).group(1).split()
    for resource in resources:
        assert os.path.isfile(os.path.join(REPO_ROOT, "Resources", resource.replace("${MODULE_NAME}", "AnyMC3DSlicer"))), resource
    assert "slicerMacroBuildScriptedModule" in cmake and "WITH_GENERIC_TESTS" in cmake
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cmake
    top = read(TOP_CMAKE)
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({key} ", top), key
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top and "add_subdirectory(AnyMC3DSlicer)" in top


def test_icon_is_a_png():
    with open(os.path.join(REPO_ROOT, "Resources", "Icons", "AnyMC3DSlicer.png"), "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"


def test_logic_imports_no_qt():
    """The Logic must import without Qt: qt appears only inside QProcessRunner / the dependency installer."""
    code = "import sys, AnyMC3DSlicerLogic; assert 'qt' not in sys.modules and 'ctk' not in sys.modules"
    env = dict(os.environ)
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", env=env, check=False)
    assert completed.returncode == 0, completed.stderr


def test_parameter_names_are_not_translated():
    """SlicerParameterName values are identifiers, not text: marked notr="true" so translators never touch them."""
    root = ET.parse(UI_FILE).getroot()
    names = [prop.find("string") for prop in root.iter("property") if prop.get("name") == "SlicerParameterName"]
    assert len(names) == 7 and all(string.get("notr") == "true" for string in names)


def test_color_table_without_deprecated_call(sceneContext):
    """vtkMRMLColorTableNode.SetNamesInitialised is deprecated (an ERROR in Slicer 5.10); the names are set anyway."""
    from AnyMC3DSlicerLogic import outputs

    for name in os.listdir(os.path.join(REPO_ROOT, "Logic")):
        if name.endswith(".py"):
            with open(os.path.join(REPO_ROOT, "Logic", name), encoding="utf-8") as file:
                assert "SetNamesInitialised" not in file.read(), name
    colorNode = outputs.heatmapColorTableNode(sceneContext.scene)
    assert colorNode.GetNumberOfColors() == 256 and colorNode.GetColorName(255) == "1.000"
    assert colorNode.GetColorName(51) == "0.200"


def test_volume_node_redecomposes_the_matrix(sceneContext):
    """Why the self-test compares IJK-to-RAS matrices with a tolerance: the node stores spacing, origin and
    directions, so the sample made oblique as in the self-test reads back ~2.8e-17 off (an exact test fails)."""
    import numpy as np
    import vtk

    node = sceneContext.loadVolume(os.path.join(REPO_ROOT, "Resources", "SampleData", "AnyMC3DSyntheticCT.nrrd"))
    original, oblique, readBack = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(original)
    rotation = vtk.vtkTransform()
    rotation.RotateZ(20)
    rotation.RotateX(10)
    rotation.Scale(0.8, 0.9, 2.5)
    vtk.vtkMatrix4x4.Multiply4x4(rotation.GetMatrix(), original, oblique)
    node.SetIJKToRASMatrix(oblique)
    node.GetIJKToRASMatrix(readBack)
    a, b = (np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)]) for m in (readBack, oblique))
    assert not np.array_equal(a, b) and np.allclose(a, b, rtol=0, atol=1e-6 * np.abs(b).max())
    source = read(os.path.join(WIDGET_DIR, "selftest.py"))
    assert "assertMatricesClose(heatmapMatrix, oblique)" in source and "array_equal" not in source


#: Slicer 5.10 API names that are deprecated aliases (vtkMRMLTableNode.h, SampleData.py, vtkMRMLTableNode.cxx at
#: v5.10.0): the module and the Logic use their replacements
DEPRECATED_SLICER_API = {"SetUseColumnNameAsColumnHeader": "SetUseColumnTitleAsColumnHeader",
                         "loadFileType=": "loadFileTypes=", "SetNamesInitialised": "(nothing: names are set by the columns)"}


def test_no_deprecated_slicer_api():
    files = [MODULE_FILE, *(os.path.join(REPO_ROOT, "Logic", name) for name in os.listdir(os.path.join(REPO_ROOT, "Logic"))
                            if name.endswith(".py"))]
    found = [(os.path.basename(path), name) for path in files for name in DEPRECATED_SLICER_API if name in read(path)]
    assert found == []


def test_findings_table_uses_column_titles_as_headers(sceneContext):
    from AnyMC3DSlicerLogic import outputs

    table = outputs.createFindingsTable(sceneContext.scene, "t", [
        {"Plugin": "p", "Finding": "f", "Probability": 0.5, "Threshold": 0.5, "Decision": "positive"}])
    assert table.GetUseColumnTitleAsColumnHeader()

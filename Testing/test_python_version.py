"""The code Slicer runs keeps to the Python of the minimum Slicer: Slicer 5.10 ships Python 3.12, and the backend
declares Python >= 3.10, so every file Slicer loads must parse as Python 3.10 and use no standard-library name added
after 3.10 or removed by 3.12. The declarations agree: module file, CMake lists, Logic and backend pyprojects."""

import ast
import os
import re
import tomllib
from pathlib import Path

import pytest

from .slicer_testing import REPO_ROOT

FLOOR = (3, 10)  # python_backend/pyproject.toml requires-python
SLICER_PYTHON = (3, 12)  # what Slicer 5.10 (the declared minimum) ships

#: standard-library names added after 3.10 (module, attribute) -> version, and names gone by 3.12
ADDED = {("tomllib", None): (3, 11), ("datetime", "UTC"): (3, 11), ("enum", "StrEnum"): (3, 11),
         ("typing", "Self"): (3, 11), ("typing", "LiteralString"): (3, 11), ("typing", "Never"): (3, 11),
         ("typing", "assert_never"): (3, 11), ("typing", "reveal_type"): (3, 11), ("typing", "override"): (3, 12),
         ("hashlib", "file_digest"): (3, 11), ("contextlib", "chdir"): (3, 11), ("asyncio", "TaskGroup"): (3, 11),
         ("asyncio", "timeout"): (3, 11), ("itertools", "batched"): (3, 12), ("math", "sumprod"): (3, 12),
         ("warnings", "deprecated"): (3, 13), ("copy", "replace"): (3, 13), ("os", "process_cpu_count"): (3, 13),
         ("builtins", "ExceptionGroup"): (3, 11), ("builtins", "BaseExceptionGroup"): (3, 11),
         ("importlib.resources", "as_file"): (3, 9), ("itertools", "pairwise"): (3, 10)}
REMOVED = {"imp", "distutils", "asynchat", "asyncore", "smtpd", "assertEquals", "assertNotEquals", "assertItemsEqual",
           "assertRegexpMatches", "assertDictContainsSubset", "failUnless", "failIf", "SafeConfigParser", "ImpImporter"}


def slicerSideFiles():
    files = [os.path.join(REPO_ROOT, "AnyMC3DSlicer", "AnyMC3DSlicer.py")]
    files += sorted(os.path.join(REPO_ROOT, "Logic", n) for n in os.listdir(os.path.join(REPO_ROOT, "Logic")) if n.endswith(".py"))
    backend = Path(REPO_ROOT, "python_backend", "anymc3d")
    return files + sorted(str(p) for p in backend.rglob("*.py") if "__pycache__" not in p.parts)  # subpackages too


def newerNames(tree):
    """(name, version) of the standard-library names used in ``tree`` that are newer than FLOOR or removed."""
    aliases, found = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name] = alias.name
                found.append((alias.name, None))
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, None))
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            found.append((aliases.get(node.value.id, node.value.id), node.attr))
        elif isinstance(node, ast.Name):
            found.append(("builtins", node.id))
        if isinstance(node, ast.Attribute) and node.attr in REMOVED:
            found.append(("removed", node.attr))
    problems = [(f"{module}.{attr}", ADDED[(module, attr)]) for module, attr in found
                if ADDED.get((module, attr), (0,)) > FLOOR]
    problems += [(f"{module}.{attr}", "removed by 3.12") for module, attr in found
                 if module.split(".")[0] in REMOVED or attr in REMOVED]
    return problems


@pytest.mark.parametrize("path", slicerSideFiles(), ids=lambda p: os.path.relpath(p, REPO_ROOT))
def test_syntax_and_standard_library_fit_the_minimum_slicer(path):
    with open(path, encoding="utf-8") as file:
        source = file.read()
    tree = ast.parse(source, filename=path, feature_version=FLOOR)
    assert newerNames(tree) == []


def test_the_scan_sees_what_it_must_refuse():
    """The checker itself: 3.11+/3.12+ names and 3.12 removals are found, 3.10 names are not."""
    source = ("import tomllib\nimport itertools as it\nfrom typing import Self\nimport imp\nit.batched([1], 1)\n"
              "it.pairwise([1, 2])\nclass T:\n    def t(self):\n        self.assertEquals(1, 1)\n")
    found = {name for name, _ in newerNames(ast.parse(source))}
    assert found == {"tomllib.None", "itertools.batched", "typing.Self", "imp.None", "removed.assertEquals", "self.assertEquals"}
    with pytest.raises(SyntaxError):
        ast.parse("def f[T](x: T) -> T:\n    return x\n", feature_version=FLOOR)


def test_the_minimum_is_declared_the_same_everywhere():
    with open(os.path.join(REPO_ROOT, "AnyMC3DSlicer", "AnyMC3DSlicer.py"), encoding="utf-8") as file:
        module = file.read()
    assert "MINIMUM_SLICER_VERSION = (5, 10)" in module and f"MINIMUM_PYTHON = {FLOOR}" in module
    with open(os.path.join(REPO_ROOT, "CMakeLists.txt"), encoding="utf-8") as file:
        cmake = file.read()
    assert re.search(r'set\(ANYMC3D_MINIMUM_SLICER_VERSION "5\.10"\)', cmake) and "Needs Slicer 5.10 or later" in cmake
    floors = []
    for pyproject in ("Logic/pyproject.toml", "python_backend/pyproject.toml"):
        with open(os.path.join(REPO_ROOT, pyproject), "rb") as file:
            floors.append(tomllib.load(file)["project"]["requires-python"])
    assert floors == [">=3.10", ">=3.10"]
    with open(os.path.join(REPO_ROOT, "docs", "slicer.md"), encoding="utf-8") as file:
        assert "Slicer 5.10" in file.read()

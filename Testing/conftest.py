"""Fixtures of the Logic tests (helpers in slicer_testing.py).

Run from the repository root after ``pip install -e Logic`` (scripts/test.sh does it): ``pytest -q Testing``. Testing is a package, so this
module is ``Testing.conftest`` and does not replace the backend tests' ``conftest`` in a run over both folders.
"""

import os
import sys

import pytest

pytest.importorskip("slicer")
pytest.importorskip("SimpleITK")

from .slicer_testing import (
    FAKE_BACKEND,
    FakeRunner,
    SceneContext,
    makeDemo,
    writeFakePlugin,
    writeObliqueVolume,
)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The backend's demo backbone, plugin and volume, made once per session (``anymc3d demo``)."""
    pytest.importorskip("anymc3d.cli", reason="the anymc3d backend CLI is not importable")
    return makeDemo(tmp_path_factory.mktemp("demo"))


@pytest.fixture
def sceneContext():
    return SceneContext()


@pytest.fixture
def obliqueVolumePath(tmp_path):
    return writeObliqueVolume(tmp_path / "oblique.nii.gz")


@pytest.fixture
def fakePlugins(tmp_path):
    folder = tmp_path / "plugins-src"
    folder.mkdir()
    return [writeFakePlugin(folder / "demo_findings.anymc3d", "demo_findings"),
            writeFakePlugin(folder / "second.anymc3d", "second plugin", probabilities={"nodule": 0.9, "effusion": 0.1, "fracture": 0.55})]


@pytest.fixture
def tempRoot(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    return str(root)


@pytest.fixture
def fakeLogic(sceneContext, tempRoot):
    """The Logic running the fake backend script through the real SubprocessRunner."""
    from AnyMC3DSlicerLogic import AnyMC3DSlicerLogic, SubprocessRunner

    def make(mode="ok", extraEnv=None):
        os.environ["FAKE_ANYMC3D_MODE"] = mode
        for key, value in (extraEnv or {}).items():
            os.environ[key] = value
        return AnyMC3DSlicerLogic(sceneContext.scene, runner=SubprocessRunner(), backendCommand=[sys.executable, FAKE_BACKEND],
                                  volumesLogic=sceneContext.volumesLogic,
                                  volumeRenderingLogic=sceneContext.volumeRenderingLogic, tempRoot=tempRoot)

    yield make
    os.environ.pop("FAKE_ANYMC3D_MODE", None)
    os.environ.pop("FAKE_ANYMC3D_PIDS", None)


@pytest.fixture
def fakeRunnerClass():
    return FakeRunner

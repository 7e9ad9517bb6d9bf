"""Helpers of the Logic tests: a slicer-core scene with the application's logics, test volumes, fake plugins,
an in-process fake runner. (Not in conftest.py: the backend's tests have a conftest too, and one pytest run over
both folders must not mix the two modules named conftest up.)
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import SimpleITK as sitk
import slicer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND_PATH = os.path.join(REPO_ROOT, "python_backend")
FAKE_BACKEND = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_anymc3d.py")


class SceneContext:
    """A scene with the logics the application would have (colours, volumes, volume rendering)."""

    def __init__(self):
        self.scene = slicer.vtkMRMLScene()
        self.appLogic = slicer.vtkSlicerApplicationLogic()
        self.appLogic.SetMRMLScene(self.scene)
        self.colorLogic = slicer.vtkSlicerColorLogic()
        self.colorLogic.SetMRMLApplicationLogic(self.appLogic)
        self.colorLogic.SetMRMLScene(self.scene)
        self.appLogic.SetModuleLogic("Colors", self.colorLogic)
        self.volumesLogic = slicer.vtkSlicerVolumesLogic()
        self.volumesLogic.SetMRMLApplicationLogic(self.appLogic)
        self.volumesLogic.SetMRMLScene(self.scene)
        self.volumeRenderingLogic = slicer.vtkSlicerVolumeRenderingLogic()
        self.volumeRenderingLogic.SetMRMLApplicationLogic(self.appLogic)
        self.volumeRenderingLogic.SetMRMLScene(self.scene)
        # The application always has a subject hierarchy node; create it now so node counts compare like in Slicer.
        slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)

    def loadVolume(self, path, name=None):
        node = self.volumesLogic.AddArchetypeVolume(str(path), name or os.path.basename(str(path)).split(".")[0], 0)
        assert node is not None, path
        return node

    def nodeCount(self):
        return self.scene.GetNumberOfNodes()


def writeObliqueVolume(path, size=(12, 10, 8), spacing=(0.7, 0.9, 3.0), origin=(10.0, -20.0, 30.0), seed=0):
    """An oblique, anisotropic volume (non-axis-aligned direction, nonzero origin) written with SimpleITK."""
    rng = np.random.default_rng(seed)
    voxels = rng.normal(0.0, 1.0, size[::-1]).astype(np.float32)
    voxels[size[2] // 2, 2:5, 3:7] += 8.0  # a bright blob: the heatmap maximum
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    a, b = math.radians(25), math.radians(10)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    image.SetDirection(tuple((rz @ rx).flatten()))
    sitk.WriteImage(image, str(path))
    return str(path)


def writeFakePlugin(path, name, labels=("nodule", "effusion", "fracture"), probabilities=None, thresholds=None):
    probabilities = probabilities or {label: round(0.2 + 0.3 * i, 3) for i, label in enumerate(labels)}
    thresholds = thresholds or {label: 0.5 for label in labels}
    with open(path, "w") as file:
        json.dump({"name": name, "task": "multilabel", "labels": list(labels), "probabilities": probabilities,
                   "thresholds": thresholds, "backbone": {"name": "vit_small_patch14_dinov2"}}, file)
    return str(path)


class FakeRunner:
    """In-process runner that replays stdout lines and an exit code (SlicerNNUnet's MockProcess pattern).

    ``script(command) -> (lines, exitCode)`` is called at start; it may write the output files.
    """

    def __init__(self, script):
        self.script = script
        self.commands = []
        self._pending = None
        self._callbacks = None
        self.cancelled = False
        self.prepared = []

    def start(self, command, onStdoutLine, onStderrLine, onFinished, env=None, cwd=None, stdinText=None):
        if stdinText is not None and command[-1] == "standby":  # `anymc3d standby` runs the line given on stdin
            command = list(command[:-1]) + json.loads(stdinText)
        self.commands.append(list(command))
        self._callbacks = (onStdoutLine, onStderrLine, onFinished)
        lines, exitCode = self.script(list(command))
        self._pending = (list(lines), exitCode)

    def prepare(self, command, env=None, cwd=None):
        self.prepared.append(list(command))

    def close(self):
        pass

    def isRunning(self):
        return self._pending is not None

    def cancel(self):
        self.cancelled = True

    def processEvents(self, timeout=0.0):
        if self._pending is None:
            return
        lines, exitCode = self._pending
        onStdoutLine, _, onFinished = self._callbacks
        while lines:
            onStdoutLine(lines.pop(0))
            if self.cancelled:
                break
        self._pending = None
        from AnyMC3DSlicerLogic import ExitCode

        onFinished(ExitCode.CANCELLED if self.cancelled else exitCode)


def backendEnv(extraPaths=()):
    """This environment with the worktree's backend first on PYTHONPATH (for child processes)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (*extraPaths, BACKEND_PATH, env.get("PYTHONPATH", "")) if p)
    return env


def makeDemo(folder):
    """``anymc3d demo``: a tiny backbone, a plugin made for it and a volume."""
    completed = subprocess.run([sys.executable, "-m", "anymc3d", "demo", str(folder), "--no-train"], check=False, env=backendEnv(),
                               capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert completed.returncode == 0, completed.stderr
    return {"backbone": str(folder / "backbone.safetensors"), "plugin": str(folder / "plugin.anymc3d"),
            "volume": str(folder / "volume.nii.gz")}

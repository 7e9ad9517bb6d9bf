"""The module file in a Slicer-like Python (slicer-core + stand-ins that behave as Slicer's, CTK's and PythonQt's
code does where it matters, see slicer_standins/). Each scenario runs in its own child process."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import pytest
import SimpleITK as sitk

from .slicer_testing import BACKEND_PATH, REPO_ROOT, writeObliqueVolume

pytestmark = pytest.mark.slow  # every scenario runs the module file in a child process

STANDINS = os.path.join(REPO_ROOT, "Testing", "slicer_standins")
BLOCKER = os.path.join(STANDINS, "blocker")
SCENARIOS = os.path.join(REPO_ROOT, "Testing", "module_scenarios.py")
MODULE_DIR = os.path.join(REPO_ROOT, "AnyMC3DSlicer")
FRESH_SLICER_LACKS = "torch,torchvision,timm,peft,safetensors,nibabel,jsonschema,tqdm"


def runScenario(name, arguments=None, moduleDir=MODULE_DIR, block="", blockLog=None, extraPaths=(BACKEND_PATH,), timeout=600):
    env = dict(os.environ, ANYMC3D_TEST_BLOCK=block, ANYMC3D_TEST_BLOCK_LOG=blockLog or "")
    env["PYTHONPATH"] = os.pathsep.join([BLOCKER, STANDINS, moduleDir, *extraPaths, env.get("PYTHONPATH", "")])
    completed = subprocess.run([sys.executable, SCENARIOS, name, json.dumps(arguments or {})], capture_output=True,
                               text=True, encoding="utf-8", env=env, cwd=os.path.dirname(SCENARIOS), timeout=timeout, check=False)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_module_logic_is_constructed_as_slicer_does():
    """Slicer's ScriptedLoadableModuleLogic.__init__ calls super().__init__() with no arguments: the module's logic
    class must still build with none (the old base order raised TypeError), and its parameter node is the singleton."""
    seen = runScenario("construct")
    assert seen["moduleName"] == "AnyMC3DSlicer" and seen["sceneIsApplications"] and seen["runner"] == "QProcessRunner"
    assert seen["device"] == "cpu" and seen["singleton"]
    assert seen["logicPackage"] == "AnyMC3DSlicerLogic"
    assert seen["versionOk"] and seen["oldSlicerRefused"]


def test_the_standin_catches_the_old_base_order():
    """The stand-in's constructor chain is the real one: a logic listing ScriptedLoadableModuleLogic first fails."""
    code = """
import slicer_app; slicer_app.install()
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
class PackageLogic:
    def __init__(self, scene, runner=None):
        self.scene = scene
class OldLogic(ScriptedLoadableModuleLogic, PackageLogic):
    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        PackageLogic.__init__(self, None)
try:
    OldLogic()
except TypeError as error:
    print("TypeError", error)
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([STANDINS, os.environ.get("PYTHONPATH", "")]))
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", env=env, check=False)
    assert "TypeError" in completed.stdout and "scene" in completed.stdout, completed.stdout + completed.stderr


def test_fresh_install_lists_plugins_and_apply_offers_installation(demo, tmp_path):
    """torch, timm, peft (and every other package Slicer does not ship) absent, in child processes too: opening the
    module lists the installed plugins without trying to import any of them, and Apply offers the installation
    (PyTorchUtils with the backend's torch pin, pip with its pins) before anything needs them."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    shutil.copy(demo["plugin"], folder / "chest.anymc3d")
    (folder / "broken.anymc3d").write_bytes(b"not a zip")
    os.makedirs(folder / ".half.x1.partial")
    shutil.copy(demo["plugin"], folder / ".half.x1.partial" / "plugin.json")
    log = tmp_path / "import-attempts.log"
    toImport = tmp_path / "downloads" / "second.anymc3d"
    toImport.parent.mkdir()
    shutil.copy(demo["plugin"], toImport)
    seen = runScenario("freshInstall", {"pluginFolder": str(folder), "backbone": demo["backbone"], "importPlugin": str(toImport),
                                        "batchFolder": str(tmp_path / "downloads")}, block=FRESH_SLICER_LACKS, blockLog=str(log))
    assert seen["listed"] == ["demo_findings"]
    assert seen["afterImport"] == ["demo_findings", "demo_findings"] and (folder / "second.anymc3d").is_file()
    assert len(seen["problems"]) == 1 and "broken.anymc3d" in seen["problems"][0]
    assert "lesion, effusion, fracture" in seen["info"] and seen["inputVolume"] == "CT"
    confirm = [text for kind, text in seen["dialogs"] if kind == "confirmOkCancelDisplay"]
    assert len(confirm) == 2 and confirm[0] == confirm[1]  # Apply, then Batch
    assert "torch>=2.3 (through the PyTorch extension)" in confirm[0] and "timm<1.1,>=1.0.20" in confirm[0]
    assert "jsonschema>=4" in confirm[0] and "tqdm>=4.60" in confirm[0] and "numpy" not in confirm[0]
    assert not any(name in confirm[0] for name in ("monai", "scikit-learn", "matplotlib"))  # training only
    assert seen["torchInstalls"] == [{"askConfirmation": False, "torch": ">=2.3", "torchvision": ""}]
    # light-the-torch "installed" nothing here, so PyTorchUtils' own `import torch` fails: a message, not a traceback
    assert any("Installing PyTorch failed" in text for kind, text in seen["dialogs"] if kind == "errorDisplay")
    assert not seen["jobStarted"] and seen["modules"] == []
    attempts = {line.split()[1].split(".")[0] for line in log.read_text(encoding="utf-8").splitlines()} if log.exists() else set()
    # only installTorch imports torch (as SlicerPyTorch does, after its install); jsonschema is optional (hand checker)
    assert attempts <= {"jsonschema", "torch"}, attempts


def test_fresh_install_pip_route_uses_the_backends_pins(tmp_path):
    """With torch present but the rest absent, Apply's installation goes to pip with the backend's specifiers."""
    code = """
import json, slicer_app
app = slicer_app.install()
from AnyMC3DSlicerLogic import DependencyChecker
checker = DependencyChecker()
missing = checker.missingPackages()
try:
    checker.install(missing, confirm=lambda lines: True)
except Exception as error:
    print(json.dumps({"missing": missing, "pip": app.pipInstalls, "constraints": app.pipConstraints, "error": str(error)}))
"""
    env = dict(os.environ, ANYMC3D_TEST_BLOCK="timm,peft,jsonschema,tqdm")
    env["PYTHONPATH"] = os.pathsep.join([BLOCKER, STANDINS, BACKEND_PATH, os.environ.get("PYTHONPATH", "")])
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", env=env, check=False)
    assert completed.returncode == 0, completed.stderr
    seen = json.loads(completed.stdout.strip().splitlines()[-1])
    assert sorted(seen["missing"]) == ["jsonschema", "peft", "timm", "tqdm"]
    (arguments,) = seen["pip"]
    assert sorted(arguments[:-2]) == ["jsonschema>=4", "peft>=0.17", "timm<1.1,>=1.0.20", "tqdm>=4.60"]
    assert arguments[-2] == "--constraint"
    # pip may not replace what Slicer's Python already has: torch (imported by PyTorchUtils), torchvision, numpy, scipy
    expected = sorted(f"{name}=={importlib.metadata.version(name)}" for name in ("torch", "torchvision", "numpy", "scipy"))
    assert sorted(seen["constraints"][0]) == expected
    assert not os.path.exists(arguments[-1])  # the constraints file is removed afterwards
    assert "Restart Slicer" in seen["error"]  # the stand-in installs nothing: still missing, restart asked


@pytest.mark.parametrize(("failing", "blocked", "expected"), [
    ("pip", "timm,peft,jsonschema,tqdm", "Installing "), ("light_the_torch", FRESH_SLICER_LACKS, "Installing PyTorch failed")])
def test_install_failures_are_clear_messages(demo, tmp_path, failing, blocked, expected):
    """pip or light-the-torch exits non-zero (no network, a pip conflict): Slicer's pip_install / PyTorchUtils raise
    CalledProcessError; Apply shows one clear message (no traceback in the console) and starts nothing."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    shutil.copy(demo["plugin"], folder / "chest.anymc3d")
    seen = runScenario("installFailure", {"pluginFolder": str(folder), "backbone": demo["backbone"],
                                          "failures": {failing: 1}}, block=blocked)
    assert seen["raised"] is None, seen["raised"]
    errors = [text for kind, text in seen["dialogs"] if kind == "errorDisplay"]
    assert len(errors) == 1 and errors[0].startswith(expected) and "exit code 1" in errors[0], errors
    assert not seen["jobStarted"]


def test_widget_lifecycle_as_slicer_runs_it():
    """The real base class, given no parent, calls setup() inside __init__ (the widget's own attributes must not be
    reset afterwards); the icon is found in source-tree mode too; Reload reloads Logic/ as well; the module
    manager's unload calls cleanup(), which ends the backend process kept ready."""
    seen = runScenario("lifecycle", {"moduleDir": MODULE_DIR})
    assert seen["logicAfterInit"]
    assert seen["icon"] and os.path.isfile(seen["icon"]) and seen["icon"].endswith("AnyMC3DSlicer.png")
    assert seen["logicReloaded"] and seen["moduleUsesNewLogic"]
    assert seen["readyStarted"] and seen["readyEnded"]


@pytest.fixture
def twoHeatmaps(tmp_path):
    volumePath = writeObliqueVolume(tmp_path / "volume.nrrd", size=(12, 10, 8))
    image = sitk.ReadImage(volumePath)
    paths = []
    for index in range(2):
        heat = sitk.GetArrayFromImage(image) * 0.0 + 0.3 * (index + 1)
        written = sitk.GetImageFromArray(heat.astype("float32"))
        written.CopyInformation(image)
        paths.append(str(tmp_path / f"h{index}.nrrd"))
        sitk.WriteImage(written, paths[-1])
    return volumePath, paths


def test_sliders_rows_and_input_selectors(twoHeatmaps):
    """Slider moves reach the display with the NEW value (the display follows the parameter node; handlers on the
    widgets' signals, connected before connectGui, would see the old one); a selected row of a sorted findings table
    shows that row's heatmap (mapToSource, no mrmlTableRowIndex); heatmaps are not offered as inputs."""
    volumePath, heatmaps = twoHeatmaps
    seen = runScenario("display", {"volume": volumePath, "heatmaps": heatmaps})
    assert seen["opacity"] == pytest.approx(0.8)
    assert seen["threshold"] == pytest.approx(0.6)
    assert seen["selectedViewRow0"].endswith("heatmap high") and seen["selectedViewRow1"].endswith("heatmap low")
    assert seen["thresholdOfShown"] == pytest.approx(0.6)
    assert seen["inputChoices"] == ["volume"] and len(seen["heatmaps"]) == 2
    assert not [text for kind, text in seen["dialogs"] if kind == "errorDisplay" and "AttributeError" in text]


def test_qprocess_is_never_deleted_inside_its_own_signal():
    seen = runScenario("processRunner")
    assert ["out", "a"] in seen["events"] and ["err", "b"] in seen["events"]
    assert ["finished", 3] in seen["events"] and ["finished2", 3] in seen["events"]
    assert seen["deletedDuringSignal"] == []
    assert seen["live"] == 0  # released once back in the event loop


def test_the_standin_catches_dropping_the_process_in_its_handler():
    """The old mistake (the finished QProcess's last reference dropped inside its own finished handler) is caught
    by the stand-in's ownership rule."""
    code = """
import sys, qt
from AnyMC3DSlicerLogic import QProcessRunner
from AnyMC3DSlicerLogic.process import ExitCode
def oldOnFinished(self, run, exitCode):
    run.process, self._run = None, None
    run.callbacks[2](exitCode)
QProcessRunner._onFinished = oldOnFinished
runner, done = QProcessRunner(), []
runner.start([sys.executable, "-c", "pass"], lambda line: None, lambda line: None, done.append)
while not done:
    runner.processEvents(0.05)
print(qt.deletedDuringSignal)
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([STANDINS, BACKEND_PATH, os.environ.get("PYTHONPATH", "")]))
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", env=env, check=False, timeout=120)
    assert "('QProcess', 'finished')" in completed.stdout, completed.stdout + completed.stderr


def test_qprocess_runner_adopts_the_process_kept_ready():
    """The QProcess runner: prepare() starts the process ahead, start() writes stdinText to that same process
    (QProcess.write of a QByteArray, then closeWriteChannel), and every QProcess is released afterwards."""
    code = """
import json, os, sys, qt
from AnyMC3DSlicerLogic import QProcessRunner
echo = [sys.executable, "-c", "import os, sys; print(os.getpid(), sys.stdin.readline().strip(), flush=True)"]
runner, out, done = QProcessRunner(), [], []
runner.prepare(echo, env=dict(os.environ))
readyPid = int(runner._ready.process.processId())
runner.start(echo, out.append, lambda line: None, done.append, env=dict(os.environ), stdinText="hello\\n")
while not done:
    runner.processEvents(0.05)
runner.processEvents(0)
print(json.dumps({"readyPid": readyPid, "out": out, "done": done, "live": len(qt.QProcess.live),
                  "deleted": qt.deletedDuringSignal}))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([STANDINS, BACKEND_PATH, os.environ.get("PYTHONPATH", "")]))
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", env=env, check=False, timeout=120)
    assert completed.returncode == 0, completed.stderr
    seen = json.loads(completed.stdout.strip().splitlines()[-1])
    assert seen["out"] == [f"{seen['readyPid']} hello"] and seen["done"] == [0]
    assert seen["live"] == 0 and seen["deleted"] == []


def test_self_test_runs_the_real_backend_on_the_sample_data():
    """The module's self-test (Reload & Test) in the stand-in application: real backend, shipped sample volume."""
    seen = runScenario("selfTest")
    assert seen["messages"][-1] == "Test passed" and seen["registered"]
    assert seen["checksum"].startswith("SHA256:") and not seen["deprecatedLoadFileType"]
    (demo,) = [command for command in seen["commands"] if "demo" in command]
    assert "--no-train" in demo  # the untrained demo: no two-minute training on the build machines
    assert seen["leftRunning"] == []  # tearDown closed the Logic: no backend process kept waiting


def test_self_test_skips_without_the_python_packages():
    """A fresh Slicer on an offline build machine: the self-test is skipped (unittest.SkipTest) before it installs
    anything or starts a backend."""
    seen = runScenario("selfTest", block=FRESH_SLICER_LACKS)
    assert "Python packages not installed" in seen["skipped"] and "torch" in seen["skipped"]
    assert seen["pip"] == [] and seen["torchInstalls"] == [] and seen["madeLogic"] == 0 and seen["commands"] == []


def test_train_section_fills_the_table_trains_and_adds_the_plugin(tmp_path):
    """The Train section with the real backend: the table filled from the loaded volumes, Train and evaluate, the
    expected time then each epoch shown, the charts, the evaluation table, the new plugin in the list."""
    from anymc3d.backbone import (
        BackboneSpec,
        create_backbone,
        make_load_bearing,
        save_backbone,
    )

    from .test_training_logic import lesionImage

    spec = BackboneSpec("dinov2_vits14_reg", img_size=56, depth=3, embed_dim=96, num_heads=3)
    backbone = save_backbone(make_load_bearing(create_backbone(spec), 0), spec, tmp_path / "tiny.safetensors")
    volumes, labels = [], []
    for index in range(16):
        image, _ = lesionImage(index, index % 2 == 1)
        volumes.append(str(tmp_path / f"case{index:02d}.nii.gz"))
        sitk.WriteImage(image, volumes[-1])
        labels.append(index % 2)
    seen = runScenario("trainSection", {"pluginFolder": str(tmp_path / "plugins"), "backbone": str(backbone),
                                        "volumes": volumes, "labels": labels, "epochs": 2}, timeout=900)
    assert seen["rows"] == [f"case{index:02d}" for index in range(16)]
    assert seen["columns"] == ["Case", "Labelled", "lesion", "Segmentation", "Split"] and seen["started"]
    assert seen["caseClickChanged"] is False
    assert seen["messages"][0] == "Starting the training" and seen["messages"][1].startswith("Expected time: about ")
    assert [m.split(":")[0] for m in seen["messages"] if m.startswith("Epoch")] == ["Epoch 1/2", "Epoch 2/2"]
    assert seen["status"].startswith("Plugin lesion added to the plugins folder (held-out AUROC ")
    assert seen["plugins"] == ["lesion"] and seen["dialogs"] == []
    assert seen["charts"] == ["lesion training", "lesion ROC"] and seen["metricsTable"] == "lesion evaluation"
    assert seen["runTestEnabled"] and seen["progressHidden"] and len(seen["testCases"]) == 4

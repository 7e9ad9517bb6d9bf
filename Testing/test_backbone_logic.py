"""Get backbone… in the Logic: the command it runs, progress from the backend's JSON lines, the result the module's
file selector takes, failure and Cancel (a fake runner), and one real ``anymc3d backbone get`` through the real
runner against the stand-in hub on 127.0.0.1."""

import json
import os
import sys
from pathlib import Path

import pytest
from AnyMC3DSlicerLogic import (
    AnyMC3DSlicerLogic,
    BackboneDownload,
    ExitCode,
    SubprocessRunner,
    listBackbones,
)
from AnyMC3DSlicerLogic.backbones import describe

from .slicer_testing import BACKEND_PATH, FakeRunner

COMMAND = [sys.executable, "-m", "anymc3d"]


def logicWith(sceneContext, tempRoot, runner):
    return AnyMC3DSlicerLogic(sceneContext.scene, runner=runner, backendCommand=COMMAND, backendPath=BACKEND_PATH,
                              volumesLogic=sceneContext.volumesLogic,
                              volumeRenderingLogic=sceneContext.volumeRenderingLogic, tempRoot=tempRoot)


def test_the_list_comes_from_the_backend_catalog_without_a_process(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYMC3D_HOME", str(tmp_path))
    rows = {row["name"]: row for row in listBackbones()}
    assert {"dinov2_vits14_reg", "dinov3_vits16", "imgfocus-dinov2-vits14"} <= set(rows)
    assert rows["imgfocus-dinov2-vits14"]["licence"] == "MIT" and not rows["dinov2_vits14"]["cached"]
    assert rows["dinov3_vits16"]["cacheDir"] == str(tmp_path / "backbones")
    assert describe(rows["dinov3_vits16"]).endswith("gated: accept its licence on the hub first)")


def test_get_runs_the_backend_command_and_reports_its_progress(sceneContext, tempRoot, tmp_path):
    folder = tmp_path / "cache" / "dinov3_vits16"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    lines = [json.dumps({"event": "progress", "stage": "download", "file": "config.json", "done": 921, "total": 921}),
             json.dumps({"event": "progress", "stage": "download", "file": "model.safetensors", "done": 25_000_000,
                         "total": 100_000_000}),
             "not a contract line",
             json.dumps({"event": "progress", "stage": "download", "file": "model.safetensors", "done": 100_000_000,
                         "total": 100_000_000}),
             json.dumps({"event": "done", "name": "dinov3_vits16", "path": str(folder)})]
    runner = FakeRunner(lambda command: (lines, 0))
    logic = logicWith(sceneContext, tempRoot, runner)
    progress, results = [], []
    download = BackboneDownload(logic, "dinov3_vits16", progress.append, results.append, cacheDir=tmp_path / "cache").start()
    assert download.wait(10)
    assert runner.commands[0] == COMMAND + ["backbone", "get", "dinov3_vits16", "--progress", "json", "--cache-dir",
                                            str(tmp_path / "cache")]
    assert [p.fraction for p in progress] == [1.0, 0.25, 1.0]
    assert progress[1].message == "Downloading dinov3_vits16: model.safetensors 25.0 of 100.0 MB"
    assert results == [download.result] and download.result.status == "ok"
    assert download.result.weightsFile == str(folder / "config.json")  # a folder: its config.json for the file selector


def test_a_failed_or_cancelled_get_says_so(sceneContext, tempRoot):
    logic = logicWith(sceneContext, tempRoot, FakeRunner(lambda command: ([], 2)))
    failed = BackboneDownload(logic, "dinov3_vits16").start()
    assert failed.wait(10) and failed.result.status == "failed" and failed.result.exitCode == 2
    assert failed.result.message == "The backend exited with code 2"
    # exit 0 without the done line is not a success either: nothing says where the weights are
    logic = logicWith(sceneContext, tempRoot, FakeRunner(lambda command: ([], 0)))
    silent = BackboneDownload(logic, "dinov3_vits16").start()
    assert silent.wait(10) and silent.result.status == "failed"

    lines = [json.dumps({"event": "progress", "stage": "download", "file": "model.safetensors", "done": 1, "total": 9})] * 3
    runner = FakeRunner(lambda command: (lines, 0))
    logic = logicWith(sceneContext, tempRoot, runner)
    download = BackboneDownload(logic, "dinov3_vits16", onProgress=lambda p: download.cancel()).start()
    assert download.wait(10)
    assert runner.cancelled and download.result.status == "cancelled"
    assert download.result.exitCode == int(ExitCode.CANCELLED)
    assert not download.result.path


@pytest.mark.slow
def test_a_real_get_through_the_real_runner(sceneContext, tempRoot, tmp_path, monkeypatch):
    """The real backend process (``anymc3d standby`` then ``backbone get``) against the stand-in hub: the Logic's
    command is one the real CLI takes, and its progress and result come from the real lines."""
    monkeypatch.syspath_prepend(str(Path(BACKEND_PATH) / "tests"))  # the backend tests' hub stand-in and writer
    from hub_standin import HubStandIn
    from test_backbone_layouts import save_transformers

    save_transformers("DINOv3ViTModel", tmp_path / "hf")
    server = HubStandIn()
    try:
        for name in ("config.json", "model.safetensors"):
            server.hub[("facebook/dinov3-vits16-pretrain-lvd1689m", name)] = (tmp_path / "hf" / name).read_bytes()
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("ANYMC3D_HOME", str(tmp_path / "home"))
        logic = logicWith(sceneContext, tempRoot, SubprocessRunner())
        progress = []
        download = BackboneDownload(logic, "dinov3_vits16", onProgress=progress.append).start()
        assert download.wait(300), "the backend did not finish"
    finally:
        server.close()
    assert download.result.status == "ok", download.result.message
    assert download.result.weightsFile == str(tmp_path / "home" / "backbones" / "dinov3_vits16" / "config.json")
    assert os.path.isfile(download.result.weightsFile) and progress and progress[-1].fraction == 1.0
    from anymc3d.backbone import load_backbone

    assert load_backbone(download.result.weightsFile).fingerprint == load_backbone(tmp_path / "hf").fingerprint

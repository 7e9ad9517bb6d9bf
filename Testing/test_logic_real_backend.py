"""The Logic with the REAL backend process (``python -m anymc3d``) on an oblique, anisotropic volume.

Skipped when the backend is not importable. The demo backbone and plugin come from ``anymc3d demo``.
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from AnyMC3DSlicerLogic import (
    AnyMC3DSlicerLogic,
    DisplayOptions,
    ExitCode,
    PluginLibrary,
    PredictionOptions,
    SubprocessRunner,
)
from AnyMC3DSlicerLogic import outputs as out

from .slicer_testing import BACKEND_PATH, writeObliqueVolume

pytest.importorskip("anymc3d.cli", reason="the anymc3d backend CLI is not importable")


@pytest.fixture
def realLogic(sceneContext, tempRoot):
    return AnyMC3DSlicerLogic(sceneContext.scene, runner=SubprocessRunner(), backendCommand=[sys.executable, "-m", "anymc3d"],
                              backendPath=BACKEND_PATH, volumesLogic=sceneContext.volumesLogic,
                              volumeRenderingLogic=sceneContext.volumeRenderingLogic, tempRoot=tempRoot)


@pytest.fixture
def obliqueSmall(tmp_path):
    return writeObliqueVolume(tmp_path / "oblique.nii.gz", size=(24, 20, 10))


def captureBackendOutputs(logic, keepDir):
    """Wrap importResults to keep the backend's JSON record and heatmap files before the temporary folder goes."""
    captured = {}
    original = logic.importResults

    def importResults(record, inputs, options=None, displayOptions=None):
        captured["record"] = json.loads(json.dumps(record))
        captured["files"] = {}
        for result in record["results"]:
            for path in [result["heatmap"], *result["finding_heatmaps"].values()]:
                if path:
                    kept = os.path.join(keepDir, os.path.basename(path))
                    shutil.copy(path, kept)
                    captured["files"][path] = kept
        return original(record, inputs, options, displayOptions)

    logic.importResults = importResults
    return captured


# radon cc 22: one end-to-end run's assertions in order
def test_real_backend_end_to_end(sceneContext, realLogic, demo, obliqueSmall, tmp_path, tempRoot):
    volume = sceneContext.loadVolume(obliqueSmall, "Oblique")
    captured = captureBackendOutputs(realLogic, str(tmp_path))
    progress = []
    result = realLogic.runPrediction([volume], demo["backbone"], [demo["plugin"]], PredictionOptions(device="cpu"),
                                     DisplayOptions(threshold=0.25), onProgress=progress.append, timeout=300)
    assert result.status == "ok", result.message
    assert os.listdir(tempRoot) == []
    assert {"starting", "reading", "encoding", "importing", "done"} <= {p.stage for p in progress}
    record = captured["record"]
    assert record["status"] == "ok"
    dims = volume.GetImageData().GetDimensions()
    assert record["num_slices"] == dims[record["slicing_axis"]]
    assert record["slicing_axis"] == 2  # the 3 mm axis is the coarsest

    # Table == the backend's JSON
    (backendResult,) = record["results"]
    table = result.outputs.tableNode
    assert table.GetNumberOfRows() == len(backendResult["labels"])
    for row, label in enumerate(backendResult["labels"]):
        assert table.GetCellText(row, 0) == backendResult["plugin"]
        assert table.GetCellText(row, 1) == label
        assert table.GetTable().GetValue(row, 2).ToDouble() == pytest.approx(backendResult["probabilities"][label], abs=1e-12)
        assert table.GetTable().GetValue(row, 3).ToDouble() == pytest.approx(backendResult["thresholds"][label], abs=1e-12)
        assert table.GetCellText(row, 4) == ("positive" if backendResult["decisions"][label] else "negative")

    # Heatmap: the contract's file name, the input's IJK-to-RAS exactly, the file's voxels exactly
    assert os.path.basename(backendResult["heatmap"]) == "Oblique__demo_findings.nrrd"
    (heatmap,) = result.outputs.heatmapNodes
    np.testing.assert_array_equal(out.matrixToArray(out.ijkToRasMatrix(heatmap)), out.matrixToArray(out.ijkToRasMatrix(volume)))
    backendFile = sitk.ReadImage(captured["files"][backendResult["heatmap"]])
    assert backendFile.GetSize() == dims
    np.testing.assert_array_equal(out.arrayFromVolumeNode(heatmap), sitk.GetArrayFromImage(backendFile))
    voxels = out.arrayFromVolumeNode(heatmap)
    # Contract: values in [0, 1], max-normalised. (The backend's maximum after resampling to the input grid can be < 1.)
    assert voxels.dtype == np.float32 and voxels.min() >= 0.0 and 0.5 < voxels.max() <= 1.0

    # Volume rendering with the heatmap transfer function
    vr = sceneContext.volumeRenderingLogic.GetFirstVolumeRenderingDisplayNode(heatmap)
    assert vr is not None and vr.GetVisibility()
    prop = vr.GetVolumePropertyNode().GetVolumeProperty()
    assert [prop.GetScalarOpacity().GetValue(x) for x in (0.0, 0.25, 1.0)] == pytest.approx([0, 0, out.MAX_VOLUME_RENDERING_OPACITY])
    assert prop.GetRGBTransferFunction().GetColor(1.0) == pytest.approx(out.HEATMAP_COLOR_STOPS[-1][1])

    # Slice importance chart == the JSON
    importanceTable = result.outputs.importanceTableNode.GetTable()
    importance = [importanceTable.GetValue(r, 1).ToDouble() for r in range(importanceTable.GetNumberOfRows())]
    assert importance == pytest.approx(backendResult["slice_importance"])


def test_real_backend_cancel_mid_run(sceneContext, realLogic, demo, obliqueSmall, tempRoot):
    volume = sceneContext.loadVolume(obliqueSmall)
    before = sceneContext.nodeCount()
    job = None
    seen = []

    def onProgress(progress):
        seen.append(progress.stage)
        if progress.stage in ("reading", "encoding"):
            job.cancel()

    job = realLogic.startPrediction([volume], demo["backbone"], [demo["plugin"]], PredictionOptions(device="cpu", chunkSize=1),
                                    onProgress=onProgress)
    pid = realLogic.runner.pid
    assert job.wait(300)
    assert job.result.status == "cancelled" and job.result.exitCode == ExitCode.CANCELLED
    assert "reading" in seen or "encoding" in seen
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert sceneContext.nodeCount() == before
    assert os.listdir(tempRoot) == []


def test_real_backend_corrupt_file_adds_no_nodes_and_batch_goes_on(sceneContext, realLogic, demo, obliqueSmall, tmp_path, tempRoot):
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b this is not a NIfTI file")
    volume = sceneContext.loadVolume(obliqueSmall, "Loaded")
    before = sceneContext.nodeCount()
    countsAfterCase = []
    results = realLogic.runBatch([str(corrupt), volume], demo["backbone"], [demo["plugin"]], PredictionOptions(device="cpu"),
                                 onCaseDone=lambda result: countsAfterCase.append(sceneContext.nodeCount()), timeout=600)
    assert [r.status for r in results] == ["failed", "ok"]
    failed = results[0]
    assert failed.exitCode == 1 and "corrupt" in failed.message and "Traceback" not in failed.message
    assert countsAfterCase[0] == before  # the corrupt case added no nodes
    assert results[1].outputs.tableNode.GetNumberOfRows() == 3
    assert os.listdir(tempRoot) == []


def test_real_backend_fatal_error_is_a_clear_message(sceneContext, realLogic, demo, obliqueSmall, tempRoot):
    volume = sceneContext.loadVolume(obliqueSmall)
    before = sceneContext.nodeCount()
    result = realLogic.runPrediction([volume], obliqueSmall, [demo["plugin"]], PredictionOptions(device="cpu"), timeout=300)
    assert result.status == "failed" and result.exitCode == 2
    assert "backbone" in result.message and "Traceback" not in result.message
    assert sceneContext.nodeCount() == before


def test_plugin_library_with_real_plugin(demo, tmp_path):
    """The default reader (anymc3d.plugin_file: plugin.json only) lists, imports and removes real plugins."""
    library = PluginLibrary(tmp_path / "plugins")
    assert library.plugins() == ([], [])
    info = library.importPlugin(demo["plugin"])
    assert info.name == "demo_findings" and info.task == "multilabel"
    assert info.labels == ["lesion", "effusion", "fracture"] and info.backbone == "dinov2_vits14_reg"
    (bad := tmp_path / "plugins" / "broken.anymc3d").write_bytes(b"not a plugin")
    plugins, problems = library.plugins()
    assert [p.name for p in plugins] == ["demo_findings"] and [os.path.basename(p) for p, _ in problems] == ["broken.anymc3d"]
    with pytest.raises(FileExistsError):
        library.importPlugin(demo["plugin"])
    library.removePlugin(plugins[0].path)
    library.removePlugin(str(bad))
    assert library.plugins() == ([], [])


def test_real_backend_gradient_ensemble_per_finding_heatmaps(sceneContext, realLogic, demo, obliqueSmall, tempRoot):
    """An ensemble of two plugins with a gradient method: one table, one heatmap per finding, rows switch them."""
    volume = sceneContext.loadVolume(obliqueSmall, "Oblique")
    options = PredictionOptions(device="cpu", heatmapMethod="grad_last", ensemble=True)
    result = realLogic.runPrediction([volume], demo["backbone"], [demo["plugin"], demo["plugin"]], options, timeout=300)
    assert result.status == "ok", result.message
    (backendResult,) = result.outputs.record["results"]
    assert backendResult["plugin"] == "ensemble"
    assert {os.path.basename(p) for p in backendResult["finding_heatmaps"].values()} == \
        {f"Oblique__ensemble__{label}.nrrd" for label in backendResult["labels"]}
    table = result.outputs.tableNode
    assert [table.GetCellText(row, 0) for row in range(table.GetNumberOfRows())] == ["ensemble"] * 3
    heatmaps = result.outputs.heatmapNodes
    assert len(heatmaps) == 3
    for row in range(3):
        shown = realLogic.selectFinding(table, row)
        assert shown.GetName() == f"Oblique ensemble heatmap {backendResult['labels'][row]}"
        visible = [sceneContext.volumeRenderingLogic.GetFirstVolumeRenderingDisplayNode(h).GetVisibility() for h in heatmaps]
        assert visible == [int(h is shown) for h in heatmaps]
    assert os.listdir(tempRoot) == []


pytestmark = pytest.mark.slow  # child backend processes: left out of the quick tier

"""The Logic on a real slicer-core scene, with a fake backend that follows the CLI contract."""

import json
import os
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
from AnyMC3DSlicerLogic import (
    AnyMC3DSlicerLogic,
    DisplayOptions,
    ExitCode,
    PredictionOptions,
)
from AnyMC3DSlicerLogic import outputs as out

from .slicer_testing import FAKE_BACKEND, writeObliqueVolume


def ijkToRas(node):
    return out.matrixToArray(out.ijkToRasMatrix(node))


def contractEvents(numSlices=3):
    lines = [json.dumps({"event": "start", "cases": 1})]
    lines.append(json.dumps({"event": "progress", "case": 0, "cases": 1, "image": "x", "stage": "reading", "done": 0, "total": 1}))
    for done in range(1, numSlices + 1):
        lines.append(json.dumps({"event": "progress", "case": 0, "cases": 1, "image": "x", "stage": "encoding",
                                 "done": done, "total": numSlices}))
    lines.append("a log line that is not JSON")
    lines.append(json.dumps({"event": "progress", "case": 0, "cases": 1, "image": "x", "stage": "heatmap", "done": 0, "total": 1}))
    lines.append(json.dumps({"event": "progress", "case": 0, "cases": 1, "image": "x", "stage": "writing", "done": 0, "total": 1}))
    return lines


def test_progress_by_stage_and_failed_run_with_fake_runner(sceneContext, obliqueVolumePath, fakePlugins, fakeRunnerClass, tempRoot):
    volume = sceneContext.loadVolume(obliqueVolumePath)
    lines = contractEvents() + [json.dumps({"event": "case_done", "case": 0, "image": "x", "status": "error",
                                            "error": "Cannot read x: truncated file"}),
                                json.dumps({"event": "done", "ok": 0, "failed": 1, "json": None})]
    runner = fakeRunnerClass(lambda command: (lines, 1))
    logic = AnyMC3DSlicerLogic(sceneContext.scene, runner=runner, backendCommand=["anymc3d"], tempRoot=tempRoot,
                               volumesLogic=sceneContext.volumesLogic, volumeRenderingLogic=sceneContext.volumeRenderingLogic)
    before = sceneContext.nodeCount()
    progress = []
    job = logic.startPrediction([volume], "/w/backbone.safetensors", fakePlugins, PredictionOptions(device="cpu"),
                                onProgress=progress.append)
    # The input was written to the temporary folder before the start
    command = runner.commands[0]
    assert command[:2] == ["anymc3d", "predict"]
    assert os.path.isfile(command[2])
    assert job.wait(10)
    stages = [p.stage for p in progress]
    assert stages[0] == "starting"
    assert stages[1:] == ["reading", "encoding", "encoding", "encoding", "heatmap", "writing"]
    fractions = [p.fraction for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] <= 0.95
    encoding = [p for p in progress if p.stage == "encoding"]
    assert [(p.done, p.total) for p in encoding] == [(1, 3), (2, 3), (3, 3)]
    assert encoding[-1].message == "Encoding slices 3/3"
    assert job.result.status == "failed" and job.result.exitCode == 1
    assert job.result.message == "Cannot read x: truncated file"
    assert job.stdoutLog == ["a log line that is not JSON"]
    assert sceneContext.nodeCount() == before
    assert os.listdir(tempRoot) == []


def test_command_line(sceneContext, tempRoot):
    logic = AnyMC3DSlicerLogic(sceneContext.scene, runner=object(), backendCommand=["PythonSlicer", "-m", "anymc3d"],
                               volumesLogic=sceneContext.volumesLogic, volumeRenderingLogic=sceneContext.volumeRenderingLogic)
    command = logic.buildCommand(["a.nrrd"], "w.safetensors", ["p1.anymc3d", "p2.anymc3d"], "h", "r.json",
                                 PredictionOptions(device="cuda", heatmapMethod="grad_last", ensemble=True, chunkSize=8))
    assert command == ["PythonSlicer", "-m", "anymc3d", "predict", "a.nrrd", "--backbone", "w.safetensors",
                       "--plugin", "p1.anymc3d", "--plugin", "p2.anymc3d", "--heatmap", "h", "--heatmap-format", "nrrd",
                       "--json", "r.json", "--progress", "json", "--device", "cuda", "--heatmap-method", "grad_last",
                       "--chunk-size", "8", "--precision", "auto", "--ensemble"]
    with pytest.raises(ValueError):
        PredictionOptions(device="gpu").commandLineArguments()
    with pytest.raises(ValueError):
        PredictionOptions(precision="int8").commandLineArguments()


# radon cc 36: one run's imported nodes checked one by one (each assertion a branch), in the order a user sees them
def test_successful_run_imports_everything(sceneContext, obliqueVolumePath, fakePlugins, fakeLogic, tempRoot):
    logic = fakeLogic("ok")
    volume = sceneContext.loadVolume(obliqueVolumePath, "Oblique")
    sliceComposite = sceneContext.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    progress = []
    result = logic.runPrediction([volume], "backbone.safetensors", fakePlugins, PredictionOptions(device="cpu"),
                                 DisplayOptions(opacity=0.4, threshold=0.3), onProgress=progress.append, timeout=60)
    assert result.status == "ok", result.message
    assert progress[-1].stage == "done" and "importing" in [p.stage for p in progress]
    assert os.listdir(tempRoot) == []
    outputs = result.outputs

    # Findings table: one row per plugin and finding, the fake plugins' values
    table = outputs.tableNode
    assert table.GetName() == "Oblique demo_findings + second plugin findings"
    assert table.GetNumberOfRows() == 6
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == list(out.TABLE_COLUMNS)
    assert table.GetCellText(3, 0) == "second plugin" and table.GetCellText(3, 1) == "nodule"
    assert float(table.GetCellText(3, 2)) == pytest.approx(0.9)
    assert table.GetCellText(3, 4) == "positive" and table.GetCellText(0, 4) == "negative"

    # Heatmaps: geometry copied from the input, voxels equal to the backend's files
    assert len(outputs.heatmapNodes) == 2
    for heatmap in outputs.heatmapNodes:
        np.testing.assert_array_equal(ijkToRas(heatmap), ijkToRas(volume))
        assert heatmap.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
        assert heatmap.GetDisplayNode().GetColorNode().GetName() == out.COLOR_TABLE_NAME
        assert heatmap.GetDisplayNode().GetApplyThreshold() and heatmap.GetDisplayNode().GetLowerThreshold() == pytest.approx(0.3)
    # Selecting a row switches the slice views' foreground and the visible volume rendering
    shown = logic.heatmapNodeForRow(table, 3)
    assert sliceComposite.GetForegroundVolumeID() == shown.GetID()
    assert sliceComposite.GetBackgroundVolumeID() == volume.GetID()
    assert sliceComposite.GetForegroundOpacity() == pytest.approx(0.4)
    logic.selectFinding(table, 0)
    assert sliceComposite.GetForegroundVolumeID() == outputs.heatmapNodes[0].GetID()
    vrDisplays = [sceneContext.volumeRenderingLogic.GetFirstVolumeRenderingDisplayNode(h) for h in outputs.heatmapNodes]
    assert [d.GetVisibility() for d in vrDisplays] == [1, 0]
    prop = vrDisplays[0].GetVolumePropertyNode().GetVolumeProperty()
    opacity = prop.GetScalarOpacity()
    points = [opacity.GetValue(x) for x in (0.0, 0.1, 1.0)]
    assert points == pytest.approx([0.0, 0.0, out.MAX_VOLUME_RENDERING_OPACITY])
    color = prop.GetRGBTransferFunction()
    # the overlay's table (inferno): black-purple at 0, pale yellow at 1, the mid stop in between
    for value in (0.0, 0.5, 1.0):
        assert color.GetColor(value) == pytest.approx(out.heatmapColor(value), abs=1e-3)
    assert color.GetColor(1.0)[0] > 0.9 and color.GetColor(0.0)[0] < 0.05

    # Slice importance chart along the slicing axis (K here)
    chart = outputs.chartNode
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    series = chart.GetNthPlotSeriesNode(0)
    assert series.GetXColumnName() == "Slice" and series.GetYColumnName() == "demo_findings"
    importanceTable = outputs.importanceTableNode.GetTable()
    assert importanceTable.GetNumberOfRows() == volume.GetImageData().GetDimensions()[2]
    importance = [importanceTable.GetValue(row, 1).ToDouble() for row in range(importanceTable.GetNumberOfRows())]

    # Subject hierarchy: every output in one folder under the input's parent
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(sceneContext.scene)
    for node in [table, chart, outputs.importanceTableNode, *outputs.heatmapNodes]:
        assert shNode.GetItemParent(shNode.GetItemByDataNode(node)) == outputs.folderItem
    assert shNode.GetItemParent(outputs.folderItem) == shNode.GetItemParent(shNode.GetItemByDataNode(volume))

    # Jump positions: heatmap maximum is the bright blob; the most important slice is the blob's slice
    maxRas = logic.heatmapMaximumRAS(outputs.heatmapNodes[0])
    voxels = out.arrayFromVolumeNode(outputs.heatmapNodes[0])
    k, j, i = np.unravel_index(np.argmax(voxels), voxels.shape)
    assert maxRas == pytest.approx(tuple(ijkToRas(volume) @ [i, j, k, 1])[:3])
    sliceRas = logic.mostImportantSliceRAS(table, 0)
    dims = volume.GetImageData().GetDimensions()
    expectedK = int(np.argmax(importance))
    assert expectedK == dims[2] // 2
    assert sliceRas == pytest.approx(tuple(ijkToRas(volume) @ [(dims[0] - 1) / 2, (dims[1] - 1) / 2, expectedK, 1])[:3])


def test_a_backend_process_kept_ready_serves_the_next_run(sceneContext, obliqueVolumePath, fakePlugins, fakeLogic):
    """keepBackendReady (the module's setting): after a run the Logic keeps an ``anymc3d standby`` process ready,
    and the next run is served by that very process (same pid) with the same results as a fresh one."""
    logic = fakeLogic("ok")
    logic.keepBackendReady = True
    volume = sceneContext.loadVolume(obliqueVolumePath, "Oblique")
    probabilities = []
    for _ in range(2):
        logic.prepareBackend()
        readyPid = logic.runner.readyPid
        assert readyPid is not None
        job = logic.startPrediction([volume], "backbone.safetensors", fakePlugins, PredictionOptions(device="cpu"))
        assert logic.runner.pid == readyPid  # adopted, not a new process
        assert job.wait(60) and job.result.status == "ok", job.result.message
        table = job.result.outputs.tableNode
        probabilities.append([table.GetCellText(row, 2) for row in range(table.GetNumberOfRows())])
    assert probabilities[0] == probabilities[1] and len(probabilities[0]) == 6
    assert logic.runner.readyPid not in (None, readyPid)  # a new one kept ready after the run
    logic.close()
    assert logic.runner.readyPid is None


def test_study_placement(sceneContext, obliqueVolumePath, fakePlugins, fakeLogic):
    logic = fakeLogic("ok")
    volume = sceneContext.loadVolume(obliqueVolumePath)
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(sceneContext.scene)
    patient = shNode.CreateSubjectItem(shNode.GetSceneItemID(), "Patient")
    study = shNode.CreateStudyItem(patient, "Study")
    shNode.CreateItem(study, volume)
    result = logic.runPrediction([volume], "b.safetensors", fakePlugins[:1], timeout=60)
    assert result.status == "ok", result.message
    assert shNode.GetItemParent(result.outputs.folderItem) == study


def test_gradient_method_gives_one_heatmap_per_finding(sceneContext, obliqueVolumePath, fakePlugins, fakeLogic):
    logic = fakeLogic("ok")
    volume = sceneContext.loadVolume(obliqueVolumePath)
    result = logic.runPrediction([volume], "b.safetensors", fakePlugins[:1], PredictionOptions(heatmapMethod="grad_last"), timeout=60)
    assert result.status == "ok", result.message
    heatmaps = result.outputs.heatmapNodes
    assert [h.GetName() for h in heatmaps] == [f"oblique demo_findings heatmap {label}" for label in ("nodule", "effusion", "fracture")]
    table = result.outputs.tableNode
    assert [logic.heatmapNodeForRow(table, row).GetID() for row in range(3)] == [h.GetID() for h in heatmaps]
    logic.selectFinding(table, 1)
    visible = [sceneContext.volumeRenderingLogic.GetFirstVolumeRenderingDisplayNode(h).GetVisibility() for h in heatmaps]
    assert visible == [0, 1, 0]


def test_reduced_volume_rendering_copy(sceneContext, obliqueVolumePath, fakePlugins, fakeLogic):
    """volumeRenderingMaxSize: the 3D view renders block means of the heatmap at the blocks' centres; the slice
    views keep the full-resolution heatmap; finding selection and threshold act on the copies."""
    logic = fakeLogic("ok")
    volume = sceneContext.loadVolume(obliqueVolumePath)  # 12 x 10 x 8 voxels
    display = DisplayOptions(volumeRenderingMaxSize=4)
    result = logic.runPrediction([volume], "b.safetensors", fakePlugins[:1], PredictionOptions(heatmapMethod="grad_last"),
                                 display, timeout=60)
    assert result.status == "ok", result.message
    heatmaps, table = result.outputs.heatmapNodes, result.outputs.tableNode
    vrLogic = sceneContext.volumeRenderingLogic
    for heatmap in heatmaps:
        assert heatmap.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()  # the result: untouched
        assert vrLogic.GetFirstVolumeRenderingDisplayNode(heatmap) is None  # never ray-cast at full size
        copy = heatmap.GetNodeReference(out.VOLUME_RENDERING_COPY_REFERENCE)
        # blocks of ceil(12/4) = 3 (I), ceil(10/4) = 3 (J: 10 voxels + 2 copies of the edge), ceil(8/4) = 2 (K)
        assert copy.GetImageData().GetDimensions() == (4, 4, 4)
        full, small = out.arrayFromVolumeNode(heatmap), out.arrayFromVolumeNode(copy)
        for (k, j, i) in [(0, 0, 0), (3, 3, 3), (1, 3, 0), (2, 1, 2)]:
            block = [(k * 2 + a, min(j * 3 + b, 9), i * 3 + c) for a in range(2) for b in range(3) for c in range(3)]
            assert small[k, j, i] == pytest.approx(np.mean([full[x] for x in block]), rel=1e-5)
            if j < 3:  # a whole block: its copy voxel sits at the mean RAS of the block's voxels
                centre = np.mean([ijkToRas(heatmap) @ [x, y, z, 1] for (z, y, x) in block], axis=0)
                np.testing.assert_allclose(ijkToRas(copy) @ [i, j, k, 1], centre, atol=1e-9)
        assert shNodeParent(sceneContext.scene, copy) == result.outputs.folderItem
    logic.selectFinding(table, 2)
    visible = [[d.GetVisibility() for d in out.volumeRenderingDisplayNodes(h)] for h in heatmaps]
    assert visible == [[0], [0], [1]]
    sliceComposite = out.nodesByClass(sceneContext.scene, "vtkMRMLSliceCompositeNode")
    assert all(c.GetForegroundVolumeID() == heatmaps[2].GetID() for c in sliceComposite)
    logic.setHeatmapThreshold(heatmaps[2], 0.5)
    opacity = out.volumeRenderingDisplayNodes(heatmaps[2])[0].GetVolumePropertyNode().GetVolumeProperty().GetScalarOpacity()
    assert [opacity.GetValue(x) for x in (0.45, 1.0)] == pytest.approx([0.0, out.MAX_VOLUME_RENDERING_OPACITY])


def test_preread_files_make_the_same_nodes(sceneContext, obliqueVolumePath, fakeLogic, tmp_path):
    """A file read by outputs.readVolumeFile (SimpleITK, in a thread) gives the node the volume storage node gives:
    same voxels, type, IJK-to-RAS, display colours; a heatmap of another geometry is still refused."""
    logic = fakeLogic("ok")
    read = logic.loadInputFile(obliqueVolumePath)
    pre = logic.loadInputFile(obliqueVolumePath, out.readVolumeFile(obliqueVolumePath))
    np.testing.assert_allclose(ijkToRas(pre), ijkToRas(read), rtol=0, atol=1e-9)
    np.testing.assert_array_equal(out.arrayFromVolumeNode(pre), out.arrayFromVolumeNode(read))
    assert pre.GetImageData().GetScalarType() == read.GetImageData().GetScalarType()
    assert pre.GetName() == read.GetName() and pre.GetStorageNode().GetFileName() == read.GetStorageNode().GetFileName()
    assert pre.GetDisplayNode().GetColorNodeID() == read.GetDisplayNode().GetColorNodeID()
    image = sitk.ReadImage(obliqueVolumePath)
    heatmapPath = str(tmp_path / "heatmap.nrrd")
    sitk.WriteImage(sitk.Cast(sitk.RescaleIntensity(image, 0.0, 1.0), sitk.sitkFloat32), heatmapPath)
    viaStorage = out.loadHeatmapVolume(sceneContext.scene, heatmapPath, read, "a")
    viaRead = out.loadHeatmapVolume(sceneContext.scene, heatmapPath, read, "b", out.readVolumeFile(heatmapPath))
    np.testing.assert_array_equal(out.arrayFromVolumeNode(viaRead), out.arrayFromVolumeNode(viaStorage))
    np.testing.assert_array_equal(ijkToRas(viaRead), ijkToRas(viaStorage))
    image.SetOrigin((0.0, 0.0, 0.0))
    movedPath = str(tmp_path / "moved.nrrd")
    sitk.WriteImage(image, movedPath)
    with pytest.raises(ValueError, match="geometry"):
        out.loadHeatmapVolume(sceneContext.scene, movedPath, read, "c", out.readVolumeFile(movedPath))
    with pytest.raises(ValueError, match="Cannot read"):
        out.readVolumeFile(str(tmp_path / "missing.nrrd"))


def shNodeParent(scene, node):
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    return shNode.GetItemParent(shNode.GetItemByDataNode(node))


@pytest.mark.parametrize("mode, expectedExit", [("fail", 1), ("fatal", 2), ("missing_heatmap", 0)])
def test_failing_run_adds_no_nodes(sceneContext, obliqueVolumePath, fakePlugins, fakeLogic, tempRoot, mode, expectedExit):
    logic = fakeLogic(mode)
    volume = sceneContext.loadVolume(obliqueVolumePath)
    before = sceneContext.nodeCount()
    result = logic.runPrediction([volume], "b.safetensors", fakePlugins, timeout=60)
    assert result.status == "failed" and result.exitCode == expectedExit
    assert "Traceback" not in result.message and result.message
    if mode == "fatal":
        assert result.message == "anymc3d: error: the backbone file is not a safetensors file"
    assert sceneContext.nodeCount() == before
    assert os.listdir(tempRoot) == []


def pidGone(pid):
    psutil = pytest.importorskip("psutil")
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_cancel_kills_process_tree_and_leaves_scene(sceneContext, obliqueVolumePath, fakePlugins, fakeLogic, tempRoot, tmp_path):
    pidsFile = str(tmp_path / "pids.json")
    logic = fakeLogic("hang", {"FAKE_ANYMC3D_PIDS": pidsFile})
    volume = sceneContext.loadVolume(obliqueVolumePath)
    before = sceneContext.nodeCount()
    job = None

    def onProgress(progress):
        if progress.stage == "encoding" and progress.done == 2:
            job.cancel()

    job = logic.startPrediction([volume], "b.safetensors", fakePlugins, onProgress=onProgress)
    assert job.wait(60)
    assert job.result.status == "cancelled" and job.result.exitCode == ExitCode.CANCELLED
    with open(pidsFile) as file:
        pids = json.load(file)
    deadline = time.monotonic() + 10
    while not all(pidGone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(pidGone(pid) for pid in pids), pids
    assert sceneContext.nodeCount() == before
    assert os.listdir(tempRoot) == []


def test_batch_goes_on_past_a_bad_case(sceneContext, fakePlugins, fakeLogic, tmp_path, tempRoot):
    logic = fakeLogic("ok")
    folder = tmp_path / "worklist"
    folder.mkdir()
    writeObliqueVolume(folder / "a.nii.gz", seed=1)
    (folder / "b.nii.gz").write_bytes(b"not an image")
    writeObliqueVolume(folder / "c.nrrd", seed=2)
    cases = logic.batchCasesFromFolder(str(folder))
    assert [os.path.basename(c) for c in cases] == ["a.nii.gz", "b.nii.gz", "c.nrrd"]
    loaded = sceneContext.loadVolume(folder / "a.nii.gz", "loaded")
    done = []
    results = logic.runBatch([loaded, *cases], "b.safetensors", fakePlugins[:1], onCaseDone=done.append, timeout=120)
    assert [r.status for r in results] == ["ok", "ok", "failed", "ok"]
    assert [r.name for r in results] == ["loaded", "a", "b", "c"]
    assert done == results
    assert "b.nii.gz" in results[2].message and "\n" not in results[2].message  # the backend's one line, naming the file
    for result in (results[1], results[3]):  # files were loaded into the scene with their geometry
        inputNode = result.outputs.inputNode
        np.testing.assert_array_equal(ijkToRas(result.outputs.heatmapNodes[0]), ijkToRas(inputNode))
    assert os.listdir(tempRoot) == []


def test_heatmap_voxels_equal_backend_file(sceneContext, obliqueVolumePath, fakePlugins, tmp_path):
    """Import a record directly (files kept) and compare the node's voxels with SimpleITK's reading of the file."""
    volume = sceneContext.loadVolume(obliqueVolumePath)
    heatmapPath = str(tmp_path / "h.nrrd")
    image = sitk.ReadImage(obliqueVolumePath)
    heat = sitk.GetArrayFromImage(image).astype(np.float32)
    heat = (heat - heat.min()) / (heat.max() - heat.min())
    written = sitk.GetImageFromArray(heat)
    written.CopyInformation(image)
    sitk.WriteImage(written, heatmapPath)
    logic = AnyMC3DSlicerLogic(sceneContext.scene, runner=object(), backendCommand=["x"],
                               volumesLogic=sceneContext.volumesLogic, volumeRenderingLogic=sceneContext.volumeRenderingLogic)
    numSlices = heat.shape[0]
    record = {"image": obliqueVolumePath, "status": "ok", "error": None, "slicing_axis": 2, "num_slices": numSlices,
              "results": [{"plugin": "p", "plugin_path": "p.anymc3d", "task": "multiclass", "labels": ["a", "b"],
                           "probabilities": {"a": 0.3, "b": 0.7}, "probabilities_raw": {"a": 0.4, "b": 0.6},
                           "thresholds": {"a": 0.5, "b": 0.5}, "decisions": {"a": False, "b": True},
                           "slice_importance": [1.0 / numSlices] * numSlices, "heatmap_method": "attention",
                           "heatmap": heatmapPath, "finding_heatmaps": {}}]}
    outputs = logic.importResults(record, [volume])
    np.testing.assert_array_equal(out.arrayFromVolumeNode(outputs.heatmapNodes[0]), sitk.GetArrayFromImage(sitk.ReadImage(heatmapPath)))

    # A heatmap with another geometry is refused, and nothing is left behind
    before = sceneContext.nodeCount()
    written.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(written, heatmapPath)
    with pytest.raises(ValueError, match="geometry"):
        logic.importResults(record, [volume])
    assert sceneContext.nodeCount() == before


def test_scene_saves_and_reloads_with_display(sceneContext, obliqueVolumePath, fakePlugins, fakeLogic, tmp_path):
    logic = fakeLogic("ok")
    volume = sceneContext.loadVolume(obliqueVolumePath, "Oblique")
    result = logic.runPrediction([volume], "b.safetensors", fakePlugins, timeout=60)
    assert result.status == "ok", result.message
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert sceneContext.appLogic.SaveSceneToSlicerDataBundleDirectory(str(bundle), None)
    saved = sorted(os.listdir(bundle / "Data"))
    assert "Oblique demo_findings heatmap.nrrd" in saved
    assert any(name.endswith(".tsv") and "findings" in name for name in saved)

    from .slicer_testing import SceneContext

    reloaded = SceneContext()
    reloaded.scene.SetURL(str(bundle / "bundle.mrml"))
    assert reloaded.scene.Connect()
    tables = [t for t in out.nodesByClass(reloaded.scene, "vtkMRMLTableNode") if t.GetAttribute(out.ROLE_ATTRIBUTE) == "findings"]
    assert len(tables) == 1
    table = tables[0]
    assert table.GetNumberOfRows() == 6 and table.GetCellText(3, 1) == "nodule"
    heatmap = table.GetNthNodeReference(out.HEATMAP_REFERENCE, 0)
    assert heatmap.GetName() == "Oblique demo_findings heatmap"
    np.testing.assert_allclose(ijkToRas(heatmap), ijkToRas(result.outputs.heatmapNodes[0]), atol=1e-6)
    assert heatmap.GetDisplayNode().GetColorNode().GetName() == out.COLOR_TABLE_NAME
    vr = reloaded.volumeRenderingLogic.GetFirstVolumeRenderingDisplayNode(heatmap)
    assert vr is not None and not vr.GetVisibility()  # the most probable finding (row 3, second plugin) is shown
    shown = reloaded.volumeRenderingLogic.GetFirstVolumeRenderingDisplayNode(table.GetNthNodeReference(out.HEATMAP_REFERENCE, 3))
    assert shown.GetVisibility()
    assert vr.GetVolumePropertyNode().GetVolumeProperty().GetScalarOpacity().GetValue(1.0) == pytest.approx(out.MAX_VOLUME_RENDERING_OPACITY)
    assert reloaded.volumeRenderingLogic is not None
    ras = AnyMC3DSlicerLogic.mostImportantSliceRAS(table, 0)
    assert ras == pytest.approx(logic.mostImportantSliceRAS(result.outputs.tableNode, 0))


def test_multi_view_inputs_are_joined_and_outputs_follow_the_first_view(sceneContext, fakePlugins, fakeRunnerClass, tmp_path, tempRoot):
    first = sceneContext.loadVolume(writeObliqueVolume(tmp_path / "sag.nii.gz", seed=3), "Sagittal")
    second = sceneContext.loadVolume(writeObliqueVolume(tmp_path / "cor.nii.gz", size=(8, 12, 10), seed=4), "Coronal")
    runner = fakeRunnerClass(lambda command: ([], 2))
    logic = AnyMC3DSlicerLogic(sceneContext.scene, runner=runner, backendCommand=["anymc3d"], tempRoot=tempRoot,
                               volumesLogic=sceneContext.volumesLogic, volumeRenderingLogic=sceneContext.volumeRenderingLogic)
    result = logic.runPrediction([first, second], "b.safetensors", fakePlugins[:1], timeout=10)
    image = runner.commands[0][2]
    views = image.split("+")
    assert [os.path.basename(v) for v in views] == ["view0_Sagittal.nrrd", "view1_Coronal.nrrd"]
    assert result.status == "failed" and result.message == "The backend exited with code 2"
    assert os.listdir(tempRoot) == []

    fakeLogicRun = AnyMC3DSlicerLogic(sceneContext.scene, backendCommand=[sys.executable, FAKE_BACKEND], tempRoot=tempRoot,
                                      volumesLogic=sceneContext.volumesLogic, volumeRenderingLogic=sceneContext.volumeRenderingLogic)
    result = fakeLogicRun.runPrediction([first, second], "b.safetensors", fakePlugins[:1], timeout=60)
    assert result.status == "ok", result.message
    assert result.outputs.inputNode is first
    np.testing.assert_array_equal(ijkToRas(result.outputs.heatmapNodes[0]), ijkToRas(first))

"""The module's prediction job imports with the review's read-ahead: the table and the first-shown heatmap at once,
the other heatmaps read in threads and filled in on the event loop, the run's folder kept until they are in. On
a real slicer-core scene with the fake backend (three findings, one heatmap each)."""

import os
import threading

import numpy as np
from AnyMC3DSlicerLogic import PredictionOptions
from AnyMC3DSlicerLogic import outputs as out


def test_table_and_first_heatmap_before_the_other_files_are_read(sceneContext, obliqueVolumePath, fakePlugins, fakeLogic,
                                                                  monkeypatch):
    logic = fakeLogic("ok")
    scheduled = []
    logic.readAhead = True
    logic.schedule = lambda milliseconds, callback: scheduled.append(callback)
    gate, reads = threading.Event(), []
    realRead = out.readVolumeFile

    def gatedRead(path, *args, **kwargs):
        reads.append((str(path), threading.current_thread() is threading.main_thread()))
        if threading.current_thread() is not threading.main_thread():
            gate.wait(20)  # the other files: read only once the test lets them
        return realRead(path, *args, **kwargs)

    monkeypatch.setattr(out, "readVolumeFile", gatedRead)
    volume = sceneContext.loadVolume(obliqueVolumePath)
    seen = {}

    def onFinished(result):
        heatmaps = result.outputs.heatmapNodes
        seen["pending"] = [out.pendingHeatmapFile(node) is not None for node in heatmaps]
        seen["shown"] = logic.heatmapNodeForRow(result.outputs.tableNode, int(result.outputs.tableNode.GetAttribute(out.SHOWN_ROW_ATTRIBUTE)))
        seen["rows"] = result.outputs.tableNode.GetNumberOfRows()
        seen["gateClosed"] = not gate.is_set()
        seen["tempDirKept"] = os.path.isdir(job.tempDir)

    job = logic.startPrediction([volume], "b.safetensors", fakePlugins[:1], PredictionOptions(heatmapMethod="grad_last"),
                                onFinished=onFinished)
    while job.result is None:
        logic.runner.processEvents(0.05)
    assert seen["rows"] == 3 and seen["gateClosed"] and seen["tempDirKept"]
    assert sorted(seen["pending"]) == [False, True, True]  # only the shown one has its voxels
    assert out.pendingHeatmapFile(seen["shown"]) is None
    assert sorted(onMain for _, onMain in reads) == [False, False, True]  # the first on the event loop, two in threads
    assert not job.done and scheduled  # polling goes on through the event loop's timer

    gate.set()
    for _ in range(400):
        if job.done:
            break
        callbacks, scheduled[:] = list(scheduled), []
        for callback in callbacks:
            callback()
        threading.Event().wait(0.05)
    assert job.done and not os.path.exists(job.tempDir)
    assert job.heatmapErrors == {}
    for node in job.result.outputs.heatmapNodes:
        assert out.pendingHeatmapFile(node) is None
        voxels = out.arrayFromVolumeNode(node)
        assert voxels.shape == tuple(reversed(volume.GetImageData().GetDimensions()))
        assert float(voxels.max()) > 0


def test_wait_fills_every_heatmap_read_ahead(sceneContext, obliqueVolumePath, fakePlugins, fakeLogic):
    """Without a timer (scripts, the self-test), ``job.wait`` delivers them; voxels equal those of a plain import."""
    logic = fakeLogic("ok")
    logic.readAhead = True
    volume = sceneContext.loadVolume(obliqueVolumePath)
    result = logic.runPrediction([volume], "b.safetensors", fakePlugins[:1], PredictionOptions(heatmapMethod="grad_last"), timeout=60)
    assert result.status == "ok", result.message
    assert all(out.pendingHeatmapFile(node) is None for node in result.outputs.heatmapNodes)
    logic.readAhead = False
    plain = logic.runPrediction([volume], "b.safetensors", fakePlugins[:1], PredictionOptions(heatmapMethod="grad_last"), timeout=60)
    for ahead, reference in zip(result.outputs.heatmapNodes, plain.outputs.heatmapNodes):
        np.testing.assert_array_equal(out.arrayFromVolumeNode(ahead), out.arrayFromVolumeNode(reference))


def test_scene_closed_while_heatmaps_are_read(sceneContext, obliqueVolumePath, fakePlugins, fakeLogic):
    """The scene is closed before the other heatmaps are in: they are dropped quietly and the run folder still goes."""
    logic = fakeLogic("ok")
    logic.readAhead = True
    volume = sceneContext.loadVolume(obliqueVolumePath)
    job = logic.startPrediction([volume], "b.safetensors", fakePlugins[:1], PredictionOptions(heatmapMethod="grad_last"))
    while job.result is None:
        logic.runner.processEvents(0.05)
    pending = [node for node in job.result.outputs.heatmapNodes if out.pendingHeatmapFile(node) is not None]
    assert pending and job.heatmapReads
    sceneContext.scene.Clear(0)
    assert job.wait(60)
    assert not os.path.exists(job.tempDir) and job.heatmapErrors == {}
    assert all(out.pendingHeatmapFile(node) is not None for node in pending)  # never filled after the close

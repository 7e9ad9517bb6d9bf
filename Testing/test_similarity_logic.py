"""Seed-point similarity from a Markups point, on a real slicer-core scene.

RAS -> IJK is checked against SimpleITK's own index -> physical point mapping (LPS, flipped to RAS), independent of
Slicer's matrices. The map comes from the REAL backend process (``python -m anymc3d similarity``) on the demo's
load-bearing backbone; the volume's in-plane size equals the token grid (8 x 8 at input size 112, patch 14) and its
slice count the lifted depth, so the token grid is the voxel grid: the seed voxel is the only voxel at cosine 1,
which fails if i, j, k were permuted or flipped anywhere between the point and the map.
"""

import json
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk
from AnyMC3DSlicerLogic import (
    AnyMC3DSlicerLogic,
    SimilarityOptions,
    SimilarityPointController,
    SimilaritySession,
    SubprocessRunner,
)
from AnyMC3DSlicerLogic import outputs as out
from AnyMC3DSlicerLogic.similarity import KIND_ATTRIBUTE, rasToIjk

from .slicer_testing import BACKEND_PATH, FakeRunner, writeObliqueVolume

pytest.importorskip("anymc3d.cli", reason="the anymc3d backend CLI is not importable")

SIZE = (8, 8, 6)  # (I, J, K): K has the 3 mm spacing, so it is the slicing axis


def sitkRas(image, ijk):
    """RAS of voxel ``ijk`` by SimpleITK (LPS physical point, x and y negated)."""
    x, y, z = image.TransformIndexToPhysicalPoint(tuple(int(v) for v in ijk))
    return (-x, -y, z)


def logicOn(sceneContext, tempRoot, runner):
    return AnyMC3DSlicerLogic(sceneContext.scene, runner=runner, backendCommand=[sys.executable, "-m", "anymc3d"],
                              backendPath=BACKEND_PATH, volumesLogic=sceneContext.volumesLogic,
                              volumeRenderingLogic=sceneContext.volumeRenderingLogic, tempRoot=tempRoot)


@pytest.fixture
def volumePath(tmp_path):
    return writeObliqueVolume(tmp_path / "oblique.nii.gz", size=SIZE)


@pytest.fixture
def session(sceneContext, tempRoot, demo):
    logic = logicOn(sceneContext, tempRoot, SubprocessRunner())
    session = SimilaritySession(logic, demo["backbone"], SimilarityOptions(device="cpu", inputSize=112, opacity=0.4))
    yield session
    session.cleanup()


def similarityNodes(scene):
    collection = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    return [n for n in nodes if n.GetAttribute(KIND_ATTRIBUTE) == "similarity"]


def test_ras_to_ijk_on_an_oblique_volume_and_through_a_transform(sceneContext, volumePath):
    volume = sceneContext.loadVolume(volumePath, "Oblique")
    image = sitk.ReadImage(volumePath)
    rng = np.random.default_rng(0)
    for _ in range(20):
        ijk = tuple(int(rng.integers(n)) for n in SIZE)
        assert rasToIjk(volume, sitkRas(image, ijk)) == ijk
    # Off-centre points round to the nearest voxel: +0.4 voxel along i (the direction's first column, spacing 0.7).
    base = np.array(sitkRas(image, (3, 4, 2)))
    step = np.array(sitkRas(image, (4, 4, 2))) - base
    assert rasToIjk(volume, base + 0.4 * step) == (3, 4, 2)
    assert rasToIjk(volume, base + 0.6 * step) == (4, 4, 2)
    # Under a parent transform, world points are taken back through it.
    transformNode = sceneContext.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 15.0)
    shift.SetElement(2, 3, -7.0)
    transformNode.SetMatrixTransformToParent(shift)
    volume.SetAndObserveTransformNodeID(transformNode.GetID())
    assert rasToIjk(volume, base + np.array([15.0, 0.0, -7.0])) == (3, 4, 2)
    with pytest.raises(ValueError, match="outside Oblique") as error:
        rasToIjk(volume, base + 1000.0)
    assert "\n" not in str(error.value)


# radon cc 23: one scenario's assertions in order (geometry, seed, maximum, cache)
@pytest.mark.slow
def test_point_map_geometry_seed_maximum_and_feature_cache(sceneContext, session, volumePath):
    volume = sceneContext.loadVolume(volumePath, "Oblique")
    image = sitk.ReadImage(volumePath)
    composite = sceneContext.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")  # a slice view's
    results = []

    first = session.request(volume, sitkRas(image, (2, 5, 3)), results.append)
    assert not first.done  # event-driven: the call returned while the backend runs
    assert first.wait(300)
    assert first.result.status == "ok", first.result.message
    assert results == [first.result] and first.result.cacheHit is False
    node = first.result.node
    assert node.GetImageData().GetDimensions() == SIZE
    np.testing.assert_allclose(out.matrixToArray(out.ijkToRasMatrix(node)), out.matrixToArray(out.ijkToRasMatrix(volume)),
                               atol=1e-6)
    voxels = out.arrayFromVolumeNode(node).copy()  # (K, J, I)
    assert np.unravel_index(int(np.argmax(voxels)), voxels.shape) == (3, 5, 2)
    assert voxels[3, 5, 2] == pytest.approx(1.0, abs=1e-5)
    assert np.sum(voxels > 1.0 - 1e-5) == 1 and voxels.min() < 0.99  # one seed voxel, not a flat map
    display = node.GetDisplayNode()
    assert display.GetColorNode().GetName() == out.COLOR_TABLE_NAME
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
    assert composite.GetForegroundVolumeID() == node.GetID() and composite.GetBackgroundVolumeID() == volume.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.4)

    cache = session.cacheFolder(volume)
    tokens = os.path.join(cache, "patch_tokens.npy")
    stamp = os.stat(tokens).st_mtime_ns
    with open(os.path.join(cache, "features.json")) as file:
        assert json.load(file)["cache_key"]["preprocess"]["input_size"] == 112
    nodesAfterFirst = sceneContext.nodeCount()

    second = session.request(volume, sitkRas(image, (6, 1, 0)))
    assert second.wait(300) and second.result.status == "ok", second.result.message
    assert second.result.cacheHit is True and os.stat(tokens).st_mtime_ns == stamp  # features not recomputed
    voxels = out.arrayFromVolumeNode(second.result.node)
    assert np.unravel_index(int(np.argmax(voxels)), voxels.shape) == (0, 1, 6)
    assert voxels[0, 1, 6] == pytest.approx(1.0, abs=1e-5)
    assert similarityNodes(sceneContext.scene) == [second.result.node]  # the previous map was replaced
    assert sceneContext.nodeCount() == nodesAfterFirst  # with its display and storage nodes
    assert composite.GetForegroundVolumeID() == second.result.node.GetID()
    assert os.listdir(os.path.join(session.tempDir, "maps")) == []  # map files go once imported

    # The voxels change: the volume is written again and the backend recomputes (the image's SHA-256 changed).
    out.arrayFromVolumeNode(volume)[:] *= -1.0
    volume.GetImageData().Modified()
    third = session.request(volume, sitkRas(image, (6, 1, 0)))
    assert third.wait(300) and third.result.status == "ok" and third.result.cacheHit is False


def test_outside_point_is_one_line_and_adds_nothing(sceneContext, session, volumePath):
    volume = sceneContext.loadVolume(volumePath, "Oblique")
    before = sceneContext.nodeCount()
    job = session.request(volume, (1e4, 0.0, 0.0))
    assert job.done and job.result.status == "failed"
    assert "outside Oblique" in job.result.message and "\n" not in job.result.message
    assert not session.logic.runner.isRunning() and sceneContext.nodeCount() == before


def test_newer_point_cancels_the_running_job_and_cleanup_removes_the_folder(sceneContext, session, volumePath, tempRoot):
    volume = sceneContext.loadVolume(volumePath, "Oblique")
    image = sitk.ReadImage(volumePath)
    older = session.request(volume, sitkRas(image, (1, 1, 1)))
    pid = session.logic.runner.pid
    newer = session.request(volume, sitkRas(image, (4, 6, 2)))
    assert newer.wait(300)
    assert older.result.status == "cancelled" and newer.result.status == "ok", newer.result.message
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert similarityNodes(sceneContext.scene) == [newer.result.node]
    assert os.listdir(tempRoot) == [os.path.basename(session.tempDir)]
    session.cleanup()
    assert os.listdir(tempRoot) == []


def test_controller_debounces_markups_events_and_ignores_preview_points(sceneContext, tempRoot, volumePath, tmp_path):
    """Real Markups events, a fake runner writing a map with the input's geometry, a manual timer."""
    volume = sceneContext.loadVolume(volumePath, "Oblique")
    image = sitk.ReadImage(volumePath)

    def backend(command):
        seed = command[command.index("--seed") + 1]
        target = command[command.index("--out") + 1]
        source = sitk.ReadImage(command[command.index("similarity") + 1])
        sitk.WriteImage(sitk.Cast(source * 0, sitk.sitkFloat32), target)
        return [json.dumps({"out": [target], "seeds": [seed], "features_cache": "hit"})], 0

    runner = FakeRunner(backend)
    session = SimilaritySession(logicOn(sceneContext, tempRoot, runner), "")
    assert os.listdir(tempRoot) == []  # no folder until a map is asked for
    backbone = {"path": str(tmp_path / "missing.safetensors")}
    timers, statuses = [], []
    controller = SimilarityPointController(session, lambda: volume, lambda ms, callback: timers.append(callback),
                                           onStatus=statuses.append,
                                           configure=lambda s: setattr(s, "backbonePath", backbone["path"]))
    markups = sceneContext.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    controller.setMarkupsNode(markups)

    markups.AddControlPoint(vtk.vtkVector3d(*sitkRas(image, (1, 2, 3))))
    timers.pop()()
    assert runner.commands == [] and statuses[-1].startswith("Select the backbone weights file first")
    (tmp_path / "backbone.safetensors").write_bytes(b"weights")  # the fake backend never reads it
    backbone["path"] = str(tmp_path / "backbone.safetensors")
    markups.RemoveAllControlPoints()
    timers.clear()

    markups.AddControlPoint(vtk.vtkVector3d(*sitkRas(image, (0, 0, 0))))
    markups.SetNthControlPointPositionWorld(0, *sitkRas(image, (2, 3, 1)))
    markups.SetNthControlPointPositionWorld(0, *sitkRas(image, (5, 6, 4)))  # a drag: three events
    assert len(timers) >= 3
    for callback in timers:
        callback()
    assert len(runner.commands) == 1  # one job for the burst, for the last position
    command = runner.commands[0]
    assert command[command.index("--seed") + 1] == "5,6,4"
    assert "--features-cache" in command
    runner.processEvents()
    assert controller.lastJob.result.status == "ok"
    assert statuses[-1] == "Similarity map of voxel (5, 6, 4) (cached features)"

    timers.clear()
    markups.AddControlPoint(vtk.vtkVector3d(*sitkRas(image, (7, 7, 5))))
    # Being placed: the point follows the mouse with status "preview" (what Slicer's placement widget sets).
    markups.SetNthControlPointPositionWorld(1, *sitkRas(image, (7, 6, 5)), markups.PositionPreview)
    for callback in timers:
        callback()
    assert len(runner.commands) == 1  # a preview point starts nothing
    markups.SetNthControlPointPositionWorld(1, *sitkRas(image, (7, 6, 5)))  # the click: position defined
    timers[-1]()
    command = runner.commands[-1]
    assert len(runner.commands) == 2 and command[command.index("--seed") + 1] == "7,6,5"
    runner.processEvents()
    assert len(similarityNodes(sceneContext.scene)) == 1
    controller.setMarkupsNode(None)
    timers.clear()
    markups.SetNthControlPointPositionWorld(0, *sitkRas(image, (1, 1, 1)))
    assert timers == []  # no longer observed
    assert os.listdir(tempRoot) == [os.path.basename(session.tempDir)]
    session.cleanup()
    assert os.listdir(tempRoot) == []


def test_persistent_place_mode_preview_point_does_not_drop_the_placed_points_job(sceneContext, tempRoot, volumePath, tmp_path):
    """Persistent place mode, as Slicer's vtkSlicerMarkupsWidget::UpdatePreviewPoint runs it (v5.10.0): the click
    defines point N, then at once a new point N+1 is added with status "preview" and follows the mouse, each move a
    PointModifiedEvent with its index. The placed point's job must start; the preview point starts nothing."""
    volume = sceneContext.loadVolume(volumePath, "Oblique")
    image = sitk.ReadImage(volumePath)

    def backend(command):
        target = command[command.index("--out") + 1]
        source = sitk.ReadImage(command[command.index("similarity") + 1])
        sitk.WriteImage(sitk.Cast(source * 0, sitk.sitkFloat32), target)
        return [json.dumps({"out": [target], "seeds": [command[command.index("--seed") + 1]], "features_cache": "miss"})], 0

    runner = FakeRunner(backend)
    session = SimilaritySession(logicOn(sceneContext, tempRoot, runner), "")
    (tmp_path / "backbone.safetensors").write_bytes(b"weights")
    timers = []
    controller = SimilarityPointController(session, lambda: volume, lambda ms, callback: timers.append(callback),
                                           configure=lambda s: setattr(s, "backbonePath", str(tmp_path / "backbone.safetensors")))
    markups = sceneContext.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    controller.setMarkupsNode(markups)

    markups.CreateDefaultDisplayNodes()
    placed = markups.AddControlPoint(vtk.vtkVector3d(*sitkRas(image, (3, 4, 2))))  # the click: position defined
    # What UpdatePreviewPoint does next, through the same display-node call: a new point, status "preview" ...
    mouse = slicer.vtkMRMLInteractionEventData()
    mouse.SetWorldPosition(list(sitkRas(image, (4, 4, 2))))
    identity = [1, 0, 0, 0, 1, 0, 0, 0, 1]
    display = markups.GetDisplayNode()
    preview = display.UpdateActiveControlPointWorld(markups.GetNumberOfControlPoints(), mouse, identity, None, None,
                                                    markups.PositionPreview)
    for ijk in ((5, 4, 2), (6, 5, 2), (7, 5, 3)):  # ... that follows the mouse
        mouse.SetWorldPosition(list(sitkRas(image, ijk)))
        display.UpdateActiveControlPointWorld(preview, mouse, identity, None, None, markups.PositionPreview)
    assert preview == placed + 1 and markups.GetNthControlPointPositionStatus(preview) == markups.PositionPreview
    assert markups.GetNthControlPointPositionStatus(placed) == markups.PositionDefined
    for callback in timers:
        callback()
    assert len(runner.commands) == 1, runner.commands
    command = runner.commands[0]
    assert command[command.index("--seed") + 1] == "3,4,2"  # the placed point, not the preview
    runner.processEvents()
    assert controller.lastJob.result.status == "ok"
    session.cleanup()

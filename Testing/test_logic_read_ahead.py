"""What a viewer reads off its event loop (outputs.readVolumeFile) and imports later: the automatic window from a
subsample (against the display node's own histogram), the image's value range, the no-copy buffer's lifetime, the
heatmap's 3D-view blocks, and pending heatmap nodes filled with the import's checks. On a real slicer-core scene."""

import gc

import numpy as np
import pytest
import SimpleITK as sitk
from AnyMC3DSlicerLogic import outputs as out


def realMri(path):
    """nilearn's MNI152 T1 template (a real brain MRI, 197x233x189, shipped inside the package) as a file."""
    datasets = pytest.importorskip("nilearn.datasets")
    datasets.load_mni152_template(resolution=1).to_filename(str(path))
    return str(path)


def ctWithMetal(path, size=(200, 180, 80)):
    """An int16 CT (HU) of more than AUTO_WINDOW_SAMPLES voxels with a few metal-bright and very dark voxels: the
    0.1 / 99.9 percentiles are then far from the minimum and maximum (a min-max window would fail here)."""
    from anymc3d.synthetic import make_ct_volume

    image = make_ct_volume(size=size, spacing=(0.8, 0.8, 2.0), lesion=True, seed=3)
    voxels = np.rint(sitk.GetArrayFromImage(image)).astype(np.int16)
    rng = np.random.default_rng(0)
    flat = voxels.reshape(-1)
    picks = rng.choice(flat.size, size=flat.size // 2000, replace=False)  # 0.05 %: above 99.9 % of the voxels
    flat[picks[: len(picks) // 2]] = 3000
    flat[picks[len(picks) // 2:]] = -3024
    result = sitk.GetImageFromArray(voxels)
    result.CopyInformation(image)
    sitk.WriteImage(result, str(path))
    return str(path)


def slicerAutoWindow(sceneContext, data, name):
    """The display node's own automatic window (vtkImageHistogramStatistics over every voxel)."""
    node = out.volumeNodeFromArray(data.voxels, data.ijkToRas, name)
    sceneContext.scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    assert display.GetAutoWindowLevel()
    return display.GetWindowLevelMin(), display.GetWindowLevelMax()


@pytest.mark.parametrize("kind", ["ct", "mri"])
def test_auto_window_of_a_subsample_is_slicers_automatic_window(sceneContext, tmp_path, kind):
    path = ctWithMetal(tmp_path / "ct.nii.gz") if kind == "ct" else realMri(tmp_path / "mni152.nii.gz")
    data = out.readVolumeFile(path, autoWindow=True)
    assert data.voxels.size > out.AUTO_WINDOW_SAMPLES  # the subsample is in use
    low, high = slicerAutoWindow(sceneContext, data, kind)
    span = float(data.voxels.max()) - float(data.voxels.min())
    assert data.windowRange == pytest.approx((low, high), abs=0.01 * span)
    if kind == "ct":  # the percentiles, not the extremes
        assert high < 2000 and low > -2000
    assert data.valueRange == (float(data.voxels.min()), float(data.voxels.max()))


def test_image_read_ahead_gets_its_window_without_a_histogram(sceneContext, fakeLogic, tmp_path):
    path = ctWithMetal(tmp_path / "ct.nii.gz", size=(64, 60, 20))
    data = out.readVolumeFile(path, autoWindow=True)
    node = fakeLogic("ok").loadInputFile(path, data)
    display = node.GetDisplayNode()
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx(data.windowRange, abs=1e-6)
    assert out.autoWindowOf(node) == pytest.approx(data.windowRange)
    assert out.valueRangeOf(node) == (-3024.0, 3000.0)
    reference = sceneContext.loadVolume(path, "reference")  # the volumes logic's node: same colours
    assert display.GetColorNodeID() == reference.GetDisplayNode().GetColorNodeID()
    assert out.valueRangeOf(reference) == (-3024.0, 3000.0)  # without the attribute: VTK's range


def test_read_voxels_outlive_the_read(tmp_path, obliqueVolumePath):
    """readVolumeFile wraps SimpleITK's buffer without a copy: a node made from it must stay valid after every other
    reference to the read is gone and the memory is reused."""
    expected = sitk.GetArrayFromImage(sitk.ReadImage(obliqueVolumePath))
    data = out.readVolumeFile(obliqueVolumePath)
    node = out.volumeNodeFromArray(data.voxels, data.ijkToRas, "kept")
    del data
    gc.collect()
    junk = [np.full(expected.size, 7.0, dtype=expected.dtype) for _ in range(64)]
    np.testing.assert_array_equal(out.arrayFromVolumeNode(node), expected)
    del junk


def test_blocks_read_ahead_make_the_same_3d_copy(sceneContext, fakeLogic, obliqueVolumePath, tmp_path):
    logic = fakeLogic("ok")
    volume = logic.loadInputFile(obliqueVolumePath)
    heatmapPath = str(tmp_path / "heatmap.nrrd")
    image = sitk.ReadImage(obliqueVolumePath)
    sitk.WriteImage(sitk.Cast(sitk.RescaleIntensity(image, 0.0, 1.0), sitk.sitkFloat32), heatmapPath)
    data = out.readVolumeFile(heatmapPath, blockMaxSize=4)
    assert data.blocks is not None and data.blocks[1] == (2, 3, 3)
    a = out.loadHeatmapVolume(sceneContext.scene, heatmapPath, volume, "a", data)
    b = out.loadHeatmapVolume(sceneContext.scene, heatmapPath, volume, "b")
    copies = [out.reducedVolumeRenderingCopy(a, 4, data.blocks), out.reducedVolumeRenderingCopy(b, 4),
              out.reducedVolumeRenderingCopy(b, 4, out.readVolumeFile(heatmapPath, blockMaxSize=3).blocks)]  # other size: ignored
    for copy in copies[1:]:
        np.testing.assert_array_equal(out.arrayFromVolumeNode(copy), out.arrayFromVolumeNode(copies[0]))
        np.testing.assert_array_equal(out.matrixToArray(out.ijkToRasMatrix(copy)), out.matrixToArray(out.ijkToRasMatrix(copies[0])))


def test_pending_heatmap_is_filled_with_the_loads_checks(sceneContext, fakeLogic, obliqueVolumePath, tmp_path):
    volume = fakeLogic("ok").loadInputFile(obliqueVolumePath)
    image = sitk.ReadImage(obliqueVolumePath)
    heatmapPath = str(tmp_path / "heatmap.nrrd")
    sitk.WriteImage(sitk.Cast(sitk.RescaleIntensity(image, 0.0, 1.0), sitk.sitkFloat32), heatmapPath)
    pending = out.pendingHeatmapVolume(sceneContext.scene, heatmapPath, volume, "pending")
    assert pending.GetImageData() is None and out.pendingHeatmapFile(pending) == heatmapPath
    np.testing.assert_array_equal(out.matrixToArray(out.ijkToRasMatrix(pending)), out.matrixToArray(out.ijkToRasMatrix(volume)))
    image.SetOrigin((0.0, 0.0, 0.0))
    movedPath = str(tmp_path / "moved.nrrd")
    sitk.WriteImage(image, movedPath)
    pending.SetAttribute(out.PENDING_FILE_ATTRIBUTE, movedPath)
    with pytest.raises(ValueError, match="moved.nrrd does not have the input's geometry"):
        out.fillHeatmapVolume(pending, volume, out.readVolumeFile(movedPath))
    assert pending.GetImageData() is None and out.pendingHeatmapFile(pending) == movedPath  # still waiting
    pending.SetAttribute(out.PENDING_FILE_ATTRIBUTE, heatmapPath)
    out.fillHeatmapVolume(pending, volume)  # read here (no data): the storage node's reader
    loaded = out.loadHeatmapVolume(sceneContext.scene, heatmapPath, volume, "loaded")
    np.testing.assert_array_equal(out.arrayFromVolumeNode(pending), out.arrayFromVolumeNode(loaded))
    assert out.pendingHeatmapFile(pending) is None
    with pytest.raises(ValueError, match="not waiting"):
        out.fillHeatmapVolume(pending, volume)

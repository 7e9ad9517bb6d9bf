"""The Logic's heatmap overlay as slicer-core's own slice pipeline (vtkMRMLSliceLogic) renders it: the heatmap is
added to the image, image + opacity x inferno((v - threshold) / (1 - threshold)), so nothing is added at or under
the threshold and no tissue is ever darkened (alpha blending replaced bright tissue with dark purple just above
the threshold). The expected pixels are the hand formula over the Logic's colour stops (outputs.heatmapColor)."""

import numpy as np
import pytest
import slicer
import vtk
from AnyMC3DSlicerLogic import outputs as out
from vtk.util import numpy_support

OPACITY = 0.5


def _uniformVolume(scene, name, value):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(16, 16, 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.full(16 * 16, value, np.float32), deep=True))
    node.SetAndObserveImageData(image)
    return node


def _setValue(node, value):
    numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())[:] = value
    node.GetImageData().Modified()
    node.Modified()


@pytest.fixture
def sliceView(sceneContext):
    """The application's scene (Testing/slicer_testing.SceneContext) with slicer-core's slice logic ("Red"), a grey
    image at 60 of [0, 200] and a heatmap shown as the Logic shows it; returns (scene, slice logic, image, heatmap,
    render) with render() -> the centre pixel's RGB."""
    scene = sceneContext.scene
    sliceLogic = slicer.vtkMRMLSliceLogic()
    sliceLogic.SetMRMLApplicationLogic(sceneContext.appLogic)
    sliceLogic.SetMRMLScene(scene)
    sliceLogic.AddSliceNode("Red")
    image = _uniformVolume(scene, "image", 60.0)
    display = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(0.0, 200.0)
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")  # the colour logic's grey table
    image.SetAndObserveDisplayNodeID(display.GetID())
    heatmap = _uniformVolume(scene, "heatmap", 0.0)
    out.setUpHeatmapDisplay(heatmap, out.heatmapColorTableNode(scene), 0.5)
    out.showHeatmapInSliceViews(scene, heatmap, image, OPACITY)
    sliceLogic.FitSliceToAll()

    def render():
        producer = sliceLogic.GetImageDataConnection().GetProducer()
        producer.Update()
        output = producer.GetOutputDataObject(0)
        width, height, _ = output.GetDimensions()
        pixels = numpy_support.vtk_to_numpy(output.GetPointData().GetScalars()).reshape(height, width, -1)
        return pixels[height // 2, width // 2, :3].astype(float)

    return scene, sliceLogic, image, heatmap, render


@pytest.mark.parametrize("threshold", [0.5, 0.2])
def test_the_slice_views_add_the_heatmap_from_black_at_the_threshold(sliceView, threshold):
    _, sliceLogic, _, heatmap, render = sliceView
    out.setHeatmapWindow(heatmap.GetDisplayNode(), threshold)  # what Logic.setHeatmapThreshold applies
    composite = sliceLogic.GetSliceCompositeNode()
    assert composite.GetCompositing() == slicer.vtkMRMLSliceCompositeNode.Add
    composite.SetForegroundOpacity(0.0)
    image = render()
    assert image[0] > 50  # the grey image is there (60 of [0, 200])
    composite.SetForegroundOpacity(OPACITY)
    black = np.array(out.heatmapColor(0.0)) * 255 * OPACITY  # inferno's first colour, nearly black
    for value in (0.0, threshold, threshold + 0.02, (threshold + 1) / 2, 1.0):
        _setValue(heatmap, value)
        expected = np.minimum(255, image + OPACITY * 255 * np.array(out.heatmapColor(max(0.0, (value - threshold) / (1 - threshold)))))
        seen = render()
        assert np.all(seen >= image), f"value {value}: the overlay darkened the image ({seen} < {image})"
        np.testing.assert_allclose(seen, expected, atol=2.0, err_msg=f"heatmap value {value}, threshold {threshold}")
        if value <= threshold:
            assert np.all(seen - image <= np.ceil(black) + 1), f"value {value} at/under the threshold added {seen - image}"


def test_opacity_zero_hides_the_overlay_and_keeps_add_compositing(sliceView):
    scene, sliceLogic, _, heatmap, render = sliceView
    _setValue(heatmap, 1.0)
    shown = render()
    out.setOverlayOpacity(scene, 0.0)
    hidden = render()
    assert np.all(shown - hidden > 50)  # the brightest colour added at half opacity, then nothing
    assert sliceLogic.GetSliceCompositeNode().GetCompositing() == slicer.vtkMRMLSliceCompositeNode.Add

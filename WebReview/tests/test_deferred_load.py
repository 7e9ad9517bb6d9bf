"""A case opened cold (server side, no browser): the image and the most probable finding's heatmap are read first and
shown, the other findings' heatmaps follow; the finished case equals one loaded whole, and a heatmap file that
breaks after the listing is named on its finding, not for the whole case."""

import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from .test_cases_and_cli import copy_case


@pytest.fixture
def session_on(monkeypatch):
    from anymc3d_review.session import VOLUME_RENDERING_MAX_SIZE_ENV, ReviewSession
    from trame_slicer.core import SlicerApp

    monkeypatch.setenv(VOLUME_RENDERING_MAX_SIZE_ENV, "16")  # the demo volumes are larger: 3D copies from blocks
    sessions = []

    def make(folder):
        app = SlicerApp()
        sessions.append(ReviewSession(app.scene, app.volumes_logic, app.app_logic.GetModuleLogic("VolumeRendering"), folder))
        return sessions[-1]

    yield make
    for session in sessions:
        session.close()


def shNodeParent(node):
    import slicer

    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    return shNode.GetItemParent(shNode.GetItemByDataNode(node))


def shown_row_label(result):
    """The finding an import shows first, computed here from the record: the most probable one (first on a tie)."""
    probabilities = [result["probabilities"][label] for label in result["labels"]]
    return result["labels"][int(np.argmax(probabilities))]


# radon cc 22: one page load followed stage by stage; each stage's assertions are branches
def test_cold_case_shows_its_first_finding_then_completes_like_a_whole_load(review_folder, session_on, monkeypatch):
    from anymc3d_review.cases import CaseFolder
    from AnyMC3DSlicerLogic import outputs

    monkeypatch.setattr(outputs, "AUTO_WINDOW_SAMPLES", 20_000)  # the demo volume is small: subsample it anyway
    folder = CaseFolder(review_folder)
    index = folder.index_of("volume.nii.gz")
    result = folder.case(index).record["results"][0]
    first = shown_row_label(result)
    deferred = session_on(folder)
    files = deferred.case_files(index, first=True)
    assert files == [str(folder.case(index).path), result["finding_heatmaps"][first]]

    loaded = deferred.show_case(index, deferred.read_case_files(index, first=True), defer=True)
    others = [result["finding_heatmaps"][label] for label in result["labels"] if label != first]
    assert loaded.pending_files() == others
    assert deferred.table_rows()[deferred.row]["finding"] == first
    for node in loaded.heatmap_nodes():
        waiting = outputs.pendingHeatmapFile(node) is not None
        assert (node.GetImageData() is None) == waiting
        assert bool(outputs.volumeRenderingDisplayNodes(node)) != waiting  # no 3D view until it has voxels
    display = loaded.input_node.GetDisplayNode()
    assert not display.GetAutoWindowLevel()  # the window came with the read, no histogram here

    for path in loaded.pending_files():
        assert deferred.complete_heatmap(index, path, deferred.read_file(path)) == ""
    assert loaded.pending_files() == []

    whole = session_on(CaseFolder(review_folder))
    reference = whole.show_case(index)  # read on the event loop, everything at once
    for row, label in enumerate(result["labels"]):
        deferred.select_finding(row)
        whole.select_finding(row)
        mine, theirs = deferred.shown_heatmap(), whole.shown_heatmap()
        expected = sitk.GetArrayFromImage(sitk.ReadImage(result["finding_heatmaps"][label]))
        np.testing.assert_array_equal(outputs.arrayFromVolumeNode(mine), expected)
        geometry = [outputs.matrixToArray(outputs.ijkToRasMatrix(node)) for node in (mine, loaded.input_node, theirs)]
        np.testing.assert_array_equal(geometry[0], geometry[1])  # exactly its image's
        np.testing.assert_allclose(geometry[0], geometry[2], rtol=0, atol=1e-9)  # SimpleITK's read: to rounding
        assert shNodeParent(mine.GetNodeReference(outputs.VOLUME_RENDERING_COPY_REFERENCE)) == loaded.folder_item
        copies = [h.GetNodeReference(outputs.VOLUME_RENDERING_COPY_REFERENCE) for h in (mine, theirs)]
        np.testing.assert_allclose(*[outputs.arrayFromVolumeNode(c) for c in copies], rtol=1e-6)
        visible = [[d.GetVisibility() for d in outputs.volumeRenderingDisplayNodes(h)] for h in loaded.heatmap_nodes()]
        assert visible == [[1] if n == row else [0] for n in range(len(result["labels"]))]
    # the automatic window of the subsample is the display node's own (whole volume), within 2 % of the range
    auto = reference.input_node.GetDisplayNode()
    voxels = outputs.arrayFromVolumeNode(reference.input_node)
    span = float(voxels.max() - voxels.min())
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx(
        (auto.GetWindowLevelMin(), auto.GetWindowLevelMax()), abs=0.02 * span)


def test_heatmap_that_breaks_after_the_listing_is_named_on_its_finding(review_folder, session_on, tmp_path):
    from anymc3d_review.cases import CaseFolder
    from AnyMC3DSlicerLogic import outputs

    folder = CaseFolder(copy_case(review_folder, tmp_path))
    index = folder.index_of("volume.nii.gz")
    result = folder.case(index).record["results"][0]
    session = session_on(folder)
    loaded = session.show_case(index, session.read_case_files(index, first=True), defer=True)
    broken = loaded.pending_files()[0]
    shutil.copy(review_folder / "second.nii.gz", broken)  # another image's size, after the case was listed
    assert session.read_file(broken) is not None
    error = session.complete_heatmap(index, broken, session.read_file(broken))
    assert "has size" in error and broken in error
    row = [result["finding_heatmaps"][label] for label in result["labels"]].index(broken)
    session.select_finding(row)
    assert session.heatmap_error() == error  # the page shows it for that finding
    assert outputs.pendingHeatmapFile(session.shown_heatmap()) == broken
    session.select_finding((row + 1) % len(result["labels"]))
    assert session.heatmap_error() == ""


def test_case_shown_before_its_first_heatmap_shows_it_when_it_is_in(review_folder, session_on):
    """The image alone first (the shown finding's heatmap still being read): the table shows that finding, whose
    node has no voxels and no 3D view; when it is filled, the 3D view shows it (and only it)."""
    from anymc3d_review.cases import CaseFolder
    from AnyMC3DSlicerLogic import outputs

    folder = CaseFolder(review_folder)
    index = folder.index_of("volume.nii.gz")
    result = folder.case(index).record["results"][0]
    session = session_on(folder)
    image = str(folder.case(index).path)
    loaded = session.show_case(index, {image: session.read_file(image, image=True)}, defer=True)
    shown = session.shown_heatmap()
    first = result["finding_heatmaps"][shown_row_label(result)]
    assert outputs.pendingHeatmapFile(shown) == first and first in loaded.pending_files()
    assert len(loaded.pending_files()) == len(result["labels"])
    table = loaded.table_node
    assert session.logic.heatmapNodeForRow(table, int(table.GetAttribute(outputs.SHOWN_ROW_ATTRIBUTE))) is shown
    assert shown.GetImageData() is None and outputs.volumeRenderingDisplayNodes(shown) == []
    assert session.heatmap_error() == ""  # loading, not failed
    assert session.jump_to_maximum() is None  # no maximum to jump to yet
    assert session.complete_heatmap(index, first, session.read_file(first)) == ""
    assert [d.GetVisibility() for d in outputs.volumeRenderingDisplayNodes(shown)] == [1]
    other = next(path for path in loaded.pending_files())
    assert session.complete_heatmap(index, other, session.read_file(other)) == ""  # another finding: hidden in 3D
    assert sum(d.GetVisibility() for h in loaded.heatmap_nodes() for d in outputs.volumeRenderingDisplayNodes(h)) == 1
    expected = sitk.GetArrayFromImage(sitk.ReadImage(first))
    np.testing.assert_array_equal(outputs.arrayFromVolumeNode(shown), expected)
    assert session.jump_to_maximum() is not None

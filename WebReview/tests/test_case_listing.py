"""The case list tells each case's truth (server side, no browser): DICOM series folders are cases (the backend's
expansion, one case per series), unreadable images and broken links are listed with their one-line error, a link to
a file of the folder is listed once, results files and records that cannot be used are named as problems, and a
DICOM series with results opens with its heatmap."""

import json
import os
import subprocess
import sys

import pytest
from anymc3d_review.cases import CaseFolder

from .test_cases_and_cli import copy_case
from .test_model_info import write_dicom_series


@pytest.fixture(scope="module")
def listing_folder(review_folder, demo_source, tmp_path_factory):
    from anymc3d.synthetic import make_ct_volume

    folder = copy_case(review_folder, tmp_path_factory.mktemp("listing"))
    write_dicom_series(folder / "series_ct", "CT")
    two = folder / "two"
    write_dicom_series(two / "a", "CT", make_ct_volume(size=(16, 16, 5), seed=1), series_uid="1.2.826.0.1.3680043.2.1125.8.1")
    write_dicom_series(two / "b", "CT", make_ct_volume(size=(16, 16, 4), seed=2), series_uid="1.2.826.0.1.3680043.2.1125.8.2")
    for part in ("a", "b"):  # one folder holding both series
        for file in (two / part).iterdir():
            file.rename(two / f"{part}{file.name}")
        (two / part).rmdir()
    (folder / "broken.nii.gz").write_bytes(b"this is no image")
    os.symlink(folder / "nowhere.nii.gz", folder / "gone.nii.gz")
    os.symlink(folder / "volume.nii.gz", folder / "alias.nii.gz")
    (folder / "results" / "odd.json").write_text(json.dumps([{"foo": 1}]))
    (folder / "results" / "elsewhere.json").write_text(json.dumps(
        [{"image": "/nowhere/x.nii.gz", "status": "error", "error": "x", "slicing_axis": None, "num_slices": None,
          "results": []}]))
    done = subprocess.run([sys.executable, "-m", "anymc3d", "predict", str(folder / "series_ct"),
                           "--backbone", str(demo_source / "backbone.safetensors"),
                           "--plugin", str(review_folder / "plugin.anymc3d"), "--heatmap-method", "grad_rollout",
                           "--heatmap", str(folder / "results" / "heatmaps"),
                           "--json", str(folder / "results" / "series.json"), "--progress", "none", "--device", "cpu"],
                          capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def test_every_case_is_listed_once_with_its_true_status(listing_folder):
    listing = CaseFolder(listing_folder)
    by_name = {case.name: case for case in listing.cases}
    assert sorted(by_name) == ["broken.nii.gz", "gone.nii.gz", "series_ct", "two [two_s1]", "two [two_s2]",
                               "volume.nii.gz"]  # alias.nii.gz is volume.nii.gz: listed once
    assert by_name["volume.nii.gz"].status == "results"
    assert by_name["series_ct"].status == "results" and by_name["series_ct"].is_dicom
    assert by_name["two [two_s1]"].status == by_name["two [two_s2]"].status == "none"
    assert by_name["two [two_s1]"].series != by_name["two [two_s2]"].series
    for name, words in (("broken.nii.gz", "not a readable image file"), ("gone.nii.gz", "dangling symbolic link")):
        case = by_name[name]
        assert case.status == "error" and name in case.unreadable and words in case.unreadable, case.unreadable
        assert "\n" not in case.unreadable
    problems = " | ".join(listing.problems)
    assert "odd.json: record 0 is not a result record" in problems
    assert "elsewhere.json: results for /nowhere/x.nii.gz, which is not a case of this folder" in problems


def test_dicom_series_case_opens_with_its_heatmap_and_unreadable_case_says_why(listing_folder):
    import SimpleITK as sitk
    from anymc3d_review.cases import RecordError
    from anymc3d_review.session import ReviewSession
    from AnyMC3DSlicerLogic import outputs
    from trame_slicer.core import SlicerApp

    app = SlicerApp()
    listing = CaseFolder(listing_folder)
    session = ReviewSession(app.scene, app.volumes_logic, app.app_logic.GetModuleLogic("VolumeRendering"), listing)
    index = listing.index_of("series_ct")
    loaded = session.show_case(index)
    record = listing.case(index).record
    reference = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(listing_folder / "series_ct")))
    assert loaded.input_node.GetImageData().GetDimensions() == reference.GetSize()
    assert [row["finding"] for row in session.table_rows()] == record["results"][0]["labels"]
    heatmap = session.shown_heatmap()
    assert heatmap.GetImageData().GetDimensions() == reference.GetSize()
    label = record["results"][0]["labels"][session.row]
    expected = sitk.GetArrayFromImage(sitk.ReadImage(record["results"][0]["finding_heatmaps"][label]))
    assert abs(float(outputs.arrayFromVolumeNode(heatmap).max()) - float(expected.max())) < 1e-5
    with pytest.raises(RecordError, match="broken.nii.gz"):
        session.show_case(listing.index_of("broken.nii.gz"))
    assert "not a readable image file" in session.case_error(listing.index_of("broken.nii.gz"))
    session.show_case(listing.index_of("two [two_s2]"))  # the second series, without results: its own volume
    assert session.current.input_node.GetImageData().GetDimensions()[2] == 4
    session.close()

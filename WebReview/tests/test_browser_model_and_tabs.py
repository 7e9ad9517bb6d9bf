"""The review page in Chromium: model information beside the findings (untrained plugin flagged, modality warning for
a brain MRI under a CT plugin, plugin metadata shown as text), and what the page says about tabs is what happens.

Folder: the demo CT (``volume.nii.gz``, results of the untrained demo plugin, copied from the shared review folder)
and ``brain.nii.gz``, a real T1 brain MRI (nilearn's MNI152 template, downsampled), predicted with a copy of the demo
plugin that carries a training summary and a name with markup in it; ``series_mr``, a DICOM series (Modality MR)
without results, and ``broken.nii.gz``, no image at all.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from anymc3d_review.testing import ReviewServer, open_page, state, wait_frames, wait_state

from .test_model_info import SUMMARY, trained_copy, write_dicom_series

EVIL = '<img src=x onerror="window.__pwned=1">'


@pytest.fixture(scope="module")
def model_folder(review_folder, demo_source, tmp_path_factory):
    nilearn = pytest.importorskip("nilearn.datasets")
    folder = tmp_path_factory.mktemp("model")
    shutil.copy(review_folder / "volume.nii.gz", folder / "volume.nii.gz")
    plugin = shutil.copy(review_folder / "plugin.anymc3d", folder / "plugin.anymc3d")
    (folder / "results" / "heatmaps").mkdir(parents=True)
    records = json.loads((review_folder / "results" / "predictions.json").read_text(encoding="utf-8"))
    record = next(r for r in records if r["image"].endswith("/volume.nii.gz"))
    for result in record["results"]:
        for label, path in result["finding_heatmaps"].items():
            target = folder / "results" / "heatmaps" / os.path.basename(path)
            shutil.copy(path, target)
            result["finding_heatmaps"][label] = str(target)
        result["heatmap"] = result["finding_heatmaps"][result["labels"][0]] if result["heatmap"] else None
        result["plugin_path"] = str(plugin)
    record["image"] = str(folder / "volume.nii.gz")
    (folder / "results" / "volume.json").write_text(json.dumps([record]))

    mri = nilearn.load_mni152_template(resolution=2)
    voxels = np.asarray(mri.get_fdata(), dtype=np.float32)[::2, ::2, ::4] * 1000.0  # (x, y, z), about 50x59x24
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels.transpose(2, 1, 0)))
    image.SetSpacing((4.0, 4.0, 8.0))
    sitk.WriteImage(image, str(folder / "brain.nii.gz"))
    evil = trained_copy(demo_source / "plugin.anymc3d", folder / "chest.anymc3d", name="chest" + EVIL,
                        description="chest CT findings " + EVIL)
    done = subprocess.run([sys.executable, "-m", "anymc3d", "predict", str(folder / "brain.nii.gz"),
                           "--backbone", str(demo_source / "backbone.safetensors"), "--plugin", str(evil),
                           "--heatmap", str(folder / "results" / "heatmaps"), "--json", str(folder / "results" / "brain.json"),
                           "--progress", "none", "--device", "cpu"], capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    write_dicom_series(folder / "series_mr", "MR")
    (folder / "broken.nii.gz").write_bytes(b"this is no image")
    return folder


@pytest.fixture(scope="module")
def model_server(model_folder, tmp_path_factory):
    with ReviewServer(model_folder, log=tmp_path_factory.mktemp("logs") / "server.log") as srv:
        yield srv


@pytest.fixture
def model_page(browser, model_server):
    page = open_page(browser, model_server.url)
    wait_frames(page, 0, timeout=60)
    yield page
    page.close()


def show(page, name):
    index = next(c["index"] for c in state(page, "cases") if c["name"] == name)
    if state(page, "shown_case") != index:
        page.locator(".case-item", has_text=name).click()
        wait_state(page, f"s('shown_case') === {index} && s('model_info') && s('model_info').length > 0")
    if not state(page, "model_details"):  # the model's one line is always shown; the rest on demand
        page.locator(".model-more").click()
        wait_state(page, "s('model_details') === true")
    return index


def text(page, selector):
    return [t.strip() for t in page.locator(selector).all_inner_texts()]


def test_untrained_plugin_is_flagged_beside_its_findings(model_page):
    page = model_page
    show(page, "volume.nii.gz")
    assert text(page, ".model-name") == ["demo_findings"]
    assert page.locator(".untrained-warning").is_visible()
    assert "untrained: probabilities mean nothing" in page.locator(".untrained-warning").inner_text()
    assert page.locator(".untrained-findings").is_visible()  # again, right above the findings table
    assert text(page, ".model-modality") == ["intended modality: CT (stated in the plugin)"]
    assert text(page, ".model-body-part") == ["body part: synthetic phantom"]
    assert page.locator(".model-training").count() == 0
    assert page.locator(".modality-warning").count() == 0  # the demo CT is a CT in HU: no warning
    # the colour bar says what its 0-1 is
    assert page.locator(".colorbar-label").inner_text().strip() == \
        "heatmap relative to its case maximum (max = 1), not a probability"


def test_brain_mri_under_a_ct_plugin_is_warned_and_metadata_is_text(model_page):
    page = model_page
    show(page, "brain.nii.gz")
    warning = page.locator(".modality-warning")
    assert warning.count() == 1 and warning.is_visible()
    assert "meant for CT" in warning.inner_text() and "probably not a CT" in warning.inner_text()
    assert page.locator(".finding-row").count() > 0  # the findings are still shown, with the warning beside them
    # the trained copy: its training summary, no untrained flag
    assert page.locator(".untrained-warning").count() == 0 and page.locator(".untrained-findings").count() == 0
    training = " ".join(" ".join(text(page, ".model-training")).split())  # as rendered: runs of spaces collapse
    assert f"{SUMMARY['epochs_run']} epochs of at most {SUMMARY['epochs_max']}" in training  # the CLI's info lines
    assert f"validation AUROC {SUMMARY['best_val_auroc']:.3f}" in training
    # the markup in the plugin's name and description is shown as characters and never runs
    assert text(page, ".model-name") == ["chest" + EVIL]
    assert page.locator(".model-info img").count() == 0
    assert page.evaluate("() => window.__pwned") is None


def test_tabs_share_one_view_as_the_page_says(browser, model_server):
    """The toolbar says every open tab shows the same case: a case switch in one tab moves the other."""
    first, second = (open_page(browser, model_server.url) for _ in range(2))
    try:
        for page in (first, second):
            wait_frames(page, 0, timeout=60)
            caption = page.get_by_text("one shared view: every open tab shows the same case")
            assert caption.is_visible()
        target = show(first, "brain.nii.gz")
        wait_state(second, f"s('shown_case') === {target}")
        assert second.locator(".model-name").inner_text().strip() == "chest" + EVIL
        target = show(second, "volume.nii.gz")
        wait_state(first, f"s('shown_case') === {target}")
        assert first.locator(".model-name").inner_text().strip() == "demo_findings"
    finally:
        first.close()
        second.close()


def test_case_list_shows_dicom_series_and_unreadable_files(model_page):
    page = model_page
    names = [c["name"] for c in state(page, "cases")]
    assert names == ["brain.nii.gz", "broken.nii.gz", "series_mr", "volume.nii.gz"]
    broken = page.locator(".case-item", has_text="broken.nii.gz")
    assert broken.locator(".case-status").inner_text().strip() == "error"
    assert "not a readable image file" in broken.locator(".case-list-error").inner_text()
    assert page.locator(".case-list-error").count() == 1  # only the broken file
    index = names.index("series_mr")
    page.locator(".case-item", has_text="series_mr").click()
    wait_state(page, f"s('shown_case') === {index} && s('image_modality') && s('image_modality').startsWith('MRI')")
    assert page.locator(".image-modality").inner_text().strip() == "image modality: MRI (DICOM tag (0008,0060))"
    assert state(page, "case_error") == ""
    wait_frames(page, 0, ("Red",))
    from anymc3d_review.testing import settle, view_pixels

    settle(page, ("Red",))
    assert view_pixels(page, "Red").mean() > 10  # the series is drawn (grey, not black)


pytestmark = pytest.mark.slow  # a real server and browser: left out of the quick tier

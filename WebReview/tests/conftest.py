"""Fixtures of the review tests: a demo folder with results, review servers (stopped by the fixtures), Chromium.

The demo folder comes from ``python -m anymc3d demo`` (backbone, plugin, volume) plus a second volume, both
predicted with ``--heatmap-method grad_rollout`` (one heatmap per finding) into ``results/``, and a control case
without results.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from anymc3d_review.testing import ReviewServer, launch_browser, open_page, wait_frames

pytest.importorskip("slicer")


def run(command, **kwargs):
    completed = subprocess.run([str(c) for c in command], capture_output=True, text=True, encoding="utf-8", timeout=600, **kwargs)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory):
    """``anymc3d demo`` output: backbone.safetensors, plugin.anymc3d, volume.nii.gz."""
    folder = tmp_path_factory.mktemp("demo")
    run([sys.executable, "-m", "anymc3d", "demo", folder, "--no-train"])
    return folder


def write_volume(path, size, seed, lesion=True, spacing=(1.0, 1.0, 3.0)):
    import SimpleITK as sitk
    from anymc3d.synthetic import make_ct_volume

    sitk.WriteImage(make_ct_volume(size=size, spacing=spacing, lesion=lesion, seed=seed), str(path))
    return path


@pytest.fixture(scope="session")
def review_folder(demo_source, tmp_path_factory):
    """volume.nii.gz and second.nii.gz with grad_rollout results (one predict run), control.nii.gz without."""
    folder = tmp_path_factory.mktemp("review")
    for name in ("backbone.safetensors", "plugin.anymc3d", "volume.nii.gz"):
        shutil.copy(demo_source / name, folder / name)
    write_volume(folder / "second.nii.gz", (96, 80, 24), seed=7)
    write_volume(folder / "control.nii.gz", (64, 64, 16), seed=9, lesion=False)
    (folder / "results" / "heatmaps").mkdir(parents=True)
    run([sys.executable, "-m", "anymc3d", "predict", folder / "volume.nii.gz", folder / "second.nii.gz",
         "--backbone", folder / "backbone.safetensors", "--plugin", folder / "plugin.anymc3d",
         "--heatmap-method", "grad_rollout", "--heatmap", folder / "results" / "heatmaps",
         "--json", folder / "results" / "predictions.json", "--progress", "none", "--device", "cpu"])
    return folder


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists("/usr/bin/chromium") and not os.environ.get("ANYMC3D_CHROMIUM"):
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = launch_browser(playwright)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(review_folder, tmp_path_factory):
    """A review server over the demo folder (no runs: no --backbone/--plugin), stopped at the end of the module."""
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with ReviewServer(review_folder, log=log) as srv:
        yield srv


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server.url)
    wait_frames(page, 0, timeout=60)  # every view has a frame: the page is live
    yield page
    page.close()


@pytest.fixture
def results_json(review_folder):
    import json

    return json.loads((Path(review_folder) / "results" / "predictions.json").read_text(encoding="utf-8"))

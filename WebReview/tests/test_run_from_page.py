"""A case without results is run from the page (the Logic + the real backend process), with progress; a failing
case shows its error and the list goes on."""

import json
import shutil

import pytest

from anymc3d_review.testing import VIEWS, ReviewServer, heatmap_fraction, open_page, settle, state, view_pixels, wait_frames, wait_state

from .conftest import write_volume


@pytest.fixture(scope="module")
def run_folder(demo_source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    for name in ("backbone.safetensors", "plugin.anymc3d"):
        shutil.copy(demo_source / name, folder / name)
    write_volume(folder / "a_small.nii.gz", (48, 48, 12), seed=3)
    (folder / "b_broken.nii.gz").write_bytes(b"this is not a NIfTI file" * 10)
    return folder


@pytest.fixture(scope="module")
def run_server(run_folder, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "run-server.log"
    with ReviewServer(run_folder, "--backbone", run_folder / "backbone.safetensors", "--plugin",
                      run_folder / "plugin.anymc3d", "--device", "cpu", log=log) as srv:
        yield srv


@pytest.fixture
def run_page(browser, run_server):
    page = open_page(browser, run_server.url)
    wait_frames(page, 0, timeout=60)
    yield page
    page.close()


def test_run_case_from_page_writes_results_and_shows_them(run_page, run_folder):
    page = run_page
    assert state(page, "shown_case") == 0 and state(page, "cases")[0]["status"] == "none"
    assert heatmap_fraction(view_pixels(page, "Red")) < 0.002
    page.locator(".run-button").click()
    wait_state(page, "s('running') === true", timeout=20)
    assert page.locator(".run-progress").count() == 1
    progress_seen = set()
    while state(page, "running"):
        progress_seen.add(state(page, "run_progress"))
        page.wait_for_timeout(200)
    assert state(page, "run_message") == "Done", state(page, "run_message")
    assert len(progress_seen) >= 2, progress_seen  # the bar moved
    wait_state(page, "s('shown_case') === 0 && s('rows').length > 0")
    settle(page, VIEWS, quiet=1.0)
    # results written in the folder's convention, and shown
    results = json.loads((run_folder / "results" / "a_small.json").read_text())
    assert results[0]["status"] == "ok" and results[0]["image"] == str(run_folder / "a_small.nii.gz")
    heatmap = results[0]["results"][0]["heatmap"]
    assert heatmap.startswith(str(run_folder / "results" / "heatmaps")) and (run_folder / "results" / "heatmaps").is_dir()
    texts = [t.strip() for t in page.locator("td.finding-probability").all_inner_texts()]
    probabilities = results[0]["results"][0]["probabilities"]
    assert texts == [f"{probabilities[label]:.4f}" for label in results[0]["results"][0]["labels"]]
    assert state(page, "cases")[0]["status"] == "results"
    assert heatmap_fraction(view_pixels(page, "Red")) > 0.02


def test_failing_case_shows_error_and_list_goes_on(run_page):
    page = run_page
    cases = state(page, "cases")
    broken = next(c["index"] for c in cases if c["name"] == "b_broken.nii.gz")
    page.locator(".case-item", has_text="b_broken.nii.gz").click()
    wait_state(page, f"s('case_index') === {broken} && !s('loading') && s('case_error') !== ''")
    assert page.locator(".case-error").is_visible()
    # the other case still opens
    page.locator(".case-item", has_text="a_small.nii.gz").click()
    wait_state(page, "s('shown_case') === 0 && s('case_error') === ''")

"""A click on a slice view in similarity mode shows the PlaneCycle seed-point similarity map of the clicked voxel
(issue 16 item 6, web part): computed in the background by the Logic's SimilaritySession while the page stays live,
the run state said on the page."""

import shutil

import pytest
from anymc3d_review.testing import (
    ReviewServer,
    heatmap_fraction,
    now,
    open_page,
    settle,
    state,
    view_box,
    view_pixels,
    wait_frames,
    wait_state,
)

from .conftest import write_volume


@pytest.fixture(scope="module")
def similarity_server(demo_source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("similarity")
    for name in ("backbone.safetensors", "plugin.anymc3d"):
        shutil.copy(demo_source / name, folder / name)
    write_volume(folder / "small.nii.gz", (48, 40, 12), seed=5)
    write_volume(folder / "zz_other.nii.gz", (40, 40, 10), seed=6, lesion=False)
    with ReviewServer(folder, "--backbone", folder / "backbone.safetensors", "--plugin", folder / "plugin.anymc3d",
                      "--device", "cpu", log=tmp_path_factory.mktemp("logs") / "server.log") as srv:
        yield srv


def test_click_shows_the_similarity_map_of_the_clicked_voxel_in_the_background(browser, similarity_server):
    page = open_page(browser, similarity_server.url)
    try:
        wait_frames(page, 0, timeout=60)
        settle(page)
        before = view_pixels(page, "Red")
        assert heatmap_fraction(before) < 0.002  # no results: no overlay yet
        cursor = state(page, "cursor_ijk")
        page.locator(".similarity-toggle").click()
        wait_state(page, "s('similarity_mode') === true")
        box = view_box(page, "Red")
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        wait_state(page, "s('similarity_busy') === true")
        # the page stays live while the backend runs: a window preset goes through and is applied
        page.locator(".window-bone").click()
        wait_state(page, "s('window_preset') === 'bone'")
        assert state(page, "similarity_busy") is True, "the map was done before the page was tested"
        assert "computing" in page.locator(".similarity-status").inner_text()
        t0 = now(page)
        wait_state(page, "s('similarity_version') > 0", timeout=240)
        status = state(page, "similarity_status")
        assert status.startswith("similarity to voxel"), status
        seed = [int(v) for v in status.split("(")[1].split(")")[0].split(",")]
        # the centre of the axial view after a reset: the volume's in-plane centre, on the shown axial slice
        assert seed[2] == cursor[2] and abs(seed[0] - 23.5) <= 2 and abs(seed[1] - 19.5) <= 2, (seed, cursor)
        wait_frames(page, t0, ("Red",))
        settle(page)
        after = view_pixels(page, "Red")
        assert heatmap_fraction(after) > 0.05, heatmap_fraction(after)
        assert not state(page, "similarity_busy")
        # a case switch drops the map: the other case shows no overlay and no similarity status
        version = state(page, "scene_version")
        t0 = now(page)
        page.locator(".case-item", has_text="zz_other.nii.gz").click()
        wait_state(page, f"s('shown_case') === 1 && s('scene_version') > {version}")
        wait_frames(page, t0, ("Red",))
        settle(page)
        assert state(page, "similarity_status") == ""
        assert heatmap_fraction(view_pixels(page, "Red")) < 0.002
    finally:
        page.close()


pytestmark = pytest.mark.slow  # a real server and browser: left out of the quick tier

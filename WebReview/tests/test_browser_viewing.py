"""Viewing as in Slicer (Chromium, a real server, the real page at 1280x720): a page opened on a clean server logs
no error (browser console, failed requests, server log); the crosshair of a jump is a colour the heatmap's colour
map never takes and leaves with the case; window/level typed in two fields and dragged in a slice view (Slicer's
vtkMRMLWindowLevelWidget: window += gain * dx, level += gain * dy, gain = value range / smaller render side); the
slice slider has its own strip under the image, where Slicer's scale bar is not.
"""

import numpy as np
import pytest
import SimpleITK as sitk
from anymc3d_review.testing import (change_scene as change, FRAME_SCRIPT, ReviewServer, settle, show_case as show,
    state, view_box, view_pixels, wait_frames, wait_state)

pytestmark = pytest.mark.slow
WIDTH, HEIGHT = 1280, 720


@pytest.fixture(scope="module")
def viewing(browser, review_folder, tmp_path_factory):
    """A fresh server and one page on it; ``problems`` collects every console error, page error and HTTP answer
    >= 400 from the first request on."""
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with ReviewServer(review_folder, log=log) as server:
        page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
        problems = []
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("response", lambda r: problems.append(f"HTTP {r.status} {r.request.method} {r.url.split('?')[0]}")
                if r.status >= 400 else None)
        page.add_init_script(FRAME_SCRIPT)
        page.goto(server.url)
        wait_frames(page, 0, timeout=60)
        yield page, server, problems
        page.close()


def test_clean_page_open_logs_no_error(viewing):
    page, server, problems = viewing
    settle(page)
    page.wait_for_timeout(1500)  # late layout passes (ResizeObserver) and the first idle prefetch
    assert problems == [], problems
    lines = [line for line in server.output().splitlines() if "error" in line.lower() or "traceback" in line.lower()]
    assert lines == [], lines


def cyan_pixels(pixels):
    """Pixels far more green and blue than red: the crosshair's cyan (0, 0.9, 1)."""
    p = pixels.astype(np.int16)
    return int(((p[..., 1] - p[..., 0] > 50) & (p[..., 2] - p[..., 0] > 50)).sum())


def test_crosshair_is_outside_the_colour_map_and_leaves_with_the_case(viewing):
    from AnyMC3DSlicerLogic.outputs import heatmapColor

    page, *_ = viewing
    # the colour map never takes the crosshair's colour (green 50/255 above red), nor does any blend of it over
    # grey (blending at opacity a scales green - red by a)
    colours = np.array([heatmapColor(v) for v in np.linspace(0, 1, 256)])
    assert (colours[:, 1] - colours[:, 0]).max() < 0.05

    show(page, "volume.nii.gz")
    assert cyan_pixels(view_pixels(page, "Red")) == 0  # no crosshair before a jump
    change(page, lambda: page.locator(".jump-maximum").click())
    marked = cyan_pixels(view_pixels(page, "Red"))
    assert marked >= 10, marked  # the crosshair's lines, on the heatmap's peak
    show(page, "second.nii.gz")
    assert cyan_pixels(view_pixels(page, "Red")) == 0  # gone with the case it marked


def image_range(review_folder, name):
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(sitk.ReadImage(str(review_folder / name)))
    return stats.GetMinimum(), stats.GetMaximum()


def test_window_level_dragged_as_in_slicer(viewing, review_folder):
    page, *_ = viewing
    show(page, "volume.nii.gz")
    width0, level0 = state(page, "window_width"), state(page, "window_level")
    before = view_pixels(page, "Red")
    box = view_box(page, "Red")
    low, high = image_range(review_folder, "volume.nii.gz")
    gain = (high - low) / min(round(box["width"]), round(box["height"]))  # vtkMRMLWindowLevelWidget's gain
    x, y = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.6
    version = state(page, "scene_version")
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 60, y - 40, steps=6)  # right: wider window; up (VTK's y grows upwards): higher level
    page.mouse.up()
    page.mouse.move(5, HEIGHT - 5)
    wait_state(page, f"s('window_preset') === 'custom' && s('scene_version') > {version}")
    settle(page)
    width1, level1 = state(page, "window_width"), state(page, "window_level")
    assert width1 - width0 == pytest.approx(60 * gain, rel=0.1, abs=1.0), (width0, width1, gain)
    assert level1 - level0 == pytest.approx(40 * gain, rel=0.1, abs=1.0), (level0, level1, gain)
    after = view_pixels(page, "Red")
    assert np.abs(after.astype(float) - before.astype(float)).mean() > 2.0  # the image shows it


def test_window_level_typed(viewing, review_folder):
    page, *_ = viewing
    show(page, "volume.nii.gz")
    low, high = image_range(review_folder, "volume.nii.gz")
    box = view_box(page, "Red")
    inner = (slice(int(box["height"] * 0.25), int(box["height"] * 0.75)),
             slice(int(box["width"] * 0.25), int(box["width"] * 0.75)))

    def typed(field, value):
        version = state(page, "scene_version")
        page.locator(f".{field}-field input").fill(str(value))
        page.locator(f".{field}-field input").press("Enter")
        wait_state(page, f"s('scene_version') > {version} && s('window_preset') === 'custom'")
        settle(page)
        assert state(page, field) == pytest.approx(value, abs=0.05)

    typed("window_width", 10)
    typed("window_level", high + 100)  # every voxel below the window: black
    assert view_pixels(page, "Red")[inner].mean() < 8
    typed("window_level", low - 100)  # every voxel above it: white
    assert view_pixels(page, "Red")[inner].mean() > 200
    change(page, lambda: page.locator(".window-auto").click())
    assert state(page, "window_preset") == "auto"


def test_slice_slider_does_not_cover_the_scale_bar(viewing):
    page, *_ = viewing
    show(page, "volume.nii.gz")
    for view in ("Red", "Green", "Yellow"):
        image = view_box(page, view)
        slider = page.evaluate(
            """(view) => { let el = document.querySelector(`.view-label[data-view="${view}"]`);
                 while (el && !el.querySelector('.slice-slider-gutter')) el = el.parentElement;
                 const r = el.querySelector('.slice-slider-gutter').getBoundingClientRect();
                 return {x: r.x, y: r.y, width: r.width, height: r.height}; }""", view)
        # the slider's strip is under the image (Slicer draws the scale bar inside it, centred at its bottom)
        assert slider["y"] >= image["y"] + image["height"] - 0.5, (view, image, slider)
        assert slider["height"] > 10 and slider["y"] + slider["height"] <= HEIGHT + 0.5, (view, slider)
    # and the scale bar is in the image: in the axial view (black air under the body), a light horizontal line
    # in the image's bottom 10 %, 1.5 % of the height above its edge (vtkMRMLRulerDisplayableManager)
    light = view_pixels(page, "Red").astype(int).min(axis=2) > 60
    height, width = light.shape
    counts = light[:, int(width * 0.2):int(width * 0.8)].sum(axis=1)
    lines = [r for r in range(int(height * 0.9), height) if counts[r] >= 0.1 * width and counts[r - 4] * 3 < counts[r]]
    assert lines, counts[int(height * 0.9):]

"""The review page in a real browser (Chromium driven by Playwright), over the demo folder.

Pixel checks are tolerant: a "heatmap colour" is a strongly coloured pixel (CT grey has none), counted as a share
of the view; image changes are mean absolute differences. Waits are on frames and on the page's state, never on a
fixed sleep alone.
"""

import numpy as np
import pytest
import SimpleITK as sitk
from anymc3d_review.testing import (
    SLICE_VIEWS,
    VIEWS,
    heatmap_fraction,
    now,
    settle,
    state,
    view_box,
    view_pixels,
    wait_frames,
    wait_state,
)

HEATMAP_SHARE = 0.01   # a view showing a heatmap: at least 1 % heatmap-coloured pixels (the additive overlay
#                        starts at black at the threshold: 1.4 % measured on the axial view, 0.2 % without one)
CONTROL_SHARE = 0.002  # a view without one: under 0.2 % (labels, anti-aliasing)


def case_index(page, name):
    cases = state(page, "cases")
    return next(c["index"] for c in cases if c["name"] == name)


def show_case(page, name, views=VIEWS):
    """Select a case by clicking it in the list; wait for the scene and every view's new frame."""
    index = case_index(page, name)
    version = state(page, "scene_version")
    if state(page, "shown_case") == index:
        return index
    settle(page, views)
    t0 = now(page)  # the page is settled: every frame after t0 comes from this change
    page.locator(".case-item", has_text=name).click()
    wait_state(page, f"s('shown_case') === {index} && s('scene_version') > {version}")
    wait_frames(page, t0, views)
    wait_state(page, "!s('heatmap_loading')")  # a cold case may show its image before its heatmap
    settle(page, views)
    return index


def record_for(results_json, name):
    return next(r for r in results_json if r["image"].endswith("/" + name))


def test_page_lists_cases_and_shows_heatmap_in_every_view(page):
    names = [c["name"] for c in state(page, "cases")]
    assert names == ["control.nii.gz", "second.nii.gz", "volume.nii.gz"]
    statuses = {c["name"]: c["status"] for c in state(page, "cases")}
    assert statuses == {"control.nii.gz": "none", "second.nii.gz": "results", "volume.nii.gz": "results"}
    show_case(page, "volume.nii.gz")
    for view in VIEWS:
        share = heatmap_fraction(view_pixels(page, view))
        assert share > HEATMAP_SHARE, f"{view}: only {share:.3%} heatmap-coloured pixels"


def test_control_case_has_no_heatmap_colours(page):
    show_case(page, "control.nii.gz")
    assert state(page, "rows") == []
    for view in VIEWS:
        share = heatmap_fraction(view_pixels(page, view))
        assert share < CONTROL_SHARE, f"{view}: {share:.3%} heatmap-coloured pixels in a case without heatmap"
    # the CT itself is there (grey, not black) in the slice views
    assert view_pixels(page, "Red").mean() > 10


def test_table_text_equals_json_probabilities(page, results_json):
    show_case(page, "second.nii.gz")
    result = record_for(results_json, "second.nii.gz")["results"][0]
    rows = page.locator("tr.finding-row")
    assert rows.count() == len(result["labels"])
    for i, label in enumerate(result["labels"]):
        cells = rows.nth(i).locator("td")
        assert page.locator("tr.finding-row td.finding-label").nth(i).inner_text().strip() == label
        text = rows.nth(i).locator("td.finding-probability").inner_text().strip()
        assert text == f"{result['probabilities'][label]:.2f}"  # as a reader reads it; exact values in the details
        assert abs(float(text) - result["probabilities"][label]) <= 5e-3
        if i == 0:
            page.locator(".probability-details").click()
            page.wait_for_selector("td.finding-raw")
        exact = rows.nth(i).locator("td.finding-exact").inner_text().strip()
        assert exact == f"{result['probabilities'][label]:.4f}"
        raw = rows.nth(i).locator("td.finding-raw").inner_text().strip()
        assert raw == f"{result['probabilities_raw'][label]:.4f}"
        decision = rows.nth(i).locator("td.finding-decision").inner_text().strip()
        expected = result["probabilities"][label] >= result["thresholds"][label]  # computed here, not copied
        assert decision == ("positive" if expected else "negative")
        assert cells.count() >= 4
    page.locator(".probability-details").click()


def test_switching_finding_changes_overlay(page, results_json):
    show_case(page, "volume.nii.gz")
    result = record_for(results_json, "volume.nii.gz")["results"][0]
    maps = [sitk.GetArrayFromImage(sitk.ReadImage(result["finding_heatmaps"][label])) for label in result["labels"]]
    assert np.abs(maps[0] - maps[1]).max() > 0.05, "the demo's findings have identical maps: nothing to compare"
    rows = page.locator("tr.finding-row")
    row = state(page, "row")
    other = 1 if row == 0 else 0
    before = {view: view_pixels(page, view).astype(np.int16) for view in SLICE_VIEWS}
    version = state(page, "scene_version")
    t0 = now(page)
    rows.nth(other).click()
    wait_state(page, f"s('row') === {other} && s('scene_version') > {version}")
    wait_frames(page, t0, SLICE_VIEWS)
    settle(page)
    assert "selected" in rows.nth(other).get_attribute("class")
    changes = {view: float(np.abs(view_pixels(page, view).astype(np.int16) - before[view]).mean()) for view in SLICE_VIEWS}
    assert max(changes.values()) > 2.0, changes


def click_finding(page, row):
    version = state(page, "scene_version")
    settle(page)
    t0 = now(page)
    page.locator("tr.finding-row").nth(row).click()
    wait_state(page, f"s('row') === {row} && s('scene_version') > {version}")
    wait_frames(page, t0, (*SLICE_VIEWS, "ThreeD"))
    settle(page)
    return {view: view_pixels(page, view).astype(np.int16) for view in VIEWS}


def mean_change(a, b):
    return float(np.abs(a - b).mean())


def test_every_switch_shows_that_findings_and_that_cases_heatmap(page, results_json):
    """Finding and case switches (heatmaps kept loaded, 3D from a reduced copy) show the chosen heatmap: the
    server's shown heatmap has that finding's file's maximum, and coming back to a finding or a case gives back its
    pixels in every view, while another finding's pixels differ."""
    show_case(page, "volume.nii.gz")
    result = record_for(results_json, "volume.nii.gz")["results"][0]
    order = [1, 2, 0] if state(page, "row") != 1 else [0, 2, 1]
    shown = {}
    for row in order:
        shown[row] = click_finding(page, row)
        voxels = sitk.GetArrayFromImage(sitk.ReadImage(result["finding_heatmaps"][result["labels"][row]]))
        k, j, i = np.unravel_index(int(np.argmax(voxels)), voxels.shape)
        assert state(page, "maximum_ijk") == [int(i), int(j), int(k)], result["labels"][row]
    first, second = order[0], order[1]
    assert max(mean_change(shown[first][v], shown[second][v]) for v in SLICE_VIEWS) > 2.0
    again = click_finding(page, first)
    for view in VIEWS:
        assert mean_change(again[view], shown[first][view]) < 0.5, view
    show_case(page, "second.nii.gz")
    other = {view: view_pixels(page, view).astype(np.int16) for view in VIEWS}
    second_size = sitk.ReadImage(record_for(results_json, "second.nii.gz")["image"]).GetSize()
    assert state(page, "orientation")["Red"]["slice"].split(" ")[0].endswith(f"/{second_size[2]}")
    show_case(page, "volume.nii.gz")
    back = {view: view_pixels(page, view).astype(np.int16) for view in VIEWS}
    row = state(page, "row")  # a case opens on its most probable finding
    reference = again if row == first else shown[row]
    for view in SLICE_VIEWS:  # (the 3D camera is reset to each case's bounds on a case switch)
        assert mean_change(back[view], reference[view]) < 0.5, view
    assert heatmap_fraction(view_pixels(page, "ThreeD")) > HEATMAP_SHARE
    assert max(mean_change(other[v], back[v]) for v in SLICE_VIEWS) > 2.0


def test_jump_to_maximum_moves_slices_to_heatmap_maximum(page, results_json):
    show_case(page, "volume.nii.gz")
    row = state(page, "row")
    result = record_for(results_json, "volume.nii.gz")["results"][0]
    label = result["labels"][row]
    voxels = sitk.GetArrayFromImage(sitk.ReadImage(result["finding_heatmaps"][label]))
    k, j, i = np.unravel_index(int(np.argmax(voxels)), voxels.shape)
    assert state(page, "maximum_ijk") == [int(i), int(j), int(k)]
    before = view_pixels(page, "Red").astype(np.int16)
    cursor_before = state(page, "cursor_ijk")
    version = state(page, "scene_version")
    t0 = now(page)
    page.locator(".jump-maximum").click()
    wait_state(page, f"s('scene_version') > {version}")
    assert state(page, "cursor_ijk") == [int(i), int(j), int(k)]
    if cursor_before[2] != int(k):  # the axial slice moved: its image changes
        wait_frames(page, t0, ("Red",))
        settle(page)
        assert float(np.abs(view_pixels(page, "Red").astype(np.int16) - before).mean()) > 1.0


def _dark_share(pixels):
    return float((pixels.max(axis=2) < 8).mean())


def test_jumps_keep_the_field_of_view_on_the_anatomy(page):
    """Most important slice / jump to maximum move the slice planes, never pan the views: each view's in-plane
    centre stays where it was and the views do not turn black (the old centred jump failed both)."""
    show_case(page, "volume.nii.gz")
    centres = {view: state(page, "orientation")[view]["center"] for view in SLICE_VIEWS}
    dark = {view: _dark_share(view_pixels(page, view)) for view in SLICE_VIEWS}
    cursors = [state(page, "cursor_ijk")]
    for button in (".jump-important", ".jump-maximum"):
        version = state(page, "scene_version")
        page.locator(button).click()
        wait_state(page, f"s('scene_version') > {version}")
        settle(page)
        cursors.append(state(page, "cursor_ijk"))
        for view in SLICE_VIEWS:
            assert state(page, "orientation")[view]["center"] == pytest.approx(centres[view], abs=1e-2), (button, view)
            after = _dark_share(view_pixels(page, view))
            assert after <= dark[view] + 0.10, f"{button}: {view} went from {dark[view]:.1%} to {after:.1%} black"
    assert len({tuple(c) for c in cursors}) > 1, "no jump moved the slices: nothing was tested"


def test_opacity_and_window_presets_reach_the_screen(page):
    show_case(page, "volume.nii.gz")
    settle(page)
    before = view_pixels(page, "Red").astype(np.int16)
    t0 = now(page)
    page.evaluate("() => window.trame.state.set('opacity', 0.0)")  # the slider's v-model: the same state change
    wait_frames(page, t0, ("Red",))
    settle(page)
    off = view_pixels(page, "Red")
    assert heatmap_fraction(off) < CONTROL_SHARE, "opacity 0 still shows the heatmap"
    assert float(np.abs(off.astype(np.int16) - before).mean()) > 2.0
    for preset in ("bone", "lung"):
        base = view_pixels(page, "Red").astype(np.int16)
        version = state(page, "scene_version")
        t0 = now(page)
        page.locator(f".window-{preset}").click()
        wait_state(page, f"s('window_preset') === '{preset}' && s('scene_version') > {version}")
        wait_frames(page, t0, ("Red",))
        settle(page)
        change = float(np.abs(view_pixels(page, "Red").astype(np.int16) - base).mean())
        assert change > 2.0, f"{preset}: the image did not change ({change:.2f})"
    page.locator(".window-auto").click()
    page.evaluate("() => window.trame.state.set('opacity', 0.5)")
    wait_state(page, "s('opacity') === 0.5 && s('window_preset') === 'auto'")
    settle(page)


def test_orientation_letters_and_slice_number_are_drawn(page):
    show_case(page, "volume.nii.gz")
    expected = {"Red": {"left": "R", "right": "L", "top": "A", "bottom": "P"},     # axial, radiological
                "Green": {"left": "R", "right": "L", "top": "S", "bottom": "I"},   # coronal
                "Yellow": {"left": "A", "right": "P", "top": "S", "bottom": "I"}}  # sagittal
    for view, letters in expected.items():
        for edge, letter in letters.items():
            label = page.locator(f".orientation-{edge}[data-view='{view}']")
            assert label.is_visible() and label.inner_text().strip() == letter, (view, edge)
    dims = state(page, "orientation")["Red"]["slice"]
    cursor = state(page, "cursor_ijk")
    text = page.locator(".slice-position[data-view='Red']").inner_text()
    assert text.startswith(f"{cursor[2] + 1}/") and "mm" in text, (text, cursor, dims)


def test_up_down_over_a_view_scroll_slices_and_elsewhere_change_the_case(page):
    show_case(page, "volume.nii.gz")
    index = state(page, "shown_case")
    cursor = state(page, "cursor_ijk")
    box = view_box(page, "Red")
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.keyboard.press("ArrowUp")
    wait_state(page, f"s('cursor_ijk') && s('cursor_ijk')[2] !== {cursor[2]}")
    assert abs(state(page, "cursor_ijk")[2] - cursor[2]) == 1
    assert state(page, "shown_case") == index  # the case did not change
    page.keyboard.press("ArrowDown")
    wait_state(page, f"s('cursor_ijk')[2] === {cursor[2]}")
    # over the panel, Up/Down still step through the cases
    page.mouse.move(5, 300)
    page.keyboard.press("ArrowDown")
    wait_state(page, f"s('shown_case') === {(index + 1) % 3}")


def test_camera_controls_move_the_3d_view(page):
    show_case(page, "volume.nii.gz")
    camera = state(page, "camera")
    before = view_pixels(page, "ThreeD").astype(np.int16)
    version = state(page, "scene_version")
    t0 = now(page)
    page.locator(".camera-left").click()
    wait_state(page, f"s('scene_version') > {version}")
    assert state(page, "camera") != camera
    wait_frames(page, t0, ("ThreeD",))
    settle(page, ("ThreeD",))
    after = view_pixels(page, "ThreeD")
    assert float(np.abs(after.astype(np.int16) - before).mean()) > 1.0
    assert heatmap_fraction(after) > HEATMAP_SHARE / 2


def test_keyboard_previous_next_case(page):
    show_case(page, "control.nii.gz")
    start = state(page, "shown_case")
    page.locator("body").click(position={"x": 5, "y": 5})
    page.keyboard.press("n")
    wait_state(page, f"s('shown_case') === {(start + 1) % 3}")
    page.keyboard.press("p")
    wait_state(page, f"s('shown_case') === {start}")


def test_page_cannot_name_anything_outside_the_listing(page):
    shown = state(page, "shown_case")
    version = state(page, "scene_version")
    for bad in ("../../etc/passwd", "/etc/passwd", 99, -1, 1.5, None):
        page.evaluate("(v) => window.trame.state.set('case_index', v)", bad)
        wait_state(page, f"s('case_index') === {shown}")
    assert state(page, "shown_case") == shown
    assert state(page, "scene_version") == version
    assert state(page, "case_error") == ""
    # the only files served are the app's own assets: a traversal path (sent as is, with the access cookie the page
    # holds) gets no file outside them
    for path in ("/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2fetc%2fpasswd"):
        response = page.request.get(page.url.split("/index.html")[0].split("?")[0].rstrip("/") + path)
        assert response.status in (403, 404), (path, response.status)
        assert "root:" not in response.text()


def test_most_important_slice_and_chart_click(page, results_json):
    show_case(page, "volume.nii.gz")
    result = record_for(results_json, "volume.nii.gz")["results"][0]
    axis = record_for(results_json, "volume.nii.gz")["slicing_axis"]
    version = state(page, "scene_version")
    page.locator(".jump-important").click()
    wait_state(page, f"s('scene_version') > {version}")
    assert state(page, "cursor_ijk")[axis] == int(np.argmax(result["slice_importance"]))
    # a click on the chart's left edge goes to the first slice; the chart marks the current slice
    version = state(page, "scene_version")
    page.locator(".importance-chart").scroll_into_view_if_needed()  # below the findings, model and sliders
    box = page.locator(".importance-chart").bounding_box()
    page.mouse.click(box["x"] + 34, box["y"] + box["height"] / 2)
    wait_state(page, f"s('scene_version') > {version}")
    assert state(page, "cursor_ijk")[axis] == 0
    version = state(page, "scene_version")
    middle = 34 + (320 - 34 - 8) / 2  # the plot's middle (chart.py margins)
    page.mouse.click(box["x"] + middle, box["y"] + box["height"] / 2)
    wait_state(page, f"s('scene_version') > {version}")
    slices = len(result["slice_importance"])
    assert abs(state(page, "cursor_ijk")[axis] - (slices - 1) / 2) <= 1
    assert page.locator(".importance-chart .current-slice").count() == 1


def test_ordinary_use_is_never_refused(page, server):
    """The guard's whitelist covers what the page itself sends: a drag of a slice slider moves the slice, and
    nothing the tests above did through the page's own controls was refused (only the deliberate bad indices)."""
    show_case(page, "volume.nii.gz")
    cursor = state(page, "cursor_ijk")
    slider = page.locator(".slice-slider").first
    box = slider.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.1, box["y"] + box["height"] / 2)
    wait_state(page, f"s('cursor_ijk') && s('cursor_ijk').join(',') !== '{','.join(map(str, cursor))}'")
    refused = [line for line in server.output().splitlines() if "refused: state change" in line]
    assert all("'case_index'" in line for line in refused), refused


@pytest.fixture(scope="module")
def reduced_server(review_folder, tmp_path_factory):
    """A server whose 3D view renders heatmaps reduced to at most 16 voxels per axis (the demo volumes are larger)."""
    from anymc3d_review.testing import ReviewServer

    log = tmp_path_factory.mktemp("logs") / "server-reduced.log"
    with ReviewServer(review_folder, env={"ANYMC3D_REVIEW_3D_MAX_SIZE": "16"}, log=log) as srv:
        yield srv


def test_3d_view_from_the_reduced_copy_shows_each_findings_heatmap(browser, reduced_server, results_json):
    from anymc3d_review.testing import open_page

    page = open_page(browser, reduced_server.url)
    try:
        wait_frames(page, 0, timeout=60)
        show_case(page, "volume.nii.gz")
        size = sitk.ReadImage(record_for(results_json, "volume.nii.gz")["image"]).GetSize()
        assert max(size) > 16, size  # the copy is in use
        row = state(page, "row")
        first = view_pixels(page, "ThreeD").astype(np.int16)
        assert heatmap_fraction(first) > HEATMAP_SHARE
        other = click_finding(page, 1 if row == 0 else 0)
        assert heatmap_fraction(other["ThreeD"]) > HEATMAP_SHARE
        assert mean_change(other["ThreeD"], first) > 0.5  # another finding, another 3D heatmap
        back = click_finding(page, row)
        assert mean_change(back["ThreeD"], first) < 0.5
        for view in SLICE_VIEWS:  # the slice views show the full-resolution heatmap (not the copy)
            assert heatmap_fraction(back[view]) > HEATMAP_SHARE
    finally:
        page.close()


@pytest.fixture(scope="module")
def cold_server(review_folder, tmp_path_factory):
    """A server that loads nothing ahead (every first visit of a case is cold), 3D copies of at most 16 voxels, and
    that never waits for a cold case's heatmap before showing its image."""
    from anymc3d_review.testing import ReviewServer

    log = tmp_path_factory.mktemp("logs") / "server-cold.log"
    env = {"ANYMC3D_REVIEW_PREFETCH": "0", "ANYMC3D_REVIEW_3D_MAX_SIZE": "16",
           "ANYMC3D_REVIEW_HEATMAP_WAIT_S": "0"}  # a case's image is shown as soon as it is read, its heatmap after
    with ReviewServer(review_folder, env=env, log=log) as srv:
        yield srv


def test_cold_case_opens_on_its_first_finding_and_every_finding_follows(browser, cold_server, results_json):
    """A case never loaded opens on its most probable finding (its heatmap read with its image, shown when in);
    the others' heatmaps, read after the first frame, each show their own maximum and colours in every view."""
    from anymc3d_review.testing import open_page

    page = open_page(browser, cold_server.url)
    try:
        wait_frames(page, 0, timeout=60)
        loaded = [c["name"] for c in state(page, "cases") if c["index"] in state(page, "loaded_cases")]
        assert "volume.nii.gz" not in loaded and "second.nii.gz" not in loaded
        # a quick switch through a cold case (its reads are dropped when the next case is asked for) to another
        version = state(page, "scene_version")
        for name in ("second.nii.gz", "volume.nii.gz"):
            page.evaluate("(i) => window.trame.state.set('case_index', i)", case_index(page, name))
        wait_state(page, f"s('shown_case') === {case_index(page, 'volume.nii.gz')} && s('scene_version') > {version}")
        settle(page)
        result = record_for(results_json, "volume.nii.gz")["results"][0]
        probabilities = [result["probabilities"][label] for label in result["labels"]]
        first = state(page, "row")
        assert first == int(np.argmax(probabilities))
        for row in [*(r for r in range(len(result["labels"])) if r != first), first]:
            shown = click_finding(page, row) if row != state(page, "row") else \
                {view: view_pixels(page, view).astype(np.int16) for view in VIEWS}
            voxels = sitk.GetArrayFromImage(sitk.ReadImage(result["finding_heatmaps"][result["labels"][row]]))
            k, j, i = np.unravel_index(int(np.argmax(voxels)), voxels.shape)
            assert state(page, "maximum_ijk") == [int(i), int(j), int(k)], result["labels"][row]
            assert heatmap_fraction(shown["ThreeD"]) > HEATMAP_SHARE
            assert max(heatmap_fraction(shown[view]) for view in SLICE_VIEWS) > HEATMAP_SHARE
            assert state(page, "heatmap_error") == ""
        show_case(page, "second.nii.gz")  # the case left at once opens whole later
        other = record_for(results_json, "second.nii.gz")["results"][0]
        row = state(page, "row")
        voxels = sitk.GetArrayFromImage(sitk.ReadImage(other["finding_heatmaps"][other["labels"][row]]))
        k, j, i = np.unravel_index(int(np.argmax(voxels)), voxels.shape)
        assert state(page, "maximum_ijk") == [int(i), int(j), int(k)]
    finally:
        page.close()


pytestmark = pytest.mark.slow  # a real server and browser: left out of the quick tier

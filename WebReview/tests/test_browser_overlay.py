"""The heatmap overlay rises from its threshold (Chromium, a real server, the real page): the tint (a view's pixels
with the overlay on minus the same pixels with it off) never darkens the image, so nothing under the threshold
looks brighter than its tinted surroundings, and it starts near zero where it starts (no cut-out edge); a higher
threshold tints fewer pixels. Alpha blending with the display node's threshold fails both: it darkens the grey
under a dark purple and jumps from 0 to its full blend at the threshold."""

import numpy as np
import pytest
from anymc3d_review.testing import (change_scene as change, now, open_page, ReviewServer, settle, show_case as show, state,
    view_pixels, wait_frames)

pytestmark = pytest.mark.slow
NOISE = 12  # JPEG noise of the view's image stream on grey (sum over the three channels stays under it)
RINGING = 75  # JPEG ringing next to a saturated tint darkens a few pixels by up to about 40 (sum over R, G, B)


@pytest.fixture(scope="module")
def page(browser, review_folder):
    with ReviewServer(review_folder) as server:
        page = open_page(browser, server.url, 1280, 720)
        wait_frames(page, 0, timeout=60)
        yield page
        page.close()


def set_threshold(page, value):
    since = now(page)
    page.evaluate("(v) => window.trame.state.set('threshold', v)", value)
    wait_frames(page, since)  # the slice views drew again
    settle(page)


def tint(page):
    """Signed per-pixel tint of the Red view, summed over R, G, B: overlay on minus overlay off."""
    on = view_pixels(page, "Red").astype(np.int32)
    change(page, lambda: page.locator(".overlay-toggle").click())
    assert state(page, "overlay_visible") is False
    off = view_pixels(page, "Red").astype(np.int32)
    change(page, lambda: page.locator(".overlay-toggle").click())
    assert state(page, "overlay_visible") is True
    return (on - off).sum(axis=2)


def test_overlay_rises_from_the_threshold(page):
    show(page, "volume.nii.gz")
    change(page, lambda: page.locator(".jump-maximum").click())  # the slices through the heatmap's maximum
    set_threshold(page, 0.3)
    delta = tint(page)
    tinted = np.abs(delta) > NOISE
    # the edge: tinted pixels next to an untinted one carry a small part of the peak tint, not a cut-out step
    untinted_neighbour = np.zeros_like(tinted)
    for axis in (0, 1):
        for shift in (1, -1):
            untinted_neighbour |= np.roll(~tinted, shift, axis=axis)
    edge = tinted & untinted_neighbour
    peak = np.abs(delta).max()
    edge_tint = np.percentile(np.abs(delta[edge]), 90)
    darkened = float((delta < -2 * NOISE).sum() / max(tinted.sum(), 1))
    print(f"tinted share {tinted.mean():.4f}, peak tint {peak}, edge tint (90th percentile) {edge_tint}, "
          f"lowest {delta.min()}, darkened / tinted {darkened:.4f}")
    assert tinted.mean() > 0.002, tinted.mean()  # the overlay is there
    # no pixel darkened: the tint only adds, so the untinted image is never brighter than the tinted one
    assert darkened < 0.01 and delta.min() > -RINGING, (darkened, delta.min())
    assert edge_tint < 0.35 * peak, (edge_tint, peak)

    set_threshold(page, 0.6)
    higher = np.abs(tint(page)) > NOISE
    print(f"tinted share at threshold 0.6: {higher.mean():.4f}")
    assert 0 < higher.mean() < 0.8 * tinted.mean(), (higher.mean(), tinted.mean())  # the threshold still works

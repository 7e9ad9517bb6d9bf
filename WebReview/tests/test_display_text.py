"""The heatmap colour map (perceptual: matplotlib's inferno, lightness rising monotonically), the page's colour bar made
from the same table, and the chart's y-axis label inside the plot (server side, no browser)."""

import re

import numpy as np
import pytest
from anymc3d_review.chart import CHART_HEIGHT, chart_data, colorbar_gradient
from AnyMC3DSlicerLogic.outputs import HEATMAP_COLOR_STOPS, heatmapColor


def lightness(rgb):
    """CIE L* of sRGB colours in [0, 1] (IEC 61966-2-1 transfer curve, D65 luminance weights; CIE 1976 L*)."""
    rgb = np.asarray(rgb, dtype=float)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    y = linear @ np.array([0.2126, 0.7152, 0.0722])
    return np.where(y > (6 / 29) ** 3, 116 * np.cbrt(y) - 16, y * (29 / 3) ** 3)


def test_heatmap_colours_are_inferno_with_monotonic_lightness():
    from matplotlib import colormaps

    values = np.linspace(0.0, 1.0, 513)
    ours = np.array([heatmapColor(v) for v in values])
    assert np.abs(ours - colormaps["inferno"](values)[:, :3]).max() < 0.03
    steps = np.diff(lightness(ours))
    assert (steps > 0).all(), f"lightness falls at {values[1:][steps <= 0]}"
    assert lightness(ours[-1]) - lightness(ours[0]) > 90  # black to pale yellow: the whole range is used
    # the rainbow it replaces fails the same check (its yellow is lighter than its red)
    rainbow = [(0, 0, 1), (0, 1, 1), (0, 1, 0), (1, 1, 0), (1, 0, 0)]
    assert not (np.diff(lightness(rainbow)) > 0).all()


def test_colour_bar_is_the_overlay_table():
    gradient = colorbar_gradient()
    stops = re.findall(r"#([0-9a-f]{6}) (\d+)%", gradient)
    assert len(stops) == len(HEATMAP_COLOR_STOPS)
    for (hex_colour, percent), (value, rgb) in zip(stops, HEATMAP_COLOR_STOPS):
        assert int(percent) == round(value * 100)
        assert [int(hex_colour[i:i + 2], 16) for i in (0, 2, 4)] == [round(c * 255) for c in rgb]


def test_chart_y_label_names_the_maximum_inside_the_plot():
    series = {"a": [0.0, 0.2, 0.7, 0.1], "b": [0.3, 0.05, 0.4, 0.0]}
    chart = chart_data(series, 2, current=1)
    label, plot = chart["labels"]["y1"], chart["plot"]
    assert float(label["text"]) == max(max(v) for v in series.values())
    font_size = 10  # the page draws chart labels at font-size 10 (app._importance_chart)
    assert label["y"] - 0.8 * font_size >= plot["y"] - 0.5, "the top label's glyphs rise above the plot"
    assert label["y"] <= plot["y"] + plot["height"] and label["y"] < CHART_HEIGHT
    # the polyline's highest point is the maximum, drawn at the plot's top edge
    top_y = min(float(p.split(",")[1]) for line in chart["lines"] for p in line["points"].split())
    assert top_y == plot["y"]


def test_default_output_before_the_printed_address_is_quiet(tmp_path):
    """Started with the default log level, the server prints its address with nothing of trame's, wslink's or VTK's
    internals before it (the issue saw 15,000 lines)."""
    pytest.importorskip("slicer")
    import SimpleITK as sitk
    from anymc3d_review.testing import ReviewServer

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 12, 12), np.float32)), str(tmp_path / "tiny.nii.gz"))
    with ReviewServer(tmp_path, log_level=None, log=tmp_path / "server.log") as server:
        lines = [line for line in server.output().splitlines() if line.strip()]
    first = next(i for i, line in enumerate(lines) if "open: http" in line)
    assert lines[:first] == [f"AnyMC3D review of {tmp_path.resolve()}"], lines[:first]

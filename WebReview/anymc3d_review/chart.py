"""The slice-importance chart (numbers for SVG elements of the page) and the colour bar (CSS) of the page.

The data come from the Logic's nodes: the importance table (one column per plugin) and the heatmap colour map
(``AnyMC3DSlicerLogic.outputs.HEATMAP_COLOR_STOPS`` / ``heatmapColor``), so the bar shows exactly the overlay's colours.
"""

from __future__ import annotations

from AnyMC3DSlicerLogic.outputs import HEATMAP_COLOR_STOPS, heatmapColor

CHART_WIDTH, CHART_HEIGHT = 320, 130
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 34, 8, 8, 22


def _hex(rgb) -> str:
    return "#" + "".join(f"{max(0, min(255, round(c * 255))):02x}" for c in rgb)


def colorbar_gradient() -> str:
    """CSS ``linear-gradient`` of the heatmap colour table, 0 on the left, 1 on the right."""
    stops = ", ".join(f"{_hex(rgb)} {value * 100:.0f}%" for value, rgb in HEATMAP_COLOR_STOPS)
    return f"linear-gradient(to right, {stops})"


def chart_data(series: dict, axis: int | None, current: int | None = None) -> dict:
    """The chart as numbers and short texts for the page's SVG elements (never markup): a polyline per plugin of
    importance against slice index, the x position of the slice the views show, and the axis labels.

    The y-axis runs from 0 to the largest importance; its top label sits at the top of the plot (never above it).
    """
    width, height = CHART_WIDTH, CHART_HEIGHT
    plot_w, plot_h = width - MARGIN_LEFT - MARGIN_RIGHT, height - MARGIN_TOP - MARGIN_BOTTOM
    plot = {"x": MARGIN_LEFT, "y": MARGIN_TOP, "width": plot_w, "height": plot_h}
    if not series:
        return {"plot": plot, "lines": [], "current_x": None, "slices": 0, "labels": {}}
    count = max(len(values) for values in series.values())
    top = max((max(values) for values in series.values() if values), default=1.0) or 1.0

    def x(i):
        return round(MARGIN_LEFT + (plot_w * i / max(1, count - 1)), 1)

    def y(v):
        return round(MARGIN_TOP + plot_h * (1.0 - v / top), 1)

    lines = [{"name": str(name), "color": _hex(heatmapColor(1.0 - index / max(1, len(series)))),
              "points": " ".join(f"{x(i)},{y(float(v))}" for i, v in enumerate(values))}
             for index, (name, values) in enumerate(series.items())]
    axis_name = "IJK"[axis] if axis in (0, 1, 2) else "?"
    bottom = height - 6
    labels = {"x0": {"text": "0", "x": MARGIN_LEFT, "y": bottom},
              "x1": {"text": str(count - 1), "x": MARGIN_LEFT + plot_w, "y": bottom},
              "x_title": {"text": f"slice ({axis_name})", "x": MARGIN_LEFT + plot_w / 2, "y": bottom},
              "y1": {"text": f"{top:.2f}", "x": MARGIN_LEFT - 4, "y": MARGIN_TOP + 8},
              "y0": {"text": "0", "x": MARGIN_LEFT - 4, "y": MARGIN_TOP + plot_h}}
    current_x = x(current) if current is not None and 0 <= current < count else None
    return {"plot": plot, "lines": lines, "current_x": current_x, "slices": count, "labels": labels}


def slice_from_chart_x(offset_x: float, count: int) -> int:
    """The slice index under a click at ``offset_x`` pixels from the chart's left edge."""
    plot_w = CHART_WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    fraction = (float(offset_x) - MARGIN_LEFT) / plot_w
    return int(min(max(round(fraction * max(1, count - 1)), 0), max(0, count - 1)))

"""The slice-importance chart (SVG) and the colour bar (CSS) of the page.

The data come from the Logic's nodes: the importance table (one column per plugin) and the heatmap colour map
(``AnyMC3DSlicerLogic.outputs.HEATMAP_COLOR_STOPS`` / ``heatmapColor``), so the bar shows exactly the overlay's colours.
"""

from __future__ import annotations

from html import escape

from AnyMC3DSlicerLogic.outputs import HEATMAP_COLOR_STOPS, heatmapColor

CHART_WIDTH, CHART_HEIGHT = 320, 130
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 34, 8, 8, 22


def _hex(rgb) -> str:
    return "#" + "".join(f"{max(0, min(255, round(c * 255))):02x}" for c in rgb)


def colorbar_gradient() -> str:
    """CSS ``linear-gradient`` of the heatmap colour table, 0 on the left, 1 on the right."""
    stops = ", ".join(f"{_hex(rgb)} {value * 100:.0f}%" for value, rgb in HEATMAP_COLOR_STOPS)
    return f"linear-gradient(to right, {stops})"


def importance_svg(series: dict, axis: int | None, current: int | None = None) -> str:
    """A line per plugin of importance against slice index; a dashed line marks the slice the views show."""
    if not series:
        return ""
    width, height = CHART_WIDTH, CHART_HEIGHT
    plot_w, plot_h = width - MARGIN_LEFT - MARGIN_RIGHT, height - MARGIN_TOP - MARGIN_BOTTOM
    count = max(len(values) for values in series.values())
    top = max((max(values) for values in series.values() if values), default=1.0) or 1.0

    def x(i):
        return MARGIN_LEFT + (plot_w * i / max(1, count - 1))

    def y(v):
        return MARGIN_TOP + plot_h * (1.0 - v / top)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="importance-chart" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" data-slices="{count}">',
             f'<rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{plot_w}" height="{plot_h}" fill="#1e1e1e" stroke="#555"/>']
    for index, (name, values) in enumerate(series.items()):
        color = _hex(heatmapColor(1.0 - index / max(1, len(series))))
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{points}">'
                     f'<title>{escape(str(name))}</title></polyline>')
    if current is not None and 0 <= current < count:
        parts.append(f'<line class="current-slice" x1="{x(current):.1f}" x2="{x(current):.1f}" y1="{MARGIN_TOP}" '
                     f'y2="{MARGIN_TOP + plot_h}" stroke="#fff" stroke-dasharray="3,3"/>')
    axis_name = "IJK"[axis] if axis in (0, 1, 2) else "?"
    parts.append(f'<text x="{MARGIN_LEFT}" y="{height - 6}" fill="#bbb" font-size="10">0</text>')
    parts.append(f'<text x="{MARGIN_LEFT + plot_w}" y="{height - 6}" fill="#bbb" font-size="10" text-anchor="end">{count - 1}</text>')
    parts.append(f'<text x="{MARGIN_LEFT + plot_w / 2}" y="{height - 6}" fill="#bbb" font-size="10" text-anchor="middle">'
                 f'slice ({axis_name})</text>')
    parts.append(f'<text x="{MARGIN_LEFT - 4}" y="{MARGIN_TOP + 8}" fill="#bbb" font-size="10" text-anchor="end">{top:.2f}</text>')
    parts.append(f'<text x="{MARGIN_LEFT - 4}" y="{MARGIN_TOP + plot_h}" fill="#bbb" font-size="10" text-anchor="end">0</text>')
    parts.append("</svg>")
    return "".join(parts)


def slice_from_chart_x(offset_x: float, count: int) -> int:
    """The slice index under a click at ``offset_x`` pixels from the chart's left edge."""
    plot_w = CHART_WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    fraction = (float(offset_x) - MARGIN_LEFT) / plot_w
    return int(min(max(round(fraction * max(1, count - 1)), 0), max(0, count - 1)))

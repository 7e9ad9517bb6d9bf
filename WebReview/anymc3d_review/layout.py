"""The page's layout: the views' grid and overlays (labels, orientation letters, slice position), the side panel
(cases, findings, model, heatmap controls, slice-importance chart, similarity, 3D camera) and the keyboard.

Everything here is a template: texts the page shows come from server-made state and are escaped by Vue; nothing a
page can set is rendered as HTML (the chart is SVG elements bound to numbers).
"""

from __future__ import annotations

from trame.ui.vuetify3 import SinglePageWithDrawerLayout
from trame.widgets import client, html
from trame.widgets import vuetify3 as v3
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

from . import dicom_download
from .chart import CHART_HEIGHT, CHART_WIDTH
from .modelinfo import UNTRAINED

LAYOUT_ID = "AnyMC3D review"
VIEW_TITLES = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal", "ThreeD": "3D"}
#: any method's map (attention, gradient, occlusion) is divided by its case maximum: the bar says only that
COLORBAR_LABEL = "heatmap relative to its case maximum (max = 1), not a probability"

SLICE_VIEW_NAMES = ("Red", "Green", "Yellow")
SLIDER_STRIP_PX = 28  # the slice slider's strip under a slice view's image
# Keys: over a slice view, Up/Down scroll its slices (what readers expect of a viewer); n/p, PageDown/PageUp, and
# Up/Down anywhere else (the case list, the panel) change the case; m jumps to the heatmap's maximum.
KEYS_HELP = ("n / p (or ↓ / ↑ outside the views): next / previous case · ↑ / ↓ over a view: slices · "
             "m: jump to the maximum · o: overlay on / off")
KEYBOARD_JS = (
    "trigger('review_hello'); window.__reviewMouse = [-1, -1];"
    " window.addEventListener('mousemove', (e) => { window.__reviewMouse = [e.clientX, e.clientY]; }, true);"
    " window.addEventListener('keydown', (e) => {"
    " const t = e.target; const tag = (t && t.tagName || '').toLowerCase();"
    " if (tag === 'input' || tag === 'textarea' || tag === 'select' || e.altKey || e.ctrlKey || e.metaKey) return;"
    " let view = null; const [x, y] = window.__reviewMouse;"
    " let el = x >= 0 ? window.document.elementFromPoint(x, y) : null;"
    " while (el && el.querySelectorAll && el.querySelectorAll('.view-label[data-view]').length !== 1) el = el.parentElement;"
    " if (el && el.querySelector) view = el.querySelector('.view-label[data-view]').getAttribute('data-view');"
    " const overSlice = view && view !== 'ThreeD';"
    " if (overSlice && (e.key === 'ArrowUp' || e.key === 'ArrowDown')) { e.preventDefault();"
    "   trigger('review_scroll', [view, e.key === 'ArrowUp' ? 1 : -1]); }"
    " else if (e.key === 'ArrowDown' || e.key === 'n' || e.key === 'PageDown') { e.preventDefault(); trigger('review_next'); }"
    " else if (e.key === 'ArrowUp' || e.key === 'p' || e.key === 'PageUp') { e.preventDefault(); trigger('review_previous'); }"
    " else if (e.key === 'm') { trigger('review_jump_maximum'); }"
    " else if (e.key === 'o') { trigger('review_toggle_overlay'); } });"
    # similarity mode: a press of the left button on a slice view's image sends the view and the place in it
    # (fractions); 'mousedown', as the views' own handlers make the release land on another element (no 'click')
    " window.addEventListener('mousedown', (e) => {"
    " if (e.button !== 0 || !window.trame || !window.trame.state.get('similarity_mode')) return;"
    " const img = e.target; if (!img || !img.classList || !img.classList.contains('image-display-area')) return;"
    " let el = img, view = null;"
    " while (el && !view) { const l = el.querySelector && el.querySelector('.view-label[data-view]');"
    "   if (l) view = l.getAttribute('data-view'); el = el.parentElement; }"
    " if (!view || view === 'ThreeD') return; const r = img.getBoundingClientRect();"
    " trigger('review_similarity', [view, (e.clientX - r.left) / r.width, (e.clientY - r.top) / r.height]); }, true)"
)



def _view_label(view_id, view):
    """A label naming the view; ``data-view`` lets tests and the benchmark find each view's image."""
    name = view.get_singleton_tag()
    html.Div(VIEW_TITLES.get(name, name), classes="view-label text-caption", __properties=[("data_view", "data-view")],
             data_view=name, style="position: absolute; top: 4px; right: 8px; color: #ddd; pointer-events: none;")


def _gutter_button(icon, label, click):
    """An icon button of a view's gutter with its label (title and aria-label: read by screen readers and shown on
    hover; trame-slicer's own gutter buttons carry only a hover tooltip)."""
    with v3.VBtn(size="medium", variant="text", click=click, title=label, classes="gutter-button",
                 __properties=[("aria_label", "aria-label")], aria_label=label):
        v3.VIcon(icon=icon, size="medium", color="white")


def _gutter(view, slice_view):
    """The view's gutter (as trame-slicer 2.0.0's create_vertical_view_gutter_ui / create_slice_buttons, with
    labelled buttons) and, for a slice view, trame-slicer's slice slider."""
    with html.Div(classes="view-gutter", style="position: absolute;top: 0;left: 0;background-color: transparent;"):
        with html.Div(classes="view-gutter-content d-flex flex-column fill-height pa-2"):
            _gutter_button("mdi-camera-flip-outline", "Reset the camera of this view", view.reset_view)
            if slice_view:
                _gutter_button("mdi-video-3d", "Show this slice in the 3D view (on / off)", view.toggle_visible_in_3d)


def slice_view_ui(server, view_id, view):
    from trame_slicer.app.logic.slice_view_logic import connect_slice_view_slider_to_state
    from trame_slicer.app.ui.slider import Slider

    _gutter(view, slice_view=True)
    with html.Div(classes="slice-slider-gutter",
                  style="position: absolute;bottom: 0;left: 0;background-color: transparent;width: 100%;"):
        Slider(classes="slice-slider", typed_state=connect_slice_view_slider_to_state(server, view), theme="dark",
               dense=True)
    _view_label(view_id, view)
    _orientation_overlay(view.get_singleton_tag())


def _orientation_overlay(name):
    """Anatomical letters at the view's edges and the slice number / position (server-made text, escaped by Vue)."""
    base = "position: absolute; color: #ffd54f; font: bold 13px sans-serif; pointer-events: none; text-shadow: 0 0 2px #000;"
    where = {"left": "left: 34px; top: 50%;", "right": "right: 8px; top: 50%;", "top": "top: 4px; left: 50%;",
             "bottom": f"bottom: {SLIDER_STRIP_PX + 18}px; left: 50%;"}
    for edge, position in where.items():
        html.Div(f"{{{{ orientation.{name} && orientation.{name}.{edge} }}}}", classes=f"orientation orientation-{edge}",
                 style=base + position, __properties=[("data_view", "data-view")], data_view=name)
    html.Div(f"{{{{ orientation.{name} && orientation.{name}.slice }}}}", classes="slice-position",
             __properties=[("data_view", "data-view")], data_view=name,
             style="position: absolute; top: 4px; left: 34px; color: #ddd; font: 12px sans-serif; pointer-events: none;")


def threed_view_ui(server, view_id, view):
    _gutter(view, slice_view=False)
    _view_label(view_id, view)


def review_layout() -> Layout:
    axial, coronal = ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view()
    sagittal, threed = ViewLayoutDefinition.sagittal_view(), ViewLayoutDefinition.threed_view()
    return Layout(LayoutDirection.Horizontal, [Layout(LayoutDirection.Vertical, [axial, coronal]),
                                               Layout(LayoutDirection.Vertical, [threed, sagittal])])


def _svg(tag, children=None, attrs=(), **kwargs):
    """An SVG element; ``attrs`` are fixed template attributes written here (bindings to server-made numbers)."""
    from trame_client.widgets.core import AbstractElement

    return AbstractElement(tag, children, raw_attrs=list(attrs), **kwargs)


def _importance_chart():
    """The slice-importance chart as SVG elements bound to numbers and server-made labels (``chart_data``): Vue
    escapes the text and sets attributes; nothing is parsed as HTML."""
    with _svg("svg", classes="importance-chart", attrs=[f'width="{CHART_WIDTH}"', f'height="{CHART_HEIGHT}"',
                                                        f'viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}"']):
        _svg("rect", attrs=[':x="chart.plot.x"', ':y="chart.plot.y"', ':width="chart.plot.width"',
                            ':height="chart.plot.height"', 'fill="#1e1e1e"', 'stroke="#555"'])
        with _svg("polyline", v_for="(line, i) in chart.lines", key="i",
                  attrs=['fill="none"', ':stroke="line.color"', 'stroke-width="1.6"', ':points="line.points"']):
            _svg("title", "{{ line.name }}")
        _svg("line", v_if="chart.current_x !== null", classes="current-slice",
             attrs=[':x1="chart.current_x"', ':x2="chart.current_x"', ':y1="chart.plot.y"',
                    ':y2="chart.plot.y + chart.plot.height"', 'stroke="#fff"', 'stroke-dasharray="3,3"'])
        for key, anchor in (("x0", "start"), ("x1", "end"), ("x_title", "middle"), ("y1", "end"), ("y0", "end")):
            _svg("text", f"{{{{ chart.labels.{key}.text }}}}", classes=f"chart-label chart-{key}",
                 attrs=[f':x="chart.labels.{key}.x"', f':y="chart.labels.{key}.y"', 'fill="#bbb"', 'font-size="10"',
                        f'text-anchor="{anchor}"'])



def build_ui(server, layout_manager):
    """The page: toolbar, side panel (cases, findings, jumps, model, heatmap, window, chart, similarity, 3D), the
    views' grid. Laid out to be read at 1280x720: the title, the findings, the jump buttons and the views need no
    scrolling; the keys and the shared-view note are in the title attributes of short labels."""
    with SinglePageWithDrawerLayout(server, theme="dark", full_height=True) as layout:
        layout.title.set_text("AnyMC3D review")
        layout.title.classes = "review-title flex-grow-0 text-no-wrap"
        layout.root.classes = "anymc3d-review"
        # no footer (trame's "Powered by trame" line): 32 px more for the views at 720 px, and the footer's
        # auto-height ResizeObserver, re-laying out the app within the frame that measured it, was what made
        # Chromium report "ResizeObserver loop completed with undelivered notifications" at every page open
        layout.root.children.remove(layout.footer)
        layout.icon.title = "Show or hide the side panel"  # the drawer's menu icon: labelled like every icon
        layout.icon._attr_names.append(("aria_label", "aria-label"))
        layout.icon.aria_label = layout.icon.title
        client.ClientTriggers(mounted=KEYBOARD_JS)
        client.Style(
            ".anymc3d-review .v-navigation-drawer__content { overflow-y: auto; }"
            " .review-title { min-width: max-content; }"
            " .findings-table tr.selected td { background: rgba(255,255,255,0.12); }"
            " .findings-table td, .findings-table th { padding: 0 6px !important; height: 26px !important; }"
            " .case-list .v-list-item { min-height: 30px !important; }"
            # the slice slider has its own strip under the slice view's image: Slicer's scale bar (centred at the
            # image's bottom, up to 70 % of its width) and the bottom letter stay visible above it
            f" :has(> .slice-slider-gutter) > :first-child {{ height: calc(100% - {SLIDER_STRIP_PX}px) !important; }}"
            f" .slice-slider-gutter {{ height: {SLIDER_STRIP_PX}px; background: #1a1a1a; }}")
        with layout.toolbar:
            html.Div("{{ folder_name }}", classes="text-caption text-grey ml-2 text-truncate folder-name")
            html.Div("one shared view: every open tab shows the same case",
                     classes="text-caption text-grey ml-4 text-truncate",
                     title="all tabs of this address share one scene; a case switch in one moves the others")
            v3.VSpacer()
            html.Div("Keys", classes="text-caption text-grey mr-4 keys-help", title=KEYS_HELP,
                     __properties=[("aria_label", "aria-label")], aria_label=KEYS_HELP)
            v3.VProgressLinear(indeterminate=True, absolute=True, location="bottom", color="amber",
                               v_show="loading || heatmap_loading", classes="loading-bar")
        with layout.drawer as drawer:
            drawer.width = 340
            _build_panel()
        with layout.content:
            with html.Div(style="position: relative; width: 100%; display: flex;"
                                " height: calc(100vh - var(--v-layout-top, 64px) - var(--v-layout-bottom, 0px));"):
                layout_manager.initialize_layout_grid(layout)
    return layout


def _build_model_panel():
    """One line per plugin under the findings (name, backbone, training), the rest on demand (text only)."""
    with html.Div(v_if="model_summary.length", classes="model-info mb-2"):
        with html.Div(classes="d-flex align-center"):
            html.Div("Model", classes="text-subtitle-2", style="flex: 1;")
            v3.VBtn("{{ model_details ? 'Less' : 'More' }}", size="x-small", variant="text", classes="model-more",
                    click="model_details = !model_details", title="the model's version, modality, training, description")
        html.Div("plugins a run from here would use", v_if="model_info.length && model_info[0].for_run",
                 classes="text-caption text-grey")
        with html.Div(v_for="m in model_summary", key="m.name", classes="model-line text-caption"):
            html.Span("{{ m.name }}", classes="text-body-2 model-name mr-1")
            html.Span("{{ m.text }}", classes=("m.trained === false ? 'text-red' : 'text-grey'",))
        with html.Div(v_for="m in model_info", key="m.path + m.name", v_if="model_details",
                      classes="model-plugin text-caption mb-1 mt-1"):
            html.Div("{{ m.name }}", classes="text-body-2")
            html.Div("{{ m.problem }}", v_if="m.problem", classes="text-amber model-problem")
            html.Div("version: {{ m.version }}", v_if="m.version", classes="model-version")
            html.Div("backbone: {{ m.backbone }}", v_if="m.backbone", classes="model-backbone")
            html.Div("intended modality: {{ m.modality_text }}", v_if="m.modality_text", classes="model-modality")
            html.Div("body part: {{ m.body_part }}", v_if="m.body_part", classes="model-body-part")
            html.Div("training: {{ line }}", v_for="line in m.training", key="line", classes="model-training")
            html.Div("{{ line }}", v_for="line in m.card", key="line", classes="model-card",
                     style="white-space: pre-wrap;")
            html.Div("{{ m.description }}", v_if="m.description", classes="text-grey model-description")
    html.Div("image modality: {{ image_modality }}", v_if="shown_case >= 0 && image_modality",
             classes="text-caption image-modality")


def _build_findings():
    """Warnings, the findings table (calibrated probability to two decimals; the exact calibrated and the raw
    values in the details), the jump buttons and the overlay switch."""
    html.Div("Findings", classes="text-subtitle-2")
    with html.Div(v_for="w in model_warnings", key="w", classes="mb-1"):
        v3.VAlert("{{ w }}", type="warning", density="compact", variant="tonal", classes="modality-warning")
    with html.Div(v_if="rows.length && model_info.some(m => m.trained === false)", classes="mb-1"):
        v3.VAlert(f"{UNTRAINED} (a plugin of these findings was not trained)", type="error",
                  density="compact", variant="flat", classes="untrained-findings untrained-warning")
    with v3.VTable(density="compact", classes="findings-table", v_if="rows.length"):
        with html.Thead():
            with html.Tr():
                html.Th("Plugin", v_if="new Set(rows.map(r => r.plugin)).size > 1")
                html.Th("Finding")
                html.Th("Probability", title="Platt-calibrated probability (what the decision uses)")
                html.Th("Calibrated", v_if="probability_details", title="the calibrated probability, 4 decimals")
                html.Th("Raw", v_if="probability_details", title="the head's uncalibrated probability")
                html.Th("Threshold")
                html.Th("Decision", title="calibrated probability >= threshold (checked, not copied)")
        with html.Tbody():
            with html.Tr(v_for="r in rows", key="r.row", click="row = r.row",
                         classes=("r.row === row ? 'finding-row selected' : 'finding-row'",),
                         style="cursor: pointer;"):
                html.Td("{{ r.plugin }}", v_if="new Set(rows.map(r => r.plugin)).size > 1")
                html.Td("{{ r.finding }}", classes="finding-label")
                html.Td("{{ r.probability_text }}", classes="finding-probability")
                html.Td("{{ r.exact_text }}", v_if="probability_details", classes="finding-exact text-grey")
                html.Td("{{ r.raw_text }}", v_if="probability_details", classes="finding-raw text-grey")
                html.Td("{{ r.threshold_text }}", classes="finding-threshold")
                with html.Td(classes="finding-decision"):
                    v3.VChip("{{ r.decision }}", size="x-small",
                             color=("r.decision === 'positive' ? 'red' : 'grey'",))
    html.Div("No findings for this case.", v_if="!rows.length", classes="text-caption text-grey")
    dicom_download.link(html)
    with html.Div(classes="d-flex flex-wrap align-center mt-1", style="gap: 4px;", v_if="rows.length"):
        v3.VBtn("Jump to maximum", click="trigger('review_jump_maximum')", size="small", classes="jump-maximum",
                title="key m: move the slices through the heatmap's maximum")
        v3.VBtn("Most important slice", click="trigger('review_jump_important')", size="small",
                classes="jump-important")
        v3.VBtn("{{ overlay_visible ? 'Overlay on' : 'Overlay off' }}", size="small", classes="overlay-toggle",
                variant=("overlay_visible ? 'flat' : 'outlined'",), click="overlay_visible = !overlay_visible",
                title="key o: the heatmap overlay on / off")
        v3.VBtn("{{ probability_details ? 'Less' : 'Details' }}", size="x-small", variant="text",
                classes="probability-details", click="probability_details = !probability_details",
                title="the exact calibrated and the raw probabilities")


def _build_window():
    """Window presets of the shown image's kind (CT windows in HU, percentiles for other images)."""
    with html.Div(classes="d-flex align-center flex-wrap mt-2", style="gap: 2px;", v_if="shown_case >= 0"):
        html.Span("Window", classes="text-caption", style="width: 56px;",
                  title="window/level of the image in the slice views")
        v3.VBtn("{{ p.title }}", v_for="p in window_presets", key="p.name", size="x-small",
                variant=("window_preset === p.name ? 'flat' : 'text'",),
                color=("window_preset === p.name ? 'primary' : undefined",),
                click="window_preset = p.name", classes=("'window-preset window-' + p.name",))
    # typed window and level (applied on Enter or when the field is left), in the image's units; a left-drag in a
    # slice view changes them as in Slicer (horizontal: window, vertical: level)
    with html.Div(classes="d-flex align-center mt-1", style="gap: 4px;", v_if="shown_case >= 0",
                  title="window and level of the slice views; or left-drag in a slice view (horizontal: window, "
                        "vertical: level)"):
        for name, label in (("window_width", "Window"), ("window_level", "Level")):
            v3.VTextField(model_value=(name,), label=label, type="number", density="compact", hide_details=True,
                          variant="outlined", suffix=("window_units",), classes=f"window-field {name}-field",
                          change=f"{name} = Number($event.target.value)")


def _build_panel():
    with html.Div(classes="pa-2"):
        with html.Div(classes="d-flex align-center"):
            html.Div("Cases", classes="text-subtitle-2")
            v3.VSpacer()
            v3.VBtn("Rescan", click="trigger('review_rescan')", size="x-small", variant="text",
                    classes="rescan-button", disabled=("running",))
        with v3.VList(density="compact", classes="case-list", max_height=150, style="overflow-y: auto;"):
            with v3.VListItem(v_for="item in cases", key="item.index", click="case_index = item.index",
                              active=("item.index === case_index",), classes="case-item",
                              __properties=[("data_case", "data-case")], data_case=("item.name",)):
                with html.Div(classes="d-flex align-center"):
                    html.Span("{{ item.name }}", classes="text-body-2 case-name", style="flex: 1;")
                    v3.VChip("{{ item.status_text }}", size="x-small", color=("item.color",), classes="case-status")
                html.Div("{{ item.error }}", v_if="item.status === 'error' && item.error",
                         classes="text-caption text-red case-list-error", style="line-height: 1.2;")

        with html.Div(v_if="folder_problems.length", classes="mt-1 folder-problems"):
            html.Div("Ignored: {{ p }}", v_for="p in folder_problems", key="p", classes="text-caption text-amber")
        with html.Div(v_if="case_error", classes="mt-2"):
            v3.VAlert("{{ case_error }}", type="error", density="compact", variant="tonal", classes="case-error")
        with html.Div(v_if="heatmap_loading && !case_error", classes="mt-2"):
            v3.VAlert("Loading this finding's heatmap: the views show the image alone until it is in",
                      type="info", density="compact", variant="tonal", classes="heatmap-loading")
        with html.Div(v_if="heatmap_error && !case_error", classes="mt-2"):
            v3.VAlert("{{ heatmap_error }}", type="error", density="compact", variant="tonal", classes="heatmap-error")
        with html.Div(v_if="can_run && shown_case >= 0 && !has_heatmap && !running", classes="mt-2"):
            v3.VBtn("Run prediction", click="trigger('review_run')", color="primary", size="small",
                    block=True, classes="run-button")
        with html.Div(v_if="running", classes="mt-2"):
            html.Div("Running {{ cases[run_case] && cases[run_case].name }}: {{ run_message }}",
                     classes="text-caption run-message")
            v3.VProgressLinear(model_value=("run_progress",), color="amber", height=8, classes="run-progress")
            v3.VBtn("Cancel", click="trigger('review_cancel')", size="x-small", variant="text")
        with html.Div(v_if="!running && run_message", classes="text-caption text-grey mt-1 run-result"):
            html.Span("Last run: {{ run_message }}")
        with html.Div(v_if="!can_run && shown_case >= 0 && !has_heatmap && !case_error",
                      classes="text-caption text-grey mt-2"):
            html.Span("No results. Start the app with --backbone and --plugin to run cases from here.")

        v3.VDivider(classes="my-2")
        _build_findings()
        v3.VDivider(classes="my-2")
        _build_model_panel()
        with html.Div(v_if="rows.length"):
            v3.VDivider(classes="my-2")
            html.Div("Heatmap", classes="text-subtitle-2")
            with html.Div(classes="d-flex align-center"):
                html.Span("Opacity", classes="text-caption", style="width: 70px;")
                v3.VSlider(v_model=("opacity",), min=0, max=1, step=0.05, hide_details=True, density="compact",
                           classes="opacity-slider")
            with html.Div(classes="d-flex align-center"):
                html.Span("Threshold", classes="text-caption", style="width: 70px;")
                v3.VSlider(v_model=("threshold",), min=0, max=0.95, step=0.05, hide_details=True,
                           density="compact", classes="threshold-slider")
            with html.Div(classes="colorbar mt-1", style="position: relative;"):
                html.Div(style=("{ height: '12px', marginLeft: (threshold * 100) + '%', background: colorbar,"
                                " borderRadius: '2px' }",))  # the colour map spans [threshold, 1]
                html.Div(style=("{ position: 'absolute', top: 0, left: 0, height: '12px', width: (threshold * 100) + '%',"
                                " background: 'rgba(0,0,0,0.6)' }",))
                with html.Div(classes="d-flex text-caption text-grey"):
                    html.Span("0")
                    v3.VSpacer()
                    html.Span(COLORBAR_LABEL, classes="text-center colorbar-label",
                              title="the heatmap divided by its maximum in this case (inferno colour map, spread "
                                    "over [threshold, 1] and added to the image); shaded: under the threshold, "
                                    "nothing added")
                    v3.VSpacer()
                    html.Span("1")
        _build_window()
        with html.Div(v_if="rows.length"):
            html.Div("Slice importance", classes="text-subtitle-2 mt-2")
            with html.Div(classes="importance-chart-box", style="cursor: crosshair;", v_if="chart.lines.length",
                          click="trigger('review_chart_click', [$event.clientX - $event.currentTarget.getBoundingClientRect().left])"):
                _importance_chart()

        with html.Div(v_if="similarity_available && shown_case >= 0", classes="mt-2"):
            v3.VDivider(classes="my-2")
            with html.Div(classes="d-flex align-center"):
                html.Span("Similarity", classes="text-subtitle-2", style="flex: 1;",
                          title="click a slice view: cosine similarity of every voxel's PlaneCycle feature to "
                                "the clicked voxel's (the backbone's own features, no plugin)")
                v3.VBtn("{{ similarity_mode ? 'On: click a view' : 'Off' }}", size="x-small",
                        variant=("similarity_mode ? 'flat' : 'text'",), classes="similarity-toggle",
                        color=("similarity_mode ? 'primary' : undefined",),
                        click="similarity_mode = !similarity_mode")
            html.Div("{{ similarity_status }}", v_if="similarity_status", classes="text-caption similarity-status")
            v3.VProgressLinear(indeterminate=True, v_show="similarity_busy", color="amber", height=3,
                               classes="similarity-busy")
        v3.VDivider(classes="my-2")
        html.Div("3D view", classes="text-subtitle-2 threed-title",
                 title="the 3D view renders each heatmap averaged over blocks of voxels (at most 128 per axis; the "
                       "heatmap comes from a 14-16 pixel patch grid); the slice views show it at full resolution")
        with html.Div(classes="d-flex flex-wrap", style="gap: 4px;"):
            for action, label in (("left", "⟲ Rotate left"), ("right", "Rotate right ⟳"), ("up", "Tilt up"),
                                  ("down", "Tilt down"), ("zoom_in", "Zoom +"), ("zoom_out", "Zoom −"),
                                  ("anterior", "Anterior"), ("left_side", "Left"), ("superior", "Superior"),
                                  ("reset", "Reset")):
                v3.VBtn(label, click=f"trigger('review_camera', ['{action}'])", size="x-small",
                        classes=f"camera-{action}")

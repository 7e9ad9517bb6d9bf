"""The review page: trame-slicer views of the session's scene, the case list, findings table, chart and controls.

What the page can send, and what the server does with it (nothing else is exposed; see guard.py for the
access key, the Origin check and the RPCs that are refused):

- state (only these keys, each validated by the guard; anything else is refused and never reaches another tab):
  ``case_index`` (an index of the listing), ``row`` (a row of the findings table), ``threshold`` / ``opacity``
  (finite, clamped to [0, 1]), ``window_preset`` (one of WINDOW_PRESETS), the three slice sliders' values
  (trame-slicer), ``main_drawer`` (the side panel shown or not);
- triggers ``review_next`` / ``review_previous`` (keyboard), ``review_scroll(view, step)``, ``review_jump_maximum``,
  ``review_jump_important``, ``review_chart_click(x)``, ``review_camera(action)`` (one of CAMERA_ACTIONS),
  ``review_run`` (the built-in prediction on the shown case, refused when it has results), ``review_cancel``,
  ``review_rescan``;
- the views' mouse events (trame-slicer / trame-rca).

No state a page can set is ever rendered as HTML: the chart is SVG elements bound to numbers made here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import time

if not os.environ.get("DISPLAY"):
    # No X server: VTK's EGL window renders off screen on Mesa (llvmpipe) or a GPU, with no display.
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import slicer  # noqa: E402  (after trame_slicer, which brings slicer-core)
from trame.app import get_server  # noqa: E402
from trame.decorators import TrameApp, change, trigger  # noqa: E402
from trame.ui.vuetify3 import SinglePageWithDrawerLayout  # noqa: E402
from trame.widgets import client, html  # noqa: E402
from trame.widgets import vuetify3 as v3  # noqa: E402
from trame_server.utils.asynchronous import create_task  # noqa: E402
from trame_slicer import module as trame_slicer_module  # noqa: E402
from trame_slicer.core import LayoutManager, SlicerApp  # noqa: E402
from trame_slicer.rca_view import register_rca_factories  # noqa: E402
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition  # noqa: E402

from . import dicom_download  # noqa: E402
from .cases import CaseFolder, RecordError  # noqa: E402
from .chart import CHART_HEIGHT, CHART_WIDTH, chart_data, colorbar_gradient, slice_from_chart_x  # noqa: E402
from .guard import AccessGuard, boolean, finite_float, index_below, one_of  # noqa: E402
from .modelinfo import UNTRAINED, PluginInfoReader, image_modality, modality_name, modality_warnings, record_plugins  # noqa: E402
from .session import READ_WORKERS, WINDOW_PRESETS, ReviewSession, logic_outputs  # noqa: E402

logger = logging.getLogger("anymc3d.review")

LAYOUT_ID = "AnyMC3D review"
PREFETCH_IDLE_S = 1.2  # idle time of the page before neighbours are loaded
#: a cold case waits this long after its image for its first heatmap before it is shown without it (one frame
#: instead of two for a small heatmap; a 512x512x300 float heatmap takes more than a second to read)
HEATMAP_WAIT_S = 0.1
HEATMAP_WAIT_ENV = "ANYMC3D_REVIEW_HEATMAP_WAIT_S"  # sets it (tests: 0 shows every cold case's image first)
VIEW_TITLES = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal", "ThreeD": "3D"}
CAMERA_ACTIONS = ("left", "right", "up", "down", "zoom_in", "zoom_out", "reset", "anterior", "left_side", "superior")
COLORBAR_LABEL = "relative attention (per-case max = 1), not a probability"
STATUS_TEXT = {"results": "results", "none": "no results", "error": "error", "running": "running"}
STATUS_COLOR = {"results": "green", "none": "grey", "error": "red", "running": "amber"}

SLICE_VIEW_NAMES = ("Red", "Green", "Yellow")
# Keys: over a slice view, Up/Down scroll its slices (what readers expect of a viewer); n/p, PageDown/PageUp, and
# Up/Down anywhere else (the case list, the panel) change the case; m jumps to the heatmap's maximum.
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
    " else if (e.key === 'm') { trigger('review_jump_maximum'); } });"
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


def _slice_view_ui(server, view_id, view):
    from trame_slicer.app.ui import create_vertical_slice_view_gutter_ui

    create_vertical_slice_view_gutter_ui(server, view_id, view)
    _view_label(view_id, view)
    _orientation_overlay(view.get_singleton_tag())


def _orientation_overlay(name):
    """Anatomical letters at the view's edges and the slice number / position (server-made text, escaped by Vue)."""
    base = "position: absolute; color: #ffd54f; font: bold 13px sans-serif; pointer-events: none; text-shadow: 0 0 2px #000;"
    where = {"left": "left: 34px; top: 50%;", "right": "right: 8px; top: 50%;", "top": "top: 4px; left: 50%;",
             "bottom": "bottom: 28px; left: 50%;"}
    for edge, position in where.items():
        html.Div(f"{{{{ orientation.{name} && orientation.{name}.{edge} }}}}", classes=f"orientation orientation-{edge}",
                 style=base + position, __properties=[("data_view", "data-view")], data_view=name)
    html.Div(f"{{{{ orientation.{name} && orientation.{name}.slice }}}}", classes="slice-position",
             __properties=[("data_view", "data-view")], data_view=name,
             style="position: absolute; top: 4px; left: 34px; color: #ddd; font: 12px sans-serif; pointer-events: none;")


def _threed_view_ui(server, view_id, view):
    from trame_slicer.app.ui import create_vertical_view_gutter_ui

    create_vertical_view_gutter_ui(server, view_id, view)
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


@TrameApp()
class ReviewApp:
    """Args: folder (a CaseFolder or a path), backbone / plugins (for runs from the page), server (trame's)."""

    def __init__(self, folder, backbone=None, plugins=(), server=None, heatmap_method="attention", device="auto",
                 cache_size=4, preload=True, access_key=None, quiet_vtk=False):
        self.server = get_server(server, client_type="vue3")
        self.guard = AccessGuard(access_key)
        self.guard.install(self.server)
        dicom_download.install(self.server, lambda: self.folder)  # GET dicom/<case>: behind the guard's middleware
        self.server.enable_module(trame_slicer_module)
        self.folder = folder if isinstance(folder, CaseFolder) else CaseFolder(folder)
        self.plugin_reader = PluginInfoReader(self.folder.root, trusted=plugins)
        self._model_key = None
        self._image_modality: dict = {}
        self.slicer_app = SlicerApp()
        if quiet_vtk:  # SlicerApp installed a new VTK output window: VTK warnings off again (cli.quiet_vtk)
            from .cli import quiet_vtk as silence

            silence()
        register_rca_factories(self.slicer_app.view_manager, self.server, slice_view_ui_f=_slice_view_ui,
                               three_d_view_ui_f=_threed_view_ui, target_fps=20.0, blur_fps=20.0,
                               interactive_quality=90)  # = still quality: one render per change, not two
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout(LAYOUT_ID, review_layout())
        self.layout_manager.set_layout(LAYOUT_ID)
        self.session = ReviewSession(
            self.slicer_app.scene, self.slicer_app.volumes_logic,
            self.slicer_app.app_logic.GetModuleLogic("VolumeRendering"), self.folder, backbone=backbone,
            plugins=plugins, views=self.slicer_app.view_manager, cache_size=cache_size, device=device,
            heatmap_method=heatmap_method)
        for view in self.slicer_app.view_manager.get_threed_views():
            # Adaptive volume rendering quality: the ray caster's sample distance follows the expected frame rate
            # (about 4x faster than "Normal" on Mesa's llvmpipe, no visible difference for a smooth heatmap).
            view.get_view_node().SetVolumeRenderingQuality(slicer.vtkMRMLViewNode.Adaptive)
            view.get_view_node().SetExpectedFPS(8.0)
            # where the patient is: an orientation marker (axes) (trame-slicer's 3D view has Slicer's
            # vtkMRMLOrientationMarkerDisplayableManager)
            view.set_orientation_marker(slicer.vtkMRMLAbstractViewNode.OrientationMarkerTypeAxes,
                                        slicer.vtkMRMLAbstractViewNode.OrientationMarkerSizeSmall)
        for view in self.slicer_app.view_manager.get_slice_views():
            # the anatomy in 3D: the three CT planes (with their overlay) around the heatmap's volume rendering;
            # a scale bar in each slice view
            view.set_visible_in_3d(True)
            view.set_ruler(slicer.vtkMRMLAbstractViewNode.RulerTypeThin, slicer.vtkMRMLAbstractViewNode.RulerColorWhite)
        self._poll_task = None
        self._similarity_task = None
        self.similarity = None  # the Logic's SimilaritySession, made on the first click (needs --backbone)
        self._cursor_task = None
        self._prefetch_task = None
        self._reads = {}  # file path -> its pending read (a future): a file is read once however many ask
        self._read_pool = concurrent.futures.ThreadPoolExecutor(READ_WORKERS, thread_name_prefix="review-read")
        self._complete_tasks = {}  # case index -> the task reading its pending heatmaps
        self._maxima = {}  # (heatmap node ID, image MTime) -> its maximum voxel (IJK)
        self._last_activity = time.monotonic()
        self._server_ready = False
        self.server.controller.on_server_ready.add(self._on_server_ready)
        for view in self.slicer_app.view_manager.get_slice_views():
            view.modified.connect(self._on_slice_view_modified)
        self.guard.writable.update(self._writable_state())
        self._init_state()
        self._build_ui()
        self.prefetch = preload and os.environ.get("ANYMC3D_REVIEW_PREFETCH", "1") != "0"
        if preload and self.folder.cases:
            self._show(0, self.session.read_case_files(0))  # before any page connects: the first frame only waits
            # for rendering (its files read in parallel threads)
            for view in self.slicer_app.view_manager.get_views():
                view.render_window().Render()  # warm-up: shaders compiled, textures uploaded before the page asks

    @property
    def state(self):
        return self.server.state

    def _writable_state(self):
        """The only state keys a page may change, each with its validator (guard.AccessGuard)."""
        from trame_slicer.app.logic.slice_view_logic import get_view_slider_typed_state

        writable = {"case_index": index_below(lambda: len(self.folder.cases)),
                    "row": index_below(lambda: len(self.state.rows or [])),
                    "threshold": finite_float(0.0, 1.0), "opacity": finite_float(0.0, 1.0),
                    "window_preset": one_of(tuple(WINDOW_PRESETS)), "main_drawer": boolean,
                    "similarity_mode": boolean}
        for view in self.slicer_app.view_manager.get_slice_views():
            # the slice slider trame-slicer binds to each slice view (trame_slicer 2.0.0 app/logic/slice_view_logic.py)
            writable[get_view_slider_typed_state(self.server, view).name.value] = finite_float()
        return writable

    def close(self):
        """The server stopped: end a running backend and remove the run folders (session.close)."""
        if self.similarity is not None:
            self.similarity.cleanup()
        self._read_pool.shutdown(wait=False, cancel_futures=True)
        self.session.close()

    # State -------------------------------------------------------------------------------------------------

    def _init_state(self):
        s = self.state
        s.trame__title = "AnyMC3D review"
        s.folder_name = self.folder.root.name
        s.case_index = -1        # what the page asks for
        s.shown_case = -1        # what the scene shows
        s.scene_version = 0      # +1 after every scene change the page asked for (tests, benchmark)
        s.loaded_cases = []      # indices of the cases loaded in the scene (read only)
        s.case_error = ""
        s.heatmap_error = ""     # the shown finding's heatmap file could not be shown (a deferred read failed)
        s.heatmap_loading = False  # the shown finding's heatmap is still being read (the views show the image)
        s.loading = False
        s.rows = []
        s.row = 0
        s.threshold = self.session.display.threshold
        s.opacity = self.session.display.opacity
        s.colorbar = colorbar_gradient()
        s.chart = chart_data({}, None)
        s.chart_slices = 0
        s.window_preset = "auto"
        s.window_presets = [{"name": name, "title": preset[0]} for name, preset in WINDOW_PRESETS.items()]
        s.orientation = {}
        s.cursor_ijk = None
        s.maximum_ijk = None
        s.camera = None
        s.can_run = self.session.can_run
        s.running = False
        s.run_case = -1
        s.run_progress = 0
        s.run_message = ""
        s.has_heatmap = False
        s.similarity_available = bool(self.session.backbone)  # a click shows a seed-point similarity map
        s.similarity_mode = False
        s.similarity_busy = False
        s.similarity_status = ""
        s.similarity_version = 0  # +1 when a map is shown (tests)
        s.model_info = []        # per plugin of the shown case: text only (modelinfo.PluginInfo)
        s.model_warnings = []    # the image's modality does not fit a plugin
        s.image_modality = ""
        self._publish_cases()

    def _publish_cases(self):
        running = self.session.job_case if self.state.running else None
        self.state.cases = [{"index": c.index, "name": c.name,
                             "status": "running" if c.index == running else
                             ("error" if self.session.run_errors.get(c.index) or self.session.load_errors.get(c.index)
                              else c.status),
                             "error": self.session.case_error(c.index),
                             "dicom": bool(isinstance(c.record, dict) and c.record.get("dicom"))} for c in self.folder.cases]
        for item in self.state.cases:
            item["status_text"] = STATUS_TEXT[item["status"]]
            item["color"] = STATUS_COLOR[item["status"]]
        self.state.folder_problems = list(self.folder.problems)

    def _publish_scene(self):
        """Everything the page shows about the scene, after a change."""
        s, session = self.state, self.session
        rows = session.table_rows()
        s.rows = [{**r, "probability_text": f"{r['probability']:.4f}", "threshold_text": f"{r['threshold']:.2f}",
                   "raw_text": "" if r.get("raw") is None else f"{r['raw']:.4f}"} for r in rows]
        s.row = session.row
        s.has_heatmap = bool(rows)
        s.shown_case = session.current.index if session.current is not None else -1
        s.loaded_cases = sorted(session.loaded)  # cases kept in the scene (prefetched neighbours: instant switch)
        self._publish_cursor()
        heatmap = session.shown_heatmap()
        pending = logic_outputs.pendingHeatmapFile(heatmap) is not None
        s.maximum_ijk = self._maximum_ijk_of(heatmap) if heatmap is not None and not pending else None
        s.heatmap_error = session.heatmap_error()
        s.heatmap_loading = pending and not s.heatmap_error  # the views show the image until it is in
        self._publish_camera()
        self._publish_model()
        s.scene_version += 1

    def _publish_model(self):
        """The model information of the shown case's plugins (its record's, or the command line's for a case without
        results), and the modality warnings; recomputed only when the shown case or its record changes."""
        s, current = self.state, self.session.current
        case = self.folder.cases[current.index] if current is not None and current.index < len(self.folder.cases) else None
        key = (case.path, id(current.record), id(current.input_node)) if case is not None else None
        if key == self._model_key:
            return
        self._model_key = key
        if case is None:
            s.model_info, s.model_warnings = [], []
            return
        named = record_plugins(current.record) if current.record is not None else \
            [(str(p), "") for p in self.session.plugins]
        infos = [self.plugin_reader.read(path, name) for path, name in named]
        if case.path not in self._image_modality:
            self._image_modality[case.path] = image_modality(case.path)
        code, source = self._image_modality[case.path]
        has_image = current.input_node is not None and current.input_node.GetImageData() is not None
        scalar_range = logic_outputs.valueRangeOf(current.input_node) if has_image else None
        s.model_warnings = modality_warnings(infos, code, source, scalar_range)
        items = []
        for info in infos:
            item = info.as_state()
            item["modality_text"] = (f"{modality_name(info.modality)} ({info.modality_source})" if info.modality
                                     else ("not stated" if info.opened else ""))
            item["for_run"] = current.record is None
            items.append(item)
        s.model_info = items
        s.image_modality = f"{modality_name(code)} ({source})" if code else "not stated by the file"

    def _publish_cursor(self):
        s, session = self.state, self.session
        s.cursor_ijk = session.cursor_ijk()
        axis, series = session.importance()
        current = s.cursor_ijk[axis] if (s.cursor_ijk and axis is not None) else None
        s.chart = chart_data(series, axis, current)
        s.chart_slices = self._chart_slices = max((len(v) for v in series.values()), default=0)
        s.orientation = self.session.orientation()

    def _maximum_ijk_of(self, heatmap):
        """The heatmap's maximum voxel, found once per heatmap node (a pass over every voxel: 0.1 s at 512x512x300,
        at every switch otherwise); a result volume never changes once loaded."""
        key = (heatmap.GetID(), heatmap.GetImageData().GetMTime())
        if key not in self._maxima:
            if len(self._maxima) > 64:
                self._maxima.clear()
            self._maxima[key] = self._maximum_ijk(heatmap)
        return self._maxima[key]

    @staticmethod
    def _maximum_ijk(heatmap):
        import numpy as np
        from AnyMC3DSlicerLogic import outputs

        voxels = outputs.arrayFromVolumeNode(heatmap)
        k, j, i = np.unravel_index(int(np.argmax(voxels)), voxels.shape)
        return [int(i), int(j), int(k)]

    def _publish_camera(self):
        views = self.slicer_app.view_manager.get_threed_views()
        camera_node = views[0].get_camera_node() if views else None
        if camera_node is not None:
            self.state.camera = [round(x, 2) for x in camera_node.GetPosition()]

    # Case selection ----------------------------------------------------------------------------------------

    def _show(self, index, preread=None, defer=False):
        s = self.state
        self._drop_similarity_maps()
        try:
            self.session.show_case(index, preread, defer)
            s.case_error = self.session.case_error(index) if self.session.current.outputs is None else ""
        except Exception as error:  # noqa: BLE001 - a case that cannot be shown says why; the list goes on
            if not isinstance(error, RecordError):
                logger.exception("cannot show case %s", index)
            s.case_error = str(error) or type(error).__name__
            s.shown_case = -1
            self._clear_views()
            self._publish_cases()  # the list shows the case's error from now on
        s.case_index = index
        self._publish_scene()
        self._schedule_prefetch()

    def _schedule_prefetch(self):
        """When the page is idle, load the next and previous cases (a keyboard step is then a warm switch)."""
        if not self.prefetch or not self._server_ready:
            return
        if self._prefetch_task is not None and not self._prefetch_task.done():
            self._prefetch_task.cancel()
        self._prefetch_task = create_task(self._prefetch_neighbours(self.state.case_index))

    async def _prefetch_neighbours(self, index):
        while time.monotonic() - self._last_activity < PREFETCH_IDLE_S:  # after the shown case's frames are out
            await asyncio.sleep(0.2)
        for neighbour in self.session.neighbours():
            if self.state.case_index != index or self.state.loading or self.state.running:
                return
            if neighbour in self.session.loaded or neighbour in self.session.prefetch_failed:
                continue
            # the files are read in threads (the page is served meanwhile); only the nodes are made here
            preread = await self._read_case(neighbour)
            if self.state.case_index != index or self.state.loading or self.state.running:
                return
            views = self.slicer_app.view_manager.get_views()
            blocked = [view.set_render_blocked(True) for view in views]
            try:
                loaded = self.session.prefetch(neighbour, preread)
            finally:
                for view, was_blocked in zip(views, blocked):
                    if not was_blocked:
                        view._is_render_blocked = False  # unblock without a render: the shown image did not change
            if loaded:
                with self.state:
                    self.state.loaded_cases = sorted(self.session.loaded)
                await asyncio.sleep(0.2)

    def _clear_views(self):
        """A case that cannot be shown: empty views (never the previous case's images under this case's name)."""
        session = self.session
        for loaded in session.loaded.values():
            session._set_volume_rendering_visible(loaded, False)
        from AnyMC3DSlicerLogic import outputs

        for composite in outputs.nodesByClass(session.scene, "vtkMRMLSliceCompositeNode"):
            composite.SetBackgroundVolumeID(None)
            composite.SetForegroundVolumeID(None)
        session.current = None

    @change("case_index")
    def _on_case_index(self, case_index, **_):
        self._touch()
        if not isinstance(case_index, int) or isinstance(case_index, bool) or not 0 <= case_index < len(self.folder.cases):
            self.state.case_index = self.state.shown_case  # refused: only indices of the listing
            return
        if case_index == self.state.shown_case and not self.state.case_error:
            return
        self.state.loading = True
        self._drop_reads_except(case_index)
        create_task(self._show_async(case_index))

    def _drop_reads_except(self, index):
        """Another case was asked for: reads queued for other cases (prefetch, deferred heatmaps) that have not
        started are dropped, so that this case's files are read next (a read already running finishes)."""
        try:
            keep = set(self.session.case_files(index))
        except (RecordError, ValueError, OSError, IndexError):
            keep = set()
        for other, task in list(self._complete_tasks.items()):
            if other != index:
                task.cancel()
        for path, future in list(self._reads.items()):
            if path not in keep:
                future.cancel()

    def _read_file(self, path, image=False):
        """The pending read of one file (session.read_file in the read threads); a file already being read (a
        neighbour's prefetch, a deferred heatmap) is not read twice."""
        future = self._reads.get(path)
        if future is None:
            future = asyncio.get_running_loop().run_in_executor(self._read_pool, self.session.read_file, path, image)
            self._reads[path] = future
            future.add_done_callback(lambda done: self._reads.pop(path, None) if self._reads.get(path) is done else None)
        return future

    def _start_reads(self, index, first=False):
        """``(files, reads)``: the reads (shielded futures) of case ``index``'s files (``first``: the image and the
        heatmap shown first only), started in the read threads; the image is read with its window."""
        try:
            files = self.session.case_files(index, first)
        except (RecordError, ValueError, OSError, IndexError):
            return [], []
        return files, [asyncio.shield(self._read_file(path, image=n == 0)) for n, path in enumerate(files)]

    @staticmethod
    def _read_results(files, reads):
        """``{path: VolumeData}`` of the reads that are done and gave a volume."""
        return {path: read.result() for path, read in zip(files, reads)
                if read.done() and not read.cancelled() and read.result() is not None}

    async def _read_case(self, index):
        """``{path: VolumeData}`` of every file of case ``index``, read in the read threads (the page is served
        meanwhile)."""
        files, reads = self._start_reads(index)
        await asyncio.gather(*reads)
        return self._read_results(files, reads)

    async def _show_async(self, index):
        await asyncio.sleep(0)  # let the "loading" state reach the page first
        preread, cold = None, index not in self.session.loaded
        try:
            if cold:  # the image (and the shown finding's heatmap when it is in soon after); the others after the frame
                preread = await self._read_first(index)
        except asyncio.CancelledError:  # its reads were dropped for a newer switch: that one shows its case
            return
        with self.state:
            if index == self.state.case_index:
                self._show(index, preread, defer=cold)
            self.state.loading = False
        loaded = self.session.loaded.get(index)
        if loaded is not None and loaded.pending_files() and index not in self._complete_tasks:
            self._complete_tasks[index] = create_task(self._complete_pending(index))

    async def _read_first(self, index):
        """What a cold case is first shown with: its image, and its first finding's heatmap if that is read within
        HEATMAP_WAIT_S after the image (both read at once in the read threads: measured on two shared cores, this
        shows the heatmap 0.5 s sooner than reading the image alone first, and the image as soon). A heatmap not in
        by then is shown when it is (the page says it is loading): the reader sees the case without waiting for it."""
        files, reads = self._start_reads(index, first=True)
        if not reads:
            return {}
        await asyncio.wait(reads[:1])
        if reads[0].cancelled():
            raise asyncio.CancelledError
        if len(reads) > 1:
            await asyncio.wait(reads[1:], timeout=float(os.environ.get(HEATMAP_WAIT_ENV, HEATMAP_WAIT_S)))
        return self._read_results(files, reads)

    async def _complete_pending(self, index):
        """Read the heatmaps a deferred load left pending (one at a time in the read threads; the shown finding's
        first, then in row order) and give them to their nodes; the page is told when the shown finding's arrives."""
        loaded = self.session.loaded.get(index)
        try:
            files = loaded.pending_files() if loaded is not None else []
            shown = logic_outputs.pendingHeatmapFile(self.session.shown_heatmap()) if self.session.current is loaded else None
            files.sort(key=lambda path: path != shown)
            for path in files:  # one at a time: two large reads at once slow the shown one down
                data = await asyncio.shield(self._read_file(path))
                if self.session.loaded.get(index) is not loaded:
                    return  # unloaded meanwhile
                with self.state:
                    shown = self.session.current is loaded and logic_outputs.pendingHeatmapFile(self.session.shown_heatmap()) == path
                    self.session.complete_heatmap(index, path, data)
                    if shown:
                        self._publish_scene()
                        self._render_slice_views()
        except asyncio.CancelledError:
            pass  # another case was asked for: the rest is read when this case is shown again
        finally:
            if self._complete_tasks.get(index) is asyncio.current_task():
                self._complete_tasks.pop(index)

    async def _select_pending(self, row):
        """A finding whose heatmap is still being read: show it once its file is in (the page shows "loading")."""
        loaded = self.session.current
        path = logic_outputs.pendingHeatmapFile(self.session.logic.heatmapNodeForRow(loaded.table_node, row))
        self.state.loading = True
        self.state.flush()
        try:
            data = await asyncio.shield(self._read_file(path))
        except asyncio.CancelledError:
            data = None  # dropped for a case switch: read below if this case is still shown
        with self.state:
            if self.session.current is loaded:
                self.session.complete_heatmap(loaded.index, path, data)
                if self.state.row == row:
                    self.session.select_finding(row)
                    self._publish_scene()
            self.state.loading = False

    @trigger("review_next")
    def _next(self):
        self._step(+1)

    @trigger("review_previous")
    def _previous(self):
        self._step(-1)

    def _step(self, delta):
        if self.folder.cases:
            current = self.state.case_index if self.state.case_index >= 0 else 0
            self.state.case_index = (current + delta) % len(self.folder.cases)

    # Findings and display ----------------------------------------------------------------------------------

    @change("row")
    def _on_row(self, row, **_):
        self._touch()
        if row == self.session.row or self.session.current is None or self.session.current.outputs is None:
            return
        try:
            heatmap = self.session.heatmap_for_row(row)
        except RecordError:
            self.state.row = self.session.row
            return
        path = logic_outputs.pendingHeatmapFile(heatmap)
        if path and path not in self.session.heatmap_errors:
            create_task(self._select_pending(row))
            return
        self.session.select_finding(row)
        self._publish_scene()

    @change("threshold")
    def _on_threshold(self, threshold, **_):
        self._slider("threshold", threshold, self.session.set_threshold)

    @change("opacity")
    def _on_opacity(self, opacity, **_):
        self._slider("opacity", opacity, self.session.set_opacity)

    @change("window_preset")
    def _on_window_preset(self, window_preset, **_):
        self._touch()
        if window_preset not in WINDOW_PRESETS:
            self.state.window_preset = self.session.window_preset
            return
        if window_preset != self.session.window_preset:
            self.session.set_window_preset(window_preset)
            self._render_slice_views()
            self.state.scene_version += 1

    def _render_slice_views(self):
        """A display property changed (opacity, window): the views' next frame must show it now."""
        for view in self.slicer_app.view_manager.get_views():
            view.schedule_render()

    def _slider(self, name, raw, apply):
        """Apply a finite slider value from the page; anything else puts the shown value back."""
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = float("nan")
        current = getattr(self.session.display, name)
        if not math.isfinite(value):
            self.state[name] = current
        elif value != current:
            self._touch()
            apply(value)
            self._render_slice_views()

    @trigger("review_jump_maximum")
    def _jump_maximum(self):
        self._touch()
        if self.session.jump_to_maximum() is not None:
            self._publish_scene()

    @trigger("review_scroll")
    def _scroll(self, view_name, step):
        """Up/Down over a slice view: one slice further (step +1) or back (-1)."""
        self._touch()
        if view_name not in SLICE_VIEW_NAMES or step not in (1, -1):
            return
        if self.session.scroll(view_name, step) is not None:
            self._publish_cursor()
            self.state.scene_version += 1

    @trigger("review_rescan")
    def _rescan(self):
        """List the folder again (files added or removed while the server runs); the shown case stays."""
        self._touch()
        if self.state.running:
            return
        shown = self.folder.cases[self.session.current.index].path if self.session.current is not None else None
        for task in self._complete_tasks.values():  # indices move: pending heatmaps are read again below
            task.cancel()
        self.session.rescan()
        self._publish_cases()
        current = self.session.current
        if current is not None and current.pending_files():
            self._complete_tasks[current.index] = create_task(self._complete_pending(current.index))
        if shown is not None:
            index = next((c.index for c in self.folder.cases if c.path == shown), -1)
            self.state.case_index = self.state.shown_case = index
        self.state.scene_version += 1

    @trigger("review_jump_important")
    def _jump_important(self):
        if self.session.jump_to_most_important_slice() is not None:
            self._publish_scene()

    @trigger("review_chart_click")
    def _chart_click(self, offset_x):
        try:
            index = slice_from_chart_x(float(offset_x), self._chart_slices)
        except (TypeError, ValueError):
            return
        if self.session.jump_to_slice(index) is not None:
            self._publish_scene()

    def _on_server_ready(self, **_):
        self._server_ready = True

    def _touch(self):
        """The page did something: background work (prefetch) waits until it has been idle for a while."""
        self._last_activity = time.monotonic()

    @trigger("review_hello")
    def _hello(self):
        """A page was opened: once its first frames are out, load the neighbours of the shown case."""
        self._touch()
        self._schedule_prefetch()

    def _on_slice_view_modified(self, *_):
        """A slice moved (slider, mouse): refresh the cursor and the chart marker, at most every 0.2 s."""
        if not self._server_ready:
            return
        if self._cursor_task is None or self._cursor_task.done():
            self._cursor_task = create_task(self._publish_cursor_later())

    async def _publish_cursor_later(self):
        await asyncio.sleep(0.2)
        with self.state:
            self._publish_cursor()

    @trigger("review_camera")
    def _camera(self, action):
        self._touch()
        if action not in CAMERA_ACTIONS:
            return
        views = self.slicer_app.view_manager.get_threed_views()
        if not views:
            return
        view = views[0]
        camera_node = view.get_camera_node()
        if action == "reset":
            view.reset_view()
        elif action in ("anterior", "left_side", "superior"):
            from trame_slicer.views.threed_view import ViewDirection

            view.rotate_to_view_direction({"anterior": ViewDirection.ANTERIOR, "left_side": ViewDirection.LEFT,
                                           "superior": ViewDirection.SUPERIOR}[action])
        elif action in ("zoom_in", "zoom_out"):
            view.zoom_in() if action == "zoom_in" else view.zoom_out()
        elif camera_node is not None:
            camera = camera_node.GetCamera()
            if action in ("left", "right"):
                camera.Azimuth(30.0 if action == "left" else -30.0)
            else:
                camera.Elevation(30.0 if action == "up" else -30.0)
            camera.OrthogonalizeViewUp()
            camera_node.ResetClippingRange()
        view.schedule_render()
        self._publish_camera()
        self.state.scene_version += 1

    # Similarity ---------------------------------------------------------------------------------------------

    @trigger("review_similarity")
    def _similarity_click(self, view_name, fx, fy):
        """A click on a slice view in similarity mode: the seed-point similarity map of the clicked voxel (the
        Logic's SimilaritySession: ``anymc3d similarity`` in the background, PlaneCycle features cached per volume),
        shown as the slice views' overlay. The page stays live: the process runs outside the server, polled."""
        self._touch()
        try:
            fx, fy = float(fx), float(fy)
        except (TypeError, ValueError):
            return
        s = self.state
        if view_name not in SLICE_VIEW_NAMES or not (0.0 <= fx <= 1.0 and 0.0 <= fy <= 1.0) or not s.similarity_mode:
            return
        current = self.session.current
        if not self.session.backbone or current is None:
            return
        if self.state.running:
            s.similarity_status = "busy: a prediction is running; click again when it has finished"
            return
        view = next((v for v in self.slicer_app.view_manager.get_slice_views() if v.get_singleton_tag() == view_name), None)
        if view is None:
            return
        width, height = view.render_window().GetSize()
        ras = view.get_view_node().GetXYToRAS().MultiplyPoint([fx * width, (1.0 - fy) * height, 0.0, 1.0])[:3]
        session = self._similarity_session()
        s.similarity_busy, s.similarity_status = True, "computing the similarity map (PlaneCycle features)…"
        session.request(current.input_node, ras, self._on_similarity)
        if self._similarity_task is None or self._similarity_task.done():
            self._similarity_task = create_task(self._poll_similarity())

    def _drop_similarity_maps(self):
        """A similarity map belongs to the shown case and the click: a case switch removes it (and its nodes)."""
        if self.similarity is None:
            return
        from AnyMC3DSlicerLogic import outputs

        self.similarity.cancel()
        for loaded in self.session.loaded.values():
            for node in self.similarity.similarityNodes(loaded.input_node):
                outputs.removeNode(self.session.scene, node)
        self.state.similarity_status = ""

    def _similarity_session(self):
        from AnyMC3DSlicerLogic.similarity import SimilarityOptions, SimilaritySession

        if self.similarity is None:
            from anymc3d.plugin_file import read_plugin_json

            size = read_plugin_json(self.session.plugins[0])["backbone"]["img_size"] if self.session.plugins else 224
            self.similarity = SimilaritySession(self.session.logic, self.session.backbone,
                                                SimilarityOptions(device=self.session.device, inputSize=int(size)))
        return self.similarity

    async def _poll_similarity(self):
        while True:
            with self.state:
                session = self.similarity
                if session is None or (session.job is None and session.pending is None):
                    self.state.similarity_busy = False
                    break
                self.session.logic.runner.processEvents(0)
            await asyncio.sleep(0.1)

    def _on_similarity(self, result):
        s = self.state
        if result.status == "ok":
            seed = ",".join(str(v) for v in result.ijk)
            s.similarity_status = f"similarity to voxel ({seed}) shown" + (" (features cached)" if result.cacheHit else "")
            s.similarity_version += 1
            self._render_slice_views()
            s.scene_version += 1
        elif result.status == "cancelled":
            s.similarity_status = "replaced by a newer click"
        else:
            s.similarity_status = f"failed: {result.message}"

    # Runs --------------------------------------------------------------------------------------------------

    @trigger("review_run")
    def _run(self):
        current = self.session.current  # the case the scene shows (never a value sent by the page)
        if self.state.running or not self.session.can_run or current is None:
            return
        if self.state.similarity_busy:
            self.state.run_message = "busy: a similarity map is being computed; run again when it has finished"
            return
        index = current.index
        try:
            self.session.start_run(index, self._on_progress, self._on_finished)
        except RecordError as error:
            logger.warning("run refused: %s", error)
            self.state.run_message = str(error)
            return
        self.state.running, self.state.run_case = True, index
        self.state.run_progress, self.state.run_message = 0, "Starting the backend"
        self._publish_cases()
        self._poll_task = create_task(self._poll())

    @trigger("review_cancel")
    def _cancel(self):
        self.session.cancel_run()

    async def _poll(self):
        while True:
            with self.state:
                busy = self.session.poll()
            if not busy:
                break
            await asyncio.sleep(0.1)

    def _on_progress(self, progress):
        self.state.run_progress = round(100 * progress.fraction)
        self.state.run_message = progress.message

    def _on_finished(self, result):
        s = self.state
        s.running = False
        s.run_message = "Done" if result.status == "ok" else f"{result.status}: {result.message}"
        s.run_progress = 100 if result.status == "ok" else 0
        self._publish_cases()
        if s.shown_case == s.run_case or s.case_index == s.run_case:
            index = s.run_case
            s.case_error = "" if result.status == "ok" else self.session.case_error(index)
            if result.status == "ok":
                s.shown_case = -1
                self._show(index)
        self._publish_scene()

    # Page --------------------------------------------------------------------------------------------------

    def _build_ui(self):
        with SinglePageWithDrawerLayout(self.server, theme="dark", full_height=True) as layout:
            layout.title.set_text("AnyMC3D review")
            layout.root.classes = "anymc3d-review"
            client.ClientTriggers(mounted=KEYBOARD_JS)
            client.Style(
                ".anymc3d-review .v-navigation-drawer__content { overflow-y: auto; }"
                " .findings-table tr.selected td { background: rgba(255,255,255,0.12); }"
                " .findings-table td, .findings-table th { padding: 0 6px !important; height: 26px !important; }"
                " .case-list .v-list-item { min-height: 30px !important; }")
            with layout.toolbar:
                html.Div("{{ folder_name }}", classes="text-caption text-grey ml-2")
                html.Div("one shared view: every open tab shows the same case", classes="text-caption text-grey ml-4",
                         title="all tabs of this address share one scene; a case switch in one moves the others")
                v3.VSpacer()
                html.Div("n/p (or ↑/↓ outside the views): next / previous case · ↑/↓ over a view: slices · "
                         "m: jump to the maximum",
                         classes="text-caption text-grey mr-4")
                v3.VProgressLinear(indeterminate=True, absolute=True, location="bottom", color="amber",
                                   v_show="loading || heatmap_loading", classes="loading-bar")
            with layout.drawer as drawer:
                drawer.width = 360
                self._build_panel()
            with layout.content:
                with html.Div(style="position: relative; width: 100%; display: flex;"
                                    " height: calc(100vh - var(--v-layout-top, 64px) - var(--v-layout-bottom, 0px));"):
                    self.layout_manager.initialize_layout_grid(layout)
        self.ui = layout

    def _build_model_panel(self):
        """Per plugin: name, version, backbone, intended modality / body part, training summary (text only)."""
        with html.Div(v_if="model_info.length", classes="model-info mb-2"):
            html.Div("Model", classes="text-subtitle-2")
            html.Div("plugins a run from here would use", v_if="model_info.length && model_info[0].for_run",
                     classes="text-caption text-grey")
            with html.Div(v_for="m in model_info", key="m.path + m.name", classes="model-plugin text-caption mb-1"):
                html.Div("{{ m.name }}", classes="text-body-2 model-name")
                v3.VAlert(UNTRAINED, v_if="m.trained === false", type="error", density="compact", variant="flat",
                          classes="untrained-warning my-1",
                          title="the plugin carries no training summary: its weights were not trained by anymc3d train")
                html.Div("{{ m.problem }}", v_if="m.problem", classes="text-amber model-problem")
                html.Div("version: {{ m.version }}", v_if="m.version", classes="model-version")
                html.Div("backbone: {{ m.backbone }}", v_if="m.backbone", classes="model-backbone")
                html.Div("intended modality: {{ m.modality_text }}", v_if="m.modality_text", classes="model-modality")
                html.Div("body part: {{ m.body_part }}", v_if="m.body_part", classes="model-body-part")
                html.Div("training: {{ line }}", v_for="line in m.training", key="line", classes="model-training")
                html.Div("{{ m.description }}", v_if="m.description", classes="text-grey model-description")
        html.Div("image modality: {{ image_modality }}", v_if="shown_case >= 0 && image_modality",
                 classes="text-caption image-modality")

    def _build_panel(self):
        with html.Div(classes="pa-2"):
            with html.Div(classes="d-flex align-center"):
                html.Div("Cases", classes="text-subtitle-2")
                v3.VSpacer()
                v3.VBtn("Rescan", click="trigger('review_rescan')", size="x-small", variant="text",
                        classes="rescan-button", disabled=("running",))
            with v3.VList(density="compact", classes="case-list", max_height=220, style="overflow-y: auto;"):
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

            with html.Div(classes="d-flex align-center flex-wrap mt-2", style="gap: 2px;", v_if="shown_case >= 0"):
                html.Span("Window", classes="text-caption", style="width: 56px;",
                          title="window/level of the image in the slice views (CT presets in HU)")
                v3.VBtn("{{ p.title }}", v_for="p in window_presets", key="p.name", size="x-small",
                        variant=("window_preset === p.name ? 'flat' : 'text'",),
                        color=("window_preset === p.name ? 'primary' : undefined",),
                        click="window_preset = p.name", classes=("'window-preset window-' + p.name",))
            v3.VDivider(classes="my-2")
            self._build_model_panel()
            html.Div("Findings", classes="text-subtitle-2")
            with html.Div(v_for="w in model_warnings", key="w", classes="mb-1"):
                v3.VAlert("{{ w }}", type="warning", density="compact", variant="tonal", classes="modality-warning")
            with html.Div(v_if="rows.length && model_info.some(m => m.trained === false)", classes="mb-1"):
                v3.VAlert(f"{UNTRAINED} (a plugin of these findings was not trained)", type="error",
                          density="compact", variant="flat", classes="untrained-findings")
            with v3.VTable(density="compact", classes="findings-table", v_if="rows.length"):
                with html.Thead():
                    with html.Tr():
                        html.Th("Plugin", v_if="new Set(rows.map(r => r.plugin)).size > 1")
                        html.Th("Finding")
                        html.Th("Calibrated", title="Platt-calibrated probability (what the decision uses)")
                        html.Th("Raw", title="the head's uncalibrated probability")
                        html.Th("Threshold")
                        html.Th("Decision", title="calibrated probability >= threshold (checked, not copied)")
                with html.Tbody():
                    with html.Tr(v_for="r in rows", key="r.row", click="row = r.row",
                                 classes=("r.row === row ? 'finding-row selected' : 'finding-row'",),
                                 style="cursor: pointer;"):
                        html.Td("{{ r.plugin }}", v_if="new Set(rows.map(r => r.plugin)).size > 1")
                        html.Td("{{ r.finding }}", classes="finding-label")
                        html.Td("{{ r.probability_text }}", classes="finding-probability")
                        html.Td("{{ r.raw_text }}", classes="finding-raw text-grey")
                        html.Td("{{ r.threshold_text }}", classes="finding-threshold")
                        with html.Td(classes="finding-decision"):
                            v3.VChip("{{ r.decision }}", size="x-small",
                                     color=("r.decision === 'positive' ? 'red' : 'grey'",))
            html.Div("No findings for this case.", v_if="!rows.length", classes="text-caption text-grey")
            dicom_download.link(html)

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
                    html.Div(style=("{ height: '12px', background: colorbar, borderRadius: '2px' }",))
                    html.Div(style=("{ position: 'absolute', top: 0, left: 0, height: '12px', width: (threshold * 100) + '%',"
                                    " background: 'rgba(0,0,0,0.6)' }",))
                    with html.Div(classes="d-flex text-caption text-grey"):
                        html.Span("0")
                        v3.VSpacer()
                        html.Span(COLORBAR_LABEL, classes="text-center colorbar-label",
                                  title="the heatmap divided by its maximum in this case (inferno colour map); "
                                        "shaded: under the threshold, not drawn")
                        v3.VSpacer()
                        html.Span("1")
                with html.Div(classes="d-flex mt-1", style="gap: 4px;"):
                    v3.VBtn("Jump to maximum", click="trigger('review_jump_maximum')", size="small",
                            classes="jump-maximum")
                    v3.VBtn("Most important slice", click="trigger('review_jump_important')", size="small",
                            classes="jump-important")
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

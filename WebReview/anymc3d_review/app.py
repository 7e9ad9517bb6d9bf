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
import logging
import math
import os

if not os.environ.get("DISPLAY"):
    # No X server: VTK's EGL window renders off screen on Mesa (llvmpipe) or a GPU, with no display.
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import slicer  # noqa: E402  (after trame_slicer, which brings slicer-core)
from trame.app import get_server  # noqa: E402
from trame.decorators import TrameApp, change, trigger  # noqa: E402
from trame_server.utils.asynchronous import create_task  # noqa: E402
from trame_slicer import module as trame_slicer_module  # noqa: E402
from trame_slicer.core import LayoutManager, SlicerApp  # noqa: E402
from trame_slicer.rca_view import register_rca_factories  # noqa: E402

from . import dicom_download  # noqa: E402
from .cases import CaseFolder, RecordError  # noqa: E402
from .chart import slice_from_chart_x  # noqa: E402
from .guard import AccessGuard, boolean, finite_float, index_below, one_of  # noqa: E402
from .layout import LAYOUT_ID, SLICE_VIEW_NAMES, build_ui, review_layout, slice_view_ui, threed_view_ui  # noqa: E402
from .loader import CaseLoader  # noqa: E402
from .modelinfo import PluginInfoReader  # noqa: E402
from .publish import StatePublisher  # noqa: E402
from .quiet import quiet_vtk as silence_vtk  # noqa: E402
from .session import ALL_PRESETS, ReviewSession, logic_outputs  # noqa: E402
from .similarity import SimilarityController  # noqa: E402

logger = logging.getLogger("anymc3d.review")

CAMERA_ACTIONS = ("left", "right", "up", "down", "zoom_in", "zoom_out", "reset", "anterior", "left_side", "superior")


@TrameApp()
class ReviewApp(StatePublisher):
    """Args: folder (a CaseFolder or a path), backbone / plugins (for runs from the page), server (trame's)."""

    def __init__(self, folder, backbone=None, plugins=(), server=None, heatmap_method="auto", device="auto",
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
        if quiet_vtk:  # SlicerApp installed a new VTK output window: VTK warnings off again
            silence_vtk()
        register_rca_factories(self.slicer_app.view_manager, self.server, slice_view_ui_f=slice_view_ui,
                               three_d_view_ui_f=threed_view_ui, target_fps=20.0, blur_fps=20.0,
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
        # a left-drag in a slice view adjusts window/level as in Slicer's "Adjust window/level" mouse mode
        # (vtkMRMLWindowLevelWidget: horizontal = window, vertical = level); the 3D view's camera widget
        # does not depend on the mode
        for interaction in logic_outputs.nodesByClass(self.slicer_app.scene, "vtkMRMLInteractionNode"):
            interaction.SetCurrentInteractionMode(slicer.vtkMRMLInteractionNode.AdjustWindowLevel)
        for view in self.slicer_app.view_manager.get_slice_views():
            # the anatomy in 3D: the three CT planes (with their overlay) around the heatmap's volume rendering;
            # a scale bar in each slice view
            view.set_visible_in_3d(True)
            view.set_ruler(slicer.vtkMRMLAbstractViewNode.RulerTypeThin, slicer.vtkMRMLAbstractViewNode.RulerColorWhite)
            # a drag sets the image's window, never the heatmap's (Slicer would pick the foreground where it is
            # drawn: vtkMRMLSliceLogic::GetEditableLayerAtWorldPosition)
            view.get_displayable_manager_by_class(slicer.vtkMRMLScalarBarDisplayableManager) \
                .SetAdjustForegroundWindowLevelEnabled(False)
        self._poll_task = None
        self._cursor_task = None
        self._window_task = None
        self._observed_display = (None, None)  # (display node, observer tag) of the shown image
        self._maxima = {}  # (heatmap node ID, image MTime) -> its maximum voxel (IJK)
        self.similarity = SimilarityController(self.state, self.session, self.slicer_app.view_manager,
                                               self._render_slice_views)
        self.loader = CaseLoader(self.session, self.state, self.slicer_app.view_manager.get_views,
                                 self._on_shown_heatmap,
                                 prefetch=preload and os.environ.get("ANYMC3D_REVIEW_PREFETCH", "1") != "0")
        self.server.controller.on_server_ready.add(self._on_server_ready)
        for view in self.slicer_app.view_manager.get_slice_views():
            view.modified.connect(self._on_slice_view_modified)
        self.guard.writable.update(self._writable_state())
        self._init_state()
        self.ui = build_ui(self.server, self.layout_manager)
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
                    "window_preset": one_of(ALL_PRESETS), "main_drawer": boolean,
                    "similarity_mode": boolean, "overlay_visible": boolean, "window_width": finite_float(1e-3),
                    "window_level": finite_float(), "probability_details": boolean, "model_details": boolean}
        for view in self.slicer_app.view_manager.get_slice_views():
            # the slice slider trame-slicer binds to each slice view (trame_slicer 2.0.0 app/logic/slice_view_logic.py)
            writable[get_view_slider_typed_state(self.server, view).name.value] = finite_float()
        return writable

    def close(self):
        """The server stopped: end a running backend and remove the run folders (session.close)."""
        self.similarity.close()
        self.loader.close()
        self.session.close()

    # Case selection ----------------------------------------------------------------------------------------

    def _show(self, index, preread=None, defer=False):
        s = self.state
        self.similarity.drop_maps()
        self.session.hide_crosshair()  # it marked a place in the previous case
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
        self._observe_window()
        self._publish_scene()
        self.loader.schedule_prefetch()

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
        self.loader.touch()
        if not isinstance(case_index, int) or isinstance(case_index, bool) or not 0 <= case_index < len(self.folder.cases):
            self.state.case_index = self.state.shown_case  # refused: only indices of the listing
            return
        if case_index == self.state.shown_case and not self.state.case_error:
            return
        self.state.loading = True
        self.loader.drop_reads_except(case_index)
        create_task(self._show_async(case_index))

    async def _show_async(self, index):
        await asyncio.sleep(0)  # let the "loading" state reach the page first
        preread, cold = None, index not in self.session.loaded
        try:
            if cold:  # the image (and the shown finding's heatmap when it is in soon after); the others after the frame
                preread = await self.loader.read_first(index)
        except asyncio.CancelledError:  # its reads were dropped for a newer switch: that one shows its case
            return
        with self.state:
            if index == self.state.case_index:
                self._show(index, preread, defer=cold)
            self.state.loading = False
        self.loader.complete_later(index)


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
        self.loader.touch()
        if row == self.session.row or self.session.current is None or self.session.current.outputs is None:
            return
        try:
            heatmap = self.session.heatmap_for_row(row)
        except RecordError:
            self.state.row = self.session.row
            return
        path = logic_outputs.pendingHeatmapFile(heatmap)
        if path and path not in self.session.heatmap_errors:
            create_task(self.loader.select_pending(row))
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
        self.loader.touch()
        if window_preset not in [p["name"] for p in self.state.window_presets] and window_preset != "custom":
            self.state.window_preset = self.session.window_preset
            return
        if window_preset != self.session.window_preset:
            try:
                self.session.set_window_preset(window_preset)
            except RecordError:
                self.state.window_preset = self.session.window_preset
                return
            self._render_slice_views()
            self._publish_window()
            self.state.scene_version += 1

    @change("window_width", "window_level")
    def _on_window_typed(self, window_width, window_level, **_):
        """A window or level typed on the page (in the image's units): the "custom" window."""
        shown = self.session.window_values_shown()
        try:
            width, level = float(window_width), float(window_level)
        except (TypeError, ValueError):
            return
        if shown is None or (abs(width - round(shown[0], 1)) < 0.05 and abs(level - round(shown[1], 1)) < 0.05):
            return  # the value the server published, not a new one
        self.loader.touch()
        self.session.set_window_values(width, level)
        self.state.window_preset = "custom"
        self._render_slice_views()
        self.state.scene_version += 1

    @change("overlay_visible")
    def _on_overlay_visible(self, overlay_visible, **_):
        self.loader.touch()
        if bool(overlay_visible) != self.session.overlay_visible:
            self.session.set_overlay_visible(bool(overlay_visible))
            self._render_slice_views()
            self.state.scene_version += 1

    @trigger("review_toggle_overlay")
    def _toggle_overlay(self):
        """Key o: the heatmap overlay off / on (a server-side state change runs no change handler: done here)."""
        self.loader.touch()
        self.session.set_overlay_visible(not self.session.overlay_visible)
        self.state.overlay_visible = self.session.overlay_visible
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
            self.loader.touch()
            apply(value)
            self._render_slice_views()

    @trigger("review_jump_maximum")
    def _jump_maximum(self):
        self.loader.touch()
        if self.session.jump_to_maximum() is not None:
            self._publish_scene()

    @trigger("review_scroll")
    def _scroll(self, view_name, step):
        """Up/Down over a slice view: one slice further (step +1) or back (-1)."""
        self.loader.touch()
        if view_name not in SLICE_VIEW_NAMES or step not in (1, -1):
            return
        if self.session.scroll(view_name, step) is not None:
            self._publish_cursor()
            self.state.scene_version += 1

    @trigger("review_rescan")
    def _rescan(self):
        """List the folder again (files added or removed while the server runs); the shown case stays."""
        self.loader.touch()
        if self.state.running:
            return
        shown = self.folder.cases[self.session.current.index].path if self.session.current is not None else None
        for task in self.loader.complete_tasks.values():  # indices move: pending heatmaps are read again below
            task.cancel()
        self.loader.complete_tasks.clear()
        self.session.rescan()
        self._publish_cases()
        if self.session.current is not None:
            self.loader.complete_later(self.session.current.index)
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
        self.loader.server_ready = True

    def _on_shown_heatmap(self):
        """The shown finding's heatmap was read after the case was shown: show it now."""
        self._publish_scene()
        self._render_slice_views()

    @trigger("review_hello")
    def _hello(self):
        """A page was opened: once its first frames are out, load the neighbours of the shown case."""
        self.loader.touch()
        self.loader.schedule_prefetch()

    def _on_slice_view_modified(self, *_):
        """A slice moved (slider, mouse): refresh the cursor and the chart marker, at most every 0.2 s."""
        if not self.loader.server_ready:
            return
        if self._cursor_task is None or self._cursor_task.done():
            self._cursor_task = create_task(self._publish_cursor_later())

    async def _publish_cursor_later(self):
        await asyncio.sleep(0.2)
        with self.state:
            self._publish_cursor()

    @trigger("review_camera")
    def _camera(self, action):
        self.loader.touch()
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

    @trigger("review_similarity")
    def _similarity_click(self, view_name, fx, fy):
        """A press on a slice view in similarity mode (similarity.SimilarityController)."""
        self.loader.touch()
        self.similarity.click(view_name, fx, fy)

    # Runs --------------------------------------------------------------------------------------------------

    @trigger("review_run")
    def _run(self):
        current = self.session.current  # the case the scene shows (never a value sent by the page)
        if self.state.running or not self.session.can_run or current is None:
            return
        if self.similarity.busy:
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

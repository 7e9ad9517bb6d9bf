"""What the review page shows, published as trame state: the case list, the shown case's findings, cursor,
chart, orientation, camera, model information and modality warnings, window presets and window/level (typed,
preset or dragged in a slice view). Text only: nothing here is rendered as HTML."""

from __future__ import annotations

import asyncio

import vtk
from trame_server.utils.asynchronous import create_task

from .chart import chart_data, colorbar_gradient
from .modelinfo import image_modality, modality_name, modality_warnings, model_summary, record_plugins
from .session import PERCENTILE_PRESETS, WINDOW_PRESETS, logic_outputs

STATUS_TEXT = {"results": "results", "none": "no results", "error": "error", "running": "running"}
STATUS_COLOR = {"results": "green", "none": "grey", "error": "red", "running": "amber"}


class StatePublisher:
    """The ReviewApp's state publishing (a mixin: uses ``self.state``, ``self.session``, ``self.folder``,
    ``self.slicer_app``, ``self.loader`` and ``self.plugin_reader``)."""

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
        s.window_presets = self._presets(self.session.presets_for(True))
        s.window_width = s.window_level = 0.0  # the shown image's window, typed or dragged (custom)
        s.window_units = ""
        s.overlay_visible = True
        s.probability_details = False  # the findings table's raw and exact calibrated probabilities
        s.model_details = False  # the model information beyond its one line
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
        s.model_summary = []     # one line per plugin (name, backbone, training); the rest on demand
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
        s.rows = [{**r, "probability_text": f"{r['probability']:.2f}", "threshold_text": f"{r['threshold']:.2f}",
                   "exact_text": f"{r['probability']:.4f}",
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
            s.model_info, s.model_warnings, s.model_summary = [], [], []
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
        s.model_summary = [model_summary(info) for info in infos]
        s.image_modality = f"{modality_name(code)} ({source})" if code else "not stated by the file"
        self._publish_presets(code == "CT" or (not code and scalar_range is not None and scalar_range[0] <= -500.0))

    @staticmethod
    def _presets(names):
        titles = {**{n: p[0] for n, p in WINDOW_PRESETS.items()}, **{n: p[0] for n, p in PERCENTILE_PRESETS.items()}}
        return [{"name": n, "title": titles[n]} for n in names if n != "custom"]

    def _publish_presets(self, is_ct):
        """Window presets that mean something for the shown image: CT windows in HU for a CT (stated, or HU air
        in view), percentile windows otherwise (an MR's values have no fixed meaning). A preset of the other kind
        gives way to Auto."""
        names = self.session.presets_for(is_ct)
        self.state.window_presets = self._presets(names)
        self.state.window_units = "HU" if is_ct else ""
        if self.session.window_preset not in names:
            self.session.set_window_preset("auto")
            self.state.window_preset = "auto"
            self._render_slice_views()
        self._publish_window()

    def _publish_window(self):
        shown = self.session.window_values_shown()
        if shown is not None:
            self.state.window_width, self.state.window_level = round(shown[0], 1), round(shown[1], 1)

    def _publish_cursor(self):
        s, session = self.state, self.session
        s.cursor_ijk = session.cursor_ijk()
        axis, series = session.importance()
        current = s.cursor_ijk[axis] if (s.cursor_ijk and axis is not None) else None
        s.chart = chart_data(series, axis, current)
        s.chart_slices = self._chart_slices = max((len(v) for v in series.values()), default=0)
        s.orientation = self.session.orientation()
        self._publish_window()  # a drag in a slice view changes the window

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

    def _observe_window(self):
        """Watch the shown image's display node: a drag in a slice view changes its window (session.window_dragged)."""
        node, tag = self._observed_display
        if node is not None:
            node.RemoveObserver(tag)
        current = self.session.current
        display = current.input_node.GetDisplayNode() if current is not None and current.input_node else None
        tag = display.AddObserver(vtk.vtkCommand.ModifiedEvent, self._on_display_modified) if display else None
        self._observed_display = (display, tag)

    def _on_display_modified(self, *_):
        if self.loader.server_ready and (self._window_task is None or self._window_task.done()):
            self._window_task = create_task(self._publish_dragged_window())

    async def _publish_dragged_window(self):
        await asyncio.sleep(0.2)  # a drag modifies the display node at every mouse move: published at most 5 / s
        if self.session.window_dragged():
            with self.state:
                self.state.window_preset = "custom"
                self._publish_window()
                self.state.scene_version += 1

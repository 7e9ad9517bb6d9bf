"""Similarity on click: a press on a slice view in similarity mode shows the seed-point similarity map of that voxel
(the Logic's SimilaritySession: ``anymc3d similarity`` in a background process, PlaneCycle features cached per
volume) as the slice views' overlay. The page stays live: the process runs outside the server and is polled from
the event loop. A map belongs to the shown case and the click: a case switch removes it.
"""

from __future__ import annotations

import asyncio

from trame_server.utils.asynchronous import create_task

from .layout import SLICE_VIEW_NAMES


class SimilarityController:
    """Args: state (trame's), session (the ReviewSession: backbone, plugins, device, the Logic), view_manager
    (trame-slicer's, for the clicked view's geometry), render (called when a map is shown)."""

    def __init__(self, state, session, view_manager, render):
        self.state, self.session, self.view_manager, self.render = state, session, view_manager, render
        self.logic_session = None  # the Logic's SimilaritySession, made on the first click (needs --backbone)
        self._task = None

    def click(self, view_name, fx, fy):
        """``fx``, ``fy``: the pressed place as fractions of the view's image (left to right, top to bottom)."""
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
        if s.running:
            s.similarity_status = "busy: a prediction is running; click again when it has finished"
            return
        view = next((v for v in self.view_manager.get_slice_views() if v.get_singleton_tag() == view_name), None)
        if view is None:
            return
        width, height = view.render_window().GetSize()
        ras = view.get_view_node().GetXYToRAS().MultiplyPoint([fx * width, (1.0 - fy) * height, 0.0, 1.0])[:3]
        session = self._logic_session()
        s.similarity_busy, s.similarity_status = True, "computing the similarity map (PlaneCycle features)…"
        session.request(current.input_node, ras, self._on_result)
        if self._task is None or self._task.done():
            self._task = create_task(self._poll())

    @property
    def busy(self) -> bool:
        return bool(self.state.similarity_busy)

    def drop_maps(self):
        """Remove the similarity maps (and their nodes) of every loaded case; a running request is cancelled."""
        if self.logic_session is None:
            return
        from AnyMC3DSlicerLogic import outputs

        self.logic_session.cancel()
        for loaded in self.session.loaded.values():
            for node in self.logic_session.similarityNodes(loaded.input_node):
                outputs.removeNode(self.session.scene, node)
        self.state.similarity_status = ""

    def close(self):
        if self.logic_session is not None:
            self.logic_session.cleanup()

    def _logic_session(self):
        from AnyMC3DSlicerLogic.similarity import SimilarityOptions, SimilaritySession

        if self.logic_session is None:
            from anymc3d.plugin_file import read_plugin_json

            size = read_plugin_json(self.session.plugins[0])["backbone"]["img_size"] if self.session.plugins else 224
            self.logic_session = SimilaritySession(self.session.logic, self.session.backbone,
                                                   SimilarityOptions(device=self.session.device, inputSize=int(size)))
        return self.logic_session

    async def _poll(self):
        while True:
            with self.state:
                session = self.logic_session
                if session is None or (session.job is None and session.pending is None):
                    self.state.similarity_busy = False
                    break
                self.session.logic.runner.processEvents(0)
            await asyncio.sleep(0.1)

    def _on_result(self, result):
        s = self.state
        if result.status == "ok":
            seed = ",".join(str(v) for v in result.ijk)
            s.similarity_status = f"similarity to voxel ({seed}) shown" + (" (features cached)" if result.cacheHit else "")
            s.similarity_version += 1
            self.render()
            s.scene_version += 1
        elif result.status == "cancelled":
            s.similarity_status = "replaced by a newer click"
        else:
            s.similarity_status = f"failed: {result.message}"

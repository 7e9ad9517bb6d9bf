"""The review session on the MRML scene: which case is shown, and every scene change the page asks for.

No web code here (testable on a bare slicer-core scene). Every result node is made by the Slicer module's Logic:
``readRecord`` checks a record, ``importResults`` makes the table, heatmaps, displays, volume renderings and chart,
``selectFinding`` / ``setHeatmapThreshold`` / ``heatmapMaximumRAS`` / ``mostImportantSliceRAS`` / ``jumpSlicesTo``
drive the display and ``loadInputFile`` loads a case without results. This module only keeps a few loaded cases
in the scene (switching back is then instant), points the slice views' background at the shown case, hides the
volume renderings of the cases not shown and runs cases from the page; the findings (findings.py), the views'
display (slice_display.py) and window/level (window_level.py) are its mixins.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections import OrderedDict

import numpy as np
import slicer
import vtk
from AnyMC3DSlicerLogic import AnyMC3DSlicerLogic, DisplayOptions, PredictionOptions, SubprocessRunner
from AnyMC3DSlicerLogic import outputs as logic_outputs
from AnyMC3DSlicerLogic.parameters import GRADIENT_METHODS, HEATMAP_METHODS

from .cases import Case, CaseFolder, RecordError
from .findings import Findings
from .runs import (  # noqa: F401 (re-exported)
    checked_results_folder,
    guarded_backend_command,
    make_run_root,
    save_job_outputs,
    start_prediction_into,
    sweep_stale_run_roots,
)
from .slice_display import SliceDisplay
from .window_level import ALL_PRESETS, PERCENTILE_PRESETS, WINDOW_PRESETS, WindowLevel  # noqa: F401 (re-exported)

logger = logging.getLogger("anymc3d.review")

#: the 3D view's heatmap size limit (voxels per axis): a backend heatmap is a 14-16 pixel patch grid interpolated,
#: so 128 per axis keeps every patch of a 512-pixel slice at 4 voxels or more
VOLUME_RENDERING_MAX_SIZE = 128
#: the environment variable that sets it (tests: a small value makes small test volumes use the reduced copy)
VOLUME_RENDERING_MAX_SIZE_ENV = "ANYMC3D_REVIEW_3D_MAX_SIZE"
#: threads that read a case's files (image, heatmaps) at once
READ_WORKERS = 2


def volume_rendering_max_size() -> int:
    """VOLUME_RENDERING_MAX_SIZE, or the environment's ANYMC3D_REVIEW_3D_MAX_SIZE (an integer >= 2)."""
    raw = os.environ.get(VOLUME_RENDERING_MAX_SIZE_ENV)
    if raw is None:
        return VOLUME_RENDERING_MAX_SIZE
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 2:
        raise ValueError(f"{VOLUME_RENDERING_MAX_SIZE_ENV} must be an integer >= 2, not {raw!r}")
    return value


@dataclasses.dataclass
class LoadedCase:
    index: int
    input_node: object
    outputs: object = None       # the Logic's PredictionOutputs, None for a case without results
    node_ids: tuple = ()         # every node this case added to the scene (removed when it leaves the cache)
    folder_item: int = 0
    load_seconds: float = 0.0
    record: dict | None = None   # the validated record the outputs were imported from

    @property
    def table_node(self):
        return self.outputs.tableNode if self.outputs is not None else None

    def heatmap_nodes(self):
        return list(self.outputs.heatmapNodes) if self.outputs is not None else []

    def pending_files(self) -> list[str]:
        """The heatmap files this case still waits for (imported with ``defer``), in row order."""
        files = [logic_outputs.pendingHeatmapFile(node) for node in self.heatmap_nodes()]
        return list(dict.fromkeys(path for path in files if path))


def _node_ids(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def record_options(record) -> PredictionOptions:
    """The PredictionOptions a record was made with (what the Logic's readRecord / importResults need)."""
    results = record.get("results") or []
    methods = {result.get("heatmap_method") for result in results if isinstance(result, dict)}
    method = methods.pop() if len(methods) == 1 else "attention"
    if method not in HEATMAP_METHODS:
        raise RecordError(f"Unknown heatmap method {method!r}")
    ensemble = any(result.get("plugin") == "ensemble" and isinstance(result.get("plugin_path"), list) for result in results)
    return PredictionOptions(heatmapMethod=method, ensemble=ensemble)


class ReviewSession(Findings, SliceDisplay, WindowLevel):
    """Args:
        scene, volumes_logic, volume_rendering_logic: the scene and the module logics (trame-slicer's SlicerApp).
        folder: the CaseFolder.
        backbone, plugins: what a run from the page uses (runs are disabled without them).
        views: an object with ``get_slice_views()`` / ``get_threed_views()`` (trame-slicer's ViewManager), or None.
        cache_size: how many cases stay loaded in the scene.
    """

    def __init__(self, scene, volumes_logic, volume_rendering_logic, folder: CaseFolder, backbone=None, plugins=(),
                 views=None, cache_size=4, runner=None, backend_command=None, temp_root=None, device="auto",
                 heatmap_method="auto"):
        self.scene = scene
        self.folder = folder
        self.backbone = str(backbone) if backbone else None
        self.plugins = [str(p) for p in plugins or ()]
        self.views = views
        self.cache_size = max(1, int(cache_size))
        self.device = device
        self.heatmap_method = heatmap_method
        self._own_run_root = temp_root is None
        self.run_root = temp_root or make_run_root()
        self.logic = AnyMC3DSlicerLogic(scene, runner=runner or SubprocessRunner(),
                                        backendCommand=backend_command or guarded_backend_command(),
                                        volumesLogic=volumes_logic, volumeRenderingLogic=volume_rendering_logic,
                                        tempRoot=self.run_root)
        # the 3D view renders heatmaps at most VOLUME_RENDERING_MAX_SIZE voxels per axis (block means; the slice
        # views show the full-resolution heatmap): a 512x512x300 volume costs seconds per frame on llvmpipe
        self.display = DisplayOptions(volumeRenderingMaxSize=volume_rendering_max_size())
        self.window_preset = "auto"
        self.window_values = None  # (window, level) typed or dragged ("custom")
        self._applied_window = None  # (window, level) the shown image got from here (a drag moves it)
        self.overlay_visible = True
        self.loaded: OrderedDict[int, LoadedCase] = OrderedDict()
        self.current: LoadedCase | None = None
        self.row = 0
        self.job = None
        self.job_case = None
        self._before_poll = set()
        self.prefetch_failed: set[int] = set()
        self.run_errors: dict[int, str] = {}  # errors of runs from the page that left no results file
        self.load_errors: dict[int, str] = {}  # cases that failed to open (listed as errors until they open)
        self.heatmap_errors: dict[str, str] = {}  # heatmap files of deferred loads that could not be shown

    # Cases -------------------------------------------------------------------------------------------------

    @property
    def can_run(self) -> bool:
        return bool(self.backbone and self.plugins)

    def show_case(self, index: int, preread=None, defer=False) -> LoadedCase:
        """Show case ``index`` (loading it if needed). Raises RecordError when its results cannot be shown.
        ``preread``: what :meth:`read_case_files` returned for it (files read in a thread); ``defer``: heatmaps not
        in it are imported pending (``LoadedCase.pending_files``; :meth:`complete_heatmap` fills them)."""
        case = self.folder.case(index)
        loaded = self.loaded.get(index)
        if loaded is None:
            try:
                loaded = self._load(case, preread, defer)
            except (RecordError, ValueError, OSError) as error:
                self.load_errors[index] = str(error) or type(error).__name__  # the list shows it from now on
                raise
            self.load_errors.pop(index, None)
        self.loaded.move_to_end(index)
        self._show(loaded)
        self._evict()
        return loaded

    def case_files(self, index: int, first=False) -> list[str]:
        """The image files a load of case ``index`` reads: its image, then its heatmaps (confined to the folder).
        ``first``: only the image and the heatmap of the finding shown first (what a deferred load needs)."""
        case = self.folder.case(index)
        if case.status == "error":
            return []
        files = [str(case.path)]
        if case.status == "results":
            self.folder.check_record_paths(case.record)  # confinement first: nothing outside the folder is opened
            if first:
                path = self.logic.firstHeatmapFile(case.record, record_options(case.record))
                return files + ([path] if isinstance(path, str) else [])
            for result in case.record.get("results") or []:
                paths = [result.get("heatmap"), *(result.get("finding_heatmaps") or {}).values()]
                files += [path for path in paths if isinstance(path, str)]
        return list(dict.fromkeys(files))  # a file named twice (a result's heatmap is also a finding's) is read once

    def read_file(self, path: str, image=False):
        """The Logic's VolumeData of one file, or None when it cannot be read (the load on the event loop then
        reads it itself and reports the error). An image comes with its automatic window, a heatmap with its
        3D-view block means: both computed here, off the event loop.

        Safe to call from a worker thread (no scene access; SimpleITK and numpy release the GIL)."""
        maxSize = self.display.volumeRenderingMaxSize if self.display.volumeRendering and not image else 0
        try:
            return logic_outputs.readVolumeFile(path, autoWindow=image, blockMaxSize=maxSize)
        except (ValueError, OSError):
            return None

    def read_case_files(self, index: int, workers: int = READ_WORKERS, first=False) -> dict:
        """``{path: VolumeData}`` of the files of case ``index`` (``first``: see :meth:`case_files`), read in
        ``workers`` threads (:meth:`read_file`). A file that cannot be read is left out."""
        from concurrent.futures import ThreadPoolExecutor

        try:
            files = self.case_files(index, first)
        except (RecordError, ValueError, OSError, IndexError):
            return {}
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            read = pool.map(lambda item: self.read_file(item[1], image=item[0] == 0), enumerate(files))
            return {path: data for path, data in zip(files, read) if data is not None}

    def complete_heatmap(self, index: int, path: str, data) -> str:
        """Give the pending heatmaps of loaded case ``index`` that wait for ``path`` their voxels (``data``: the
        file read, or None to read it here). Returns "" or the one-line error (the finding then stays empty and
        says why: ``heatmap_error``). A case no longer loaded is left alone."""
        loaded = self.loaded.get(index)
        if loaded is None:
            return ""
        error = ""
        for node in loaded.heatmap_nodes():
            if logic_outputs.pendingHeatmapFile(node) != path:
                continue
            try:
                self.logic.completeHeatmap(loaded.table_node, node, data, self.display)
            except ValueError as problem:
                error = str(problem)
                self.heatmap_errors[path] = error
        if loaded is not self.current:
            self._set_volume_rendering_visible(loaded, False)
        return error

    def heatmap_error(self) -> str:
        """Why the shown finding's heatmap cannot be shown ("" when it is shown or still loading)."""
        heatmap = self.shown_heatmap()
        path = logic_outputs.pendingHeatmapFile(heatmap)
        return self.heatmap_errors.get(path, "") if path else ""

    def _load(self, case: Case, preread=None, defer=False) -> LoadedCase:
        started = time.perf_counter()
        preread = preread or {}
        before = _node_ids(self.scene)
        shared = {node.GetID() for node in logic_outputs.nodesByClass(self.scene, "vtkMRMLColorTableNode")
                  if node.GetName() == logic_outputs.COLOR_TABLE_NAME}
        if case.status == "results":
            record = case.record
            self.folder.check_record_paths(record)  # confinement first: nothing outside the folder is opened
            options = record_options(record)
            try:
                self.logic.checkRecord(record, len(record.get("results") or []), str(self.folder.root), options)
            except ValueError as error:
                raise RecordError(str(error)) from error
            source = self._input_node(case) if case.is_dicom else str(case.path)
            try:
                outputs = self.logic.importResults(record, [source], options, self.display, preread=preread, defer=defer)
            except Exception:
                if not isinstance(source, str):
                    self.scene.RemoveNode(source)
                raise
            loaded = LoadedCase(case.index, outputs.inputNode, outputs, folder_item=outputs.folderItem, record=record)
        elif case.status == "error":
            raise RecordError(case.error or case.unreadable)
        else:
            try:
                loaded = LoadedCase(case.index, self._input_node(case) if case.is_dicom
                                    else self.logic.loadInputFile(str(case.path), preread.get(str(case.path))))
            except ValueError as error:
                raise RecordError(str(error)) from error
        added = _node_ids(self.scene) - before
        made_shared = {node.GetID() for node in logic_outputs.nodesByClass(self.scene, "vtkMRMLColorTableNode")
                       if node.GetName() == logic_outputs.COLOR_TABLE_NAME}
        loaded.node_ids = tuple(sorted(added - shared - made_shared))
        loaded.load_seconds = time.perf_counter() - started
        self.loaded[case.index] = loaded
        return loaded

    def _input_node(self, case: Case):
        """A DICOM series case's volume: the Logic's loader on the series' first file (Slicer's archetype reader
        reads the whole series of that file), the files being those the backend reads (``dicom_series_files``)."""
        from anymc3d.image_reading import dicom_series_files

        files = dicom_series_files(case.path, case.series)
        if not files:
            raise RecordError(f"{case.name}: the DICOM series is gone")
        node = self.logic.loadInputFile(files[0])
        node.SetName(case.stem)
        return node

    def _show(self, loaded: LoadedCase) -> None:
        previous = self.current
        self.current = loaded
        self._apply_window(loaded)
        for other in self.loaded.values():
            if other is not loaded:
                self._set_volume_rendering_visible(other, False)
        for composite in logic_outputs.nodesByClass(self.scene, "vtkMRMLSliceCompositeNode"):
            composite.SetBackgroundVolumeID(loaded.input_node.GetID())
        if loaded.outputs is not None:
            self.row = self._default_row(loaded) if previous is not loaded else self.row
            self.logic.selectFinding(loaded.table_node, self.row, self.display)
        else:
            self.row = 0
            logic_outputs.showHeatmapInSliceViews(self.scene, None, loaded.input_node, self.display.opacity)
        self._apply_overlay_opacity()  # the Logic shows the overlay at the slider's opacity: hidden stays hidden
        if previous is None or previous.input_node is not loaded.input_node:
            self.reset_views(same_geometry=previous is not None and self._same_geometry(previous.input_node, loaded.input_node))

    @staticmethod
    def _default_row(loaded):
        """The row the Logic shows first after an import: the most probable finding."""
        table = loaded.table_node
        column = table.GetTable().GetColumnByName("Probability")
        values = [column.GetValue(i) for i in range(column.GetNumberOfTuples())]
        return int(np.argmax(values)) if values else 0

    @staticmethod
    def _same_geometry(a, b):
        ma, mb = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        a.GetIJKToRASMatrix(ma)
        b.GetIJKToRASMatrix(mb)
        return (a.GetImageData().GetDimensions() == b.GetImageData().GetDimensions()
                and all(abs(ma.GetElement(i, j) - mb.GetElement(i, j)) < 1e-6 for i in range(4) for j in range(4)))

    def _set_volume_rendering_visible(self, loaded, visible):
        for heatmap in loaded.heatmap_nodes():
            for display in logic_outputs.volumeRenderingDisplayNodes(heatmap):
                display.SetVisibility(bool(visible))

    def neighbours(self, index=None):
        """The cases next to ``index`` (default: the shown one) in the listing, next first."""
        count = len(self.folder.cases)
        index = self.current.index if index is None and self.current is not None else index
        if index is None or count < 2:
            return []
        return list(dict.fromkeys(i for i in ((index + 1) % count, (index - 1) % count) if i != index))

    def _evict(self):
        """Drop the least recently shown cases beyond ``cache_size`` (never the shown case or its neighbours)."""
        keep = {self.current.index} if self.current is not None else set()
        keep |= set(self.neighbours())
        for index in list(self.loaded):
            if len(self.loaded) <= self.cache_size:
                break
            if index not in keep:
                self.unload(index)

    def prefetch(self, index, preread=None) -> bool:
        """Load case ``index`` into the scene without showing it (the shown case stays as it was).

        The Logic's import shows what it imports (slice views, volume rendering): the shown case's display is put
        back right after. Returns False when there was nothing to do or the case cannot be loaded.
        """
        if index in self.loaded or index in self.prefetch_failed or (self.job is not None and not self.job.done):
            return False
        case = self.folder.case(index)
        if case.status == "error":
            return False
        shown = self.current
        try:
            self._load(case, preread)
        except (RecordError, ValueError, OSError):
            self.prefetch_failed.add(index)
            return False
        finally:
            if shown is not None:
                self._show(shown)
        if shown is None:
            self._set_volume_rendering_visible(self.loaded[index], False)
        self.loaded.move_to_end(index, last=False)
        self._evict()
        return True

    def unload(self, index):
        loaded = self.loaded.pop(index, None)
        if loaded is None:
            return
        if loaded.folder_item:
            shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
            shNode.RemoveItem(loaded.folder_item, False, False)
        for node_id in loaded.node_ids:
            node = self.scene.GetNodeByID(node_id)
            if node is not None:
                self.scene.RemoveNode(node)
        if self.current is loaded:
            self.current = None

    def rescan(self):
        """List the folder again; loaded cases keep their nodes under their new index, vanished ones are unloaded.
        Refused while a run is in progress (its case index must not move)."""
        if self.job is not None and not self.job.done:
            raise RecordError("A run is in progress: rescan when it has finished")
        paths = {index: self.folder.cases[index].path for index in self.loaded}
        errors = {self.folder.cases[index].path: message for index, message in self.run_errors.items()}
        self.folder.refresh()
        self.load_errors.clear()  # indices move; a case that failed is tried again when opened
        new_index = {case.path: case.index for case in self.folder.cases}
        for index, path in paths.items():
            if path not in new_index or self.loaded[index].record != self.folder.cases[new_index[path]].record:
                self.unload(index)  # vanished, or its results changed on disk: loaded again when shown
        remapped = OrderedDict()
        for index, loaded in self.loaded.items():
            loaded.index = new_index[paths[index]]
            remapped[loaded.index] = loaded
        self.loaded = remapped
        self.prefetch_failed.clear()
        self.heatmap_errors.clear()
        self.run_errors = {new_index[path]: message for path, message in errors.items() if path in new_index}

    # Runs --------------------------------------------------------------------------------------------------

    def start_run(self, index: int, on_progress=None, on_finished=None):
        """Run the built-in prediction on listed case ``index``; writes ``results/<stem>.json`` and its heatmaps.

        The Logic's PredictionJob runs ``anymc3d predict`` through the SubprocessRunner and imports the results
        with ``readRecord`` + ``importResults``; here its output paths point into the results folder (kept)
        instead of its temporary folder (removed). Only the backbone and plugins given on the command line are used.
        """
        if not self.can_run:
            raise RecordError("Runs need --backbone and --plugin on the command line")
        if self.job is not None and not self.job.done:
            raise RecordError("A run is already in progress")
        case = self.folder.case(index)
        if case.is_dicom:  # the Logic's job imports its input by file name; a series folder is not one
            raise RecordError(f"{case.name}: runs from the page take image files; run 'anymc3d predict' on this "
                              "DICOM series and rescan")
        json_path, heatmap_dir = self.folder.results_paths(case)
        if case.record is not None or json_path.exists() or self.folder.results_on_disk(case):
            raise RecordError(f"{case.name} already has results: it is not run again (results are never overwritten)")
        try:  # a results folder that leads out of FOLDER is refused before anything runs
            checked_results_folder(self.folder.root, heatmap_dir)
        except (ValueError, OSError) as error:
            raise RecordError(f"{case.name}: {error}") from None
        options = PredictionOptions(device=self.device, heatmapMethod=self.heatmap_method)
        self.run_errors.pop(index, None)

        def finished(result):
            self._run_finished(index, result)
            if on_finished:
                on_finished(result)

        job = start_prediction_into(self.logic, str(case.path), self.backbone, self.plugins, str(self.folder.root),
                                    str(json_path), str(heatmap_dir), options, self.display, on_progress, finished)
        self.job, self.job_case = job, index
        return job

    def _run_finished(self, index, result):
        """The Logic imported the results (or failed): reload the listing; keep the imported nodes as the case."""
        shown = self.current.index if self.current is not None else None
        self.folder.refresh()
        self.prefetch_failed.discard(index)
        if result.status == "ok" and result.outputs is not None:
            outputs = result.outputs
            if index in self.loaded:
                self.unload(index)
            added = _node_ids(self.scene) - self._before_poll
            added -= {node.GetID() for node in logic_outputs.nodesByClass(self.scene, "vtkMRMLColorTableNode")
                      if node.GetName() == logic_outputs.COLOR_TABLE_NAME}
            self.loaded[index] = LoadedCase(index, outputs.inputNode, outputs, tuple(sorted(added)), outputs.folderItem,
                                            record=self.folder.case(index).record)
            self.loaded.move_to_end(index, last=False)  # the least recently shown, unless shown now
        elif result.status != "ok" and self.folder.case(index).status == "none":
            self.run_errors[index] = result.message or "The run failed"
        # The import pointed the slice views at the new case: put the shown one back (or show the new one).
        if shown is not None and (shown in self.loaded or shown == index):
            self.current = None
            try:
                self.show_case(shown)
            except RecordError:
                pass

    def poll(self):
        """Deliver the runner's callbacks (call it from the event loop while a run is in progress)."""
        if self.job is not None and not self.job.done:
            self._before_poll = _node_ids(self.scene)  # what the import adds is this case's (see _run_finished)
            self.logic.runner.processEvents(0)
        return self.job is not None and not self.job.done

    def cancel_run(self):
        if self.job is not None and not self.job.done:
            self.job.cancel()

    def close(self, timeout=10.0):
        """The server stops: kill a running backend (its whole process group) and remove this server's run
        folders."""
        if self.job is not None and not self.job.done:
            self.job.cancel()
            deadline = time.monotonic() + timeout
            while not self.job.done and time.monotonic() < deadline:
                self.logic.runner.processEvents(0.1)
        if self._own_run_root:
            shutil.rmtree(self.run_root, ignore_errors=True)

    def case_error(self, index) -> str:
        case = self.folder.case(index)
        return self.run_errors.get(index) or case.error or case.unreadable or self.load_errors.get(index, "")


__all__ = ["GRADIENT_METHODS", "LoadedCase", "ReviewSession", "guarded_backend_command", "make_run_root", "record_options",
           "start_prediction_into", "sweep_stale_run_roots"]

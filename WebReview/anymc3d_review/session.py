"""The review session on the MRML scene: which case is shown, and every scene change the page asks for.

No web code here (testable on a bare slicer-core scene). Every result node is made by the Slicer module's Logic:
``readRecord`` checks a record, ``importResults`` makes the table, heatmaps, displays, volume renderings and chart,
``selectFinding`` / ``setHeatmapThreshold`` / ``heatmapMaximumRAS`` / ``mostImportantSliceRAS`` / ``jumpSlicesTo``
drive the display and ``loadInputFile`` loads a case without results. This module only keeps a few loaded cases
in the scene (switching back is then instant), points the slice views' background at the shown case, and hides the
volume renderings of the cases not shown.
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
from AnyMC3DSlicerLogic import (
    AnyMC3DSlicerLogic,
    DisplayOptions,
    PredictionOptions,
    SubprocessRunner,
)
from AnyMC3DSlicerLogic import outputs as logic_outputs
from AnyMC3DSlicerLogic.parameters import GRADIENT_METHODS, HEATMAP_METHODS

from .cases import Case, CaseFolder, RecordError
from .runs import (  # noqa: F401 (re-exported)
    checked_results_folder,
    guarded_backend_command,
    make_run_root,
    save_job_outputs,
    start_prediction_into,
    sweep_stale_run_roots,
)


logger = logging.getLogger("anymc3d.review")

#: window presets of the slice views: name -> (title, window, level) in the image's units (HU for CT);
#: "auto" is the volume display's automatic window. Values: the usual radiology CT windows.
WINDOW_PRESETS = {"auto": ("Auto", None, None), "brain": ("Brain", 80.0, 40.0),
                  "soft_tissue": ("Soft tissue", 400.0, 40.0), "lung": ("Lung", 1500.0, -600.0),
                  "bone": ("Bone", 1800.0, 400.0)}
#: window presets of images that are not CT (MR, or no stated modality and no HU air): the window spans these
#: percentiles of the image's values (name -> (title, low percentile, high percentile)); HU values mean nothing there
PERCENTILE_PRESETS = {"p1_99": ("1–99 %", 1.0, 99.0), "p5_95": ("5–95 %", 5.0, 95.0), "p0_100": ("Full range", 0.0, 100.0)}
ALL_PRESETS = ("auto", *(n for n in WINDOW_PRESETS if n != "auto"), *PERCENTILE_PRESETS, "custom")
#: the crosshair's colour: cyan, which matplotlib's inferno (black, purple, red, orange, yellow) never takes,
#: so it stays visible on the heatmap's peak
CROSSHAIR_COLOR = (0.0, 0.9, 1.0)
RAS_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))  # (negative, positive) direction of R, A, S
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


class ReviewSession:
    """Args:
        scene, volumes_logic, volume_rendering_logic: the scene and the module logics (trame-slicer's SlicerApp).
        folder: the CaseFolder.
        backbone, plugins: what a run from the page uses (runs are disabled without them).
        views: an object with ``get_slice_views()`` / ``get_threed_views()`` (trame-slicer's ViewManager), or None.
        cache_size: how many cases stay loaded in the scene.
    """

    def __init__(self, scene, volumes_logic, volume_rendering_logic, folder: CaseFolder, backbone=None, plugins=(),
                 views=None, cache_size=4, runner=None, backend_command=None, temp_root=None, device="auto",
                 heatmap_method="attention"):
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

    def reset_views(self, same_geometry=False):
        if self.views is None:
            return
        if not same_geometry:
            for view in self.views.get_slice_views():
                view.fit_view_to_content()
        for view in self.views.get_threed_views():
            view.reset_view()

    # Findings and display ----------------------------------------------------------------------------------

    def table_rows(self) -> list[dict]:
        """The findings table node's rows (what the Logic wrote), for the page."""
        if self.current is None or self.current.table_node is None:
            return []
        table_node = self.current.table_node
        table = table_node.GetTable()
        checked = _record_rows(self.current.record)
        rows = []
        for row in range(table.GetNumberOfRows()):
            rows.append({"row": row,
                         "plugin": table_node.GetCellText(row, 0),
                         "finding": table_node.GetCellText(row, 1),
                         "probability": float(table.GetValue(row, 2).ToDouble()),
                         "threshold": float(table.GetValue(row, 3).ToDouble()),
                         "decision": table_node.GetCellText(row, 4),
                         "raw": None})
            if row < len(checked) and checked[row]["finding"] == rows[-1]["finding"]:
                rows[-1].update(checked[row])  # calibrated, raw, threshold and decision from the validated record
        return rows

    def heatmap_for_row(self, row: int):
        """The heatmap node of the shown case's findings-table row ``row``; RecordError for anything else."""
        if self.current is None or self.current.table_node is None:
            raise RecordError("No findings shown")
        count = self.current.table_node.GetNumberOfRows()
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < count:
            raise RecordError(f"No finding {row!r}")
        return self.logic.heatmapNodeForRow(self.current.table_node, row)

    def select_finding(self, row: int):
        if self.current is None or self.current.table_node is None:
            return None
        self.heatmap_for_row(row)
        self.row = row
        return self.logic.selectFinding(self.current.table_node, row, self.display)

    def shown_heatmap(self):
        if self.current is None or self.current.table_node is None:
            return None
        return self.logic.heatmapNodeForRow(self.current.table_node, self.row)

    def set_threshold(self, threshold: float):
        self.display.threshold = min(max(float(threshold), 0.0), 1.0)
        for loaded in self.loaded.values():
            for heatmap in loaded.heatmap_nodes():
                self.logic.setHeatmapThreshold(heatmap, self.display.threshold)

    def set_window_preset(self, name: str):
        """Window/level of the slice views' image (a name of ALL_PRESETS: CT windows in HU, percentile windows for
        other images), kept when the case changes while it fits the case (else the case gets Auto)."""
        if name not in ALL_PRESETS or (name == "custom" and self.window_values is None):
            raise RecordError(f"No window preset {name!r}")
        self.window_preset = name
        if self.current is not None:
            self._apply_window(self.current)

    def set_window_values(self, window: float, level: float):
        """A typed (or dragged) window and level, in the image's units; kept as the "custom" preset."""
        self.window_values = (max(float(window), 1e-3), float(level))
        self.set_window_preset("custom")

    def window_values_shown(self):
        """(window, level) the shown image is displayed with, or None."""
        node = self.current.input_node if self.current is not None else None
        display = node.GetDisplayNode() if node is not None else None
        return (display.GetWindow(), display.GetLevel()) if display is not None else None

    @staticmethod
    def presets_for(is_ct: bool) -> list[str]:
        """The presets that mean something for the image: CT windows in HU for a CT, percentiles otherwise."""
        return ["auto", *((n for n in WINDOW_PRESETS if n != "auto") if is_ct else PERCENTILE_PRESETS), "custom"]

    def window_dragged(self) -> bool:
        """Whether the shown image's window moved away from the one last applied here: a left-drag in a slice
        view (Slicer's window/level widget sets the display node itself). It is then the "custom" window."""
        shown = self.window_values_shown()
        applied = self._applied_window
        if shown is None or applied is None or max(abs(a - b) for a, b in zip(shown, applied)) < 1e-6:
            return False
        self.window_values = self._applied_window = shown
        self.window_preset = "custom"
        return True

    def _apply_window(self, loaded):
        self._set_window(loaded)
        if loaded is self.current:
            self._applied_window = self.window_values_shown()

    def _set_window(self, loaded):
        display = loaded.input_node.GetDisplayNode() if loaded.input_node is not None else None
        if display is None:
            return
        if self.window_preset == "custom" and self.window_values is not None:
            display.AutoWindowLevelOff()
            display.SetWindowLevel(*self.window_values)
            return
        if self.window_preset in PERCENTILE_PRESETS:
            import numpy as np

            _, low, high = PERCENTILE_PRESETS[self.window_preset]
            voxels = logic_outputs.arrayFromVolumeNode(loaded.input_node).ravel()
            sample = voxels[:: max(1, voxels.size // 2_000_000)]  # a subsample: the window of millions of voxels
            lo, hi = (float(v) for v in np.percentile(sample, [low, high]))
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(lo, max(hi, lo + 1e-3))
            return
        _, window, level = WINDOW_PRESETS.get(self.window_preset, WINDOW_PRESETS["auto"])
        auto = logic_outputs.autoWindowOf(loaded.input_node)
        if window is None and auto is not None:  # the automatic window computed when the file was read
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(*auto)
        elif window is None:
            display.AutoWindowLevelOn()
        else:
            display.AutoWindowLevelOff()
            display.SetWindowLevel(window, level)

    def set_opacity(self, opacity: float):
        self.display.opacity = min(max(float(opacity), 0.0), 1.0)
        self._apply_overlay_opacity()

    def set_overlay_visible(self, visible: bool):
        """Show or hide the heatmap overlay of the slice views (the opacity slider keeps its value)."""
        self.overlay_visible = bool(visible)
        self._apply_overlay_opacity()

    def _apply_overlay_opacity(self):
        opacity = self.display.opacity if self.overlay_visible else 0.0
        for composite in logic_outputs.nodesByClass(self.scene, "vtkMRMLSliceCompositeNode"):
            composite.SetForegroundOpacity(opacity)

    def hide_crosshair(self):
        """The crosshair marks a jump target of the shown case: a case switch removes it."""
        for crosshair in logic_outputs.nodesByClass(self.scene, "vtkMRMLCrosshairNode"):
            crosshair.SetCrosshairMode(slicer.vtkMRMLCrosshairNode.NoCrosshair)

    def jump_to_maximum(self):
        heatmap = self.shown_heatmap()
        if heatmap is None or logic_outputs.pendingHeatmapFile(heatmap) is not None:
            return None
        ras = self.logic.heatmapMaximumRAS(heatmap)
        self.jump_slices_to(ras)
        return ras

    def jump_to_most_important_slice(self):
        if self.current is None or self.current.table_node is None:
            return None
        ras = self.logic.mostImportantSliceRAS(self.current.table_node, self.row)
        self.jump_slices_to(ras)
        return ras

    def jump_to_slice(self, index: int):
        """Move the slice views to slice ``index`` along the slicing axis (a click on the chart)."""
        if self.current is None or self.current.table_node is None:
            return None
        axis = int(self.current.table_node.GetAttribute(logic_outputs.SLICING_AXIS_ATTRIBUTE))
        ijk = list(self.cursor_ijk(rounded=False) or [0.0, 0.0, 0.0])
        dims = self.current.input_node.GetImageData().GetDimensions()
        ijk[axis] = min(max(int(index), 0), dims[axis] - 1)
        ras = logic_outputs.voxelToRas(self.current.input_node, ijk)
        self.jump_slices_to(ras)
        return ras

    def jump_slices_to(self, ras):
        """Move every slice plane through ``ras`` without panning (the field of view stays on the anatomy).

        The Logic's ``jumpSlicesTo`` centres the views on the point (CenteredJumpSlice), which pushes half a view
        off the image for a point near an edge; OffsetJumpSlice only moves the slices. The crosshair marks it.
        """
        slicer.vtkMRMLSliceNode.JumpAllSlices(self.scene, float(ras[0]), float(ras[1]), float(ras[2]),
                                              slicer.vtkMRMLSliceNode.OffsetJumpSlice)
        for crosshair in logic_outputs.nodesByClass(self.scene, "vtkMRMLCrosshairNode"):
            crosshair.SetCrosshairRAS(float(ras[0]), float(ras[1]), float(ras[2]))
            crosshair.SetCrosshairColor(*CROSSHAIR_COLOR)
            crosshair.SetCrosshairThickness(slicer.vtkMRMLCrosshairNode.Medium)  # 3 px: seen on the peak at a glance
            crosshair.SetCrosshairMode(slicer.vtkMRMLCrosshairNode.ShowSmallBasic)

    def scroll(self, view_name: str, step: int):
        """One slice of the shown image further along view ``view_name``'s normal (Up/Down over the view)."""
        if self.views is None or self.current is None:
            return None
        for view in self.views.get_slice_views():
            if view.get_singleton_tag() == view_name:
                low, high = view.get_slice_range()
                value = min(max(view.get_slice_value() + step * view.get_slice_step(), low), high)
                view.set_slice_value(value)
                return value
        return None

    def orientation(self) -> dict:
        """Per slice view: the anatomical letters at its edges and the slice number / position of the image."""
        result = {}
        if self.current is None:
            return result
        matrix = vtk.vtkMatrix4x4()
        self.current.input_node.GetRASToIJKMatrix(matrix)
        ras_to_ijk = np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])
        dims = self.current.input_node.GetImageData().GetDimensions()
        for slice_node in logic_outputs.nodesByClass(self.scene, "vtkMRMLSliceNode"):
            m = slice_node.GetSliceToRAS()
            to_ras = np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])
            letters = {}
            for edge, direction in (("right", to_ras[:3, 0]), ("left", -to_ras[:3, 0]), ("top", to_ras[:3, 1]),
                                    ("bottom", -to_ras[:3, 1])):
                axis = int(np.argmax(np.abs(direction)))
                letters[edge] = RAS_LETTERS[axis][int(direction[axis] > 0)]
            normal_ijk = ras_to_ijk[:3, :3] @ to_ras[:3, 2]
            axis = int(np.argmax(np.abs(normal_ijk)))
            index = int(round(float((ras_to_ijk @ to_ras[:, 3])[axis])))
            inside = 0 <= index < dims[axis]
            letters["slice"] = (f"{index + 1}/{dims[axis]}" if inside else "outside") + \
                f" · {slice_node.GetSliceOffset():.1f} mm"
            # the view's in-plane centre (RAS): a jump that pans the view moves it, one that only moves the
            # slice plane does not
            normal = to_ras[:3, 2] / np.linalg.norm(to_ras[:3, 2])
            origin = to_ras[:3, 3]
            letters["center"] = [round(float(v), 3) for v in origin - float(origin @ normal) * normal]
            result[slice_node.GetName()] = letters
        return result

    def importance(self):
        """``(slicing_axis, {plugin: [importance per slice]})`` from the Logic's importance table node."""
        if self.current is None or self.current.table_node is None:
            return None, {}
        table_node = self.current.table_node
        table = table_node.GetNodeReference(logic_outputs.IMPORTANCE_REFERENCE).GetTable()
        series = {}
        for column_index in range(1, table.GetNumberOfColumns()):
            column = table.GetColumn(column_index)
            series[column.GetName()] = [float(column.GetValue(i)) for i in range(column.GetNumberOfTuples())]
        return int(table_node.GetAttribute(logic_outputs.SLICING_AXIS_ATTRIBUTE)), series

    # Where the slice views are -----------------------------------------------------------------------------

    def cursor_ras(self):
        """The point where the three slice planes meet (None without three independent slice views)."""
        normals, offsets = [], []
        for slice_node in logic_outputs.nodesByClass(self.scene, "vtkMRMLSliceNode"):
            matrix = slice_node.GetSliceToRAS()
            normal = np.array([matrix.GetElement(i, 2) for i in range(3)])
            origin = np.array([matrix.GetElement(i, 3) for i in range(3)])
            normals.append(normal)
            offsets.append(float(normal @ origin))
        if len(normals) < 3:
            return None
        normals, offsets = np.array(normals[:3]), np.array(offsets[:3])
        if abs(np.linalg.det(normals)) < 1e-6:
            return None
        return tuple(float(x) for x in np.linalg.solve(normals, offsets))

    def cursor_ijk(self, rounded=True):
        """The cursor as a voxel index (I, J, K) of the shown case's input volume."""
        ras = self.cursor_ras()
        if ras is None or self.current is None:
            return None
        matrix = vtk.vtkMatrix4x4()
        self.current.input_node.GetRASToIJKMatrix(matrix)
        ijk = matrix.MultiplyPoint([*ras, 1.0])[:3]
        return [int(round(x)) for x in ijk] if rounded else [float(x) for x in ijk]

    def slice_offsets(self):
        return {node.GetName(): float(node.GetSliceOffset()) for node in logic_outputs.nodesByClass(self.scene, "vtkMRMLSliceNode")}

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


def _record_rows(record) -> list[dict]:
    """The table's rows from a record already checked by ``anymc3d.contract.validate_record`` (results x labels,
    the Logic's row order): calibrated and raw probability, threshold, and the decision recomputed from them
    (the contract's rule: calibrated >= threshold; multiclass: the most probable label)."""
    from anymc3d.contract import decide

    rows = []
    for result in (record or {}).get("results") or []:
        probabilities = result["probabilities"]
        decided = decide(result["task"], result["labels"], probabilities, result["thresholds"])
        for label in result["labels"]:
            positive = decided[label]
            rows.append({"finding": label, "probability": float(probabilities[label]),
                         "raw": float(result["probabilities_raw"][label]), "threshold": float(result["thresholds"][label]),
                         "decision": "positive" if positive else "negative"})
    return rows


__all__ = ["GRADIENT_METHODS", "LoadedCase", "ReviewSession", "guarded_backend_command", "make_run_root", "record_options",
           "start_prediction_into", "sweep_stale_run_roots"]

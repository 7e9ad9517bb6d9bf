"""Seed-point similarity maps from a Markups point: ``anymc3d similarity`` in the background, shown as an overlay.

A ``SimilaritySession`` belongs to one Logic (its scene, its process runner, its backend command) and lasts as long
as the module: it writes each volume once to its temporary folder (NRRD through the storage node, as the prediction
path does; again only when the voxels or the geometry change) and gives each volume a feature cache folder, so the
backend (``--features-cache``) computes the token volume once and every later point only reads it. ``request``
converts the point's RAS to the volume's IJK (Slicer's IJK is SimpleITK's index order, which the backend's ``--seed``
takes), starts the process through the Logic's runner (event-driven, never blocking), and on success imports the map
as a scalar volume added to the slice views' image in the heatmap colours (inferno), replacing the previous
similarity map of that volume. A newer point cancels a running job; the newest waiting point starts when it ends.
``cleanup()`` removes the session's folder (caches included).

``SimilarityPointController`` observes a Markups point list (no Qt here: the Widget passes a ``schedule`` function
backed by ``qt.QTimer.singleShot`` to debounce; tests pass their own).
"""

import dataclasses
import json
import os
import shutil
import tempfile
import weakref

import numpy as np
import vtk

from . import outputs
from .process import ExitCode, lastErrorLine

SIMILARITY_FORMAT = "nrrd"  # double-precision geometry, as for prediction inputs
KIND_ATTRIBUTE = "AnyMC3D.Kind"
SIMILARITY_KIND = "similarity"
SEED_ATTRIBUTE = "AnyMC3D.SimilaritySeedIJK"
MODES = ("planecycle", "slicewise")


@dataclasses.dataclass
class SimilarityOptions:
    """Backend settings (``anymc3d similarity``) and display of the map."""

    device: str = "auto"
    precision: str = "auto"  # anymc3d.contract.PRECISIONS
    mode: str = "planecycle"
    inputSize: int = 224
    arch: str = ""
    opacity: float = 0.5
    threshold: float = 0.0  # cosines under it are transparent

    def commandLineArguments(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if int(self.inputSize) < 1:
            raise ValueError(f"inputSize must be >= 1, got {self.inputSize!r}")
        arguments = ["--device", self.device, "--precision", self.precision, "--mode", self.mode,
                     "--input-size", str(int(self.inputSize))]
        return arguments + (["--arch", self.arch] if self.arch else [])


@dataclasses.dataclass
class SimilarityResult:
    """Outcome of one point: ``status`` is "ok", "failed" or "cancelled"."""

    status: str
    message: str = ""
    node: object = None
    ijk: tuple = None
    cacheHit: bool = None
    exitCode: int = 0


def rasToIjk(volumeNode, ras):
    """The voxel (i, j, k) holding world point ``ras``: through the volume's parent transform (if any) and its
    RAS-to-IJK matrix, rounded. ValueError (one line) when the point is outside the volume."""
    local = [float(x) for x in ras]
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is not None:
        fromWorld = vtk.vtkGeneralTransform()
        transformNode.GetTransformFromWorld(fromWorld)
        local = list(fromWorld.TransformPoint(local))
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetRASToIJKMatrix(matrix)
    continuous = matrix.MultiplyPoint([*local, 1.0])[:3]
    ijk = tuple(int(np.floor(v + 0.5)) for v in continuous)  # nearest voxel centre (round half up, not to even)
    dims = volumeNode.GetImageData().GetDimensions()
    if any(not 0 <= v < n for v, n in zip(ijk, dims)):
        raise ValueError(f"Point ({local[0]:.1f}, {local[1]:.1f}, {local[2]:.1f}) is outside {volumeNode.GetName()} "
                         f"(voxel {ijk}, size {tuple(dims)})")
    return ijk


def _volumeStamp(volumeNode):
    """Changes when the voxels or the IJK-to-RAS change (then the volume is written again)."""
    matrix = outputs.matrixToArray(outputs.ijkToRasMatrix(volumeNode))
    return (volumeNode.GetImageData().GetMTime(), tuple(matrix.flatten().tolist()))


class SimilarityJob:
    """One ``anymc3d similarity`` process for one point of one volume, and the import of its map."""

    def __init__(self, session, volumeNode, ijk, onFinished):
        self.session = session
        self.volumeNode = volumeNode
        self.ijk = ijk
        self.onFinished = onFinished
        self.command = None
        self.outPath = None
        self.stdoutLog = []
        self.stderrLog = []
        self.result = None
        self.started = False

    @property
    def done(self):
        return self.result is not None

    def start(self):
        self.started = True
        try:
            self.command, self.outPath = self.session.buildCommand(self.volumeNode, self.ijk)
            self.session.logic.startBackend(self.command, self.stdoutLog.append, self._onStderrLine, self._onFinished)
        except Exception as error:  # noqa: BLE001 - a start failure is a failed point, shown in one line
            self._finish(SimilarityResult("failed", f"Cannot start the backend: {error}", ijk=self.ijk,
                                          exitCode=int(ExitCode.FATAL)))

    def cancel(self):
        if self.done:
            return
        if self.started:
            self.session.logic.runner.cancel()
        else:
            self._finish(SimilarityResult("cancelled", "Cancelled", ijk=self.ijk, exitCode=int(ExitCode.CANCELLED)))

    def wait(self, timeout=None):
        """Deliver the runner's callbacks until this job is finished (tests, scripts). False on timeout."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if deadline is not None and time.monotonic() > deadline:
                return False
            self.session.logic.runner.processEvents(0.05)
        return True

    def _onStderrLine(self, line):
        self.stderrLog.append(line)
        del self.stderrLog[:-200]

    def _onFinished(self, exitCode):
        if exitCode == ExitCode.CANCELLED:
            result = SimilarityResult("cancelled", "Cancelled", ijk=self.ijk, exitCode=int(exitCode))
        elif exitCode != 0:
            message = lastErrorLine(self.stderrLog) or f"The backend exited with code {exitCode}"
            result = SimilarityResult("failed", message, ijk=self.ijk, exitCode=int(exitCode))
        else:
            try:
                report = self._report()
                node = self.session.importMap(self.outPath, self.volumeNode, self.ijk)
                hit = report.get("features_cache")
                result = SimilarityResult("ok", "", node, self.ijk, None if hit is None else hit == "hit")
            except Exception as error:  # noqa: BLE001 - nothing imported, one line
                result = SimilarityResult("failed", f"Cannot import the similarity map: {error}", ijk=self.ijk)
        if self.outPath:
            try:
                os.remove(self.outPath)
            except OSError:
                pass
        self._finish(result)

    def _report(self):
        """The backend's last stdout line: ``{"out": [...], "features_cache": "hit"|"miss"|null, ...}``."""
        for line in reversed(self.stdoutLog):
            if line.strip().startswith("{"):
                report = json.loads(line)
                if isinstance(report, dict) and "out" in report:
                    return report
        raise ValueError("the backend reported no output")

    def _finish(self, result):
        self.result = result
        if self.onFinished:
            self.onFinished(result)
        self.session._jobFinished(self)


class SimilaritySession:
    """Similarity maps for the volumes of one Logic's scene, with per-volume inputs and feature caches.

    Args:
        logic: an ``AnyMC3DSlicerLogic`` (its scene, runner, backend command and environment, tempRoot).
        backbonePath: the backbone weights file.
        options: ``SimilarityOptions``.
    """

    def __init__(self, logic, backbonePath, options=None):
        self.logic = logic
        self.backbonePath = str(backbonePath)
        self.options = options if options is not None else SimilarityOptions()
        self._tempDir = None
        self._finalizer = None
        self._volumes = {}  # volume node ID -> (stamp, input path, cache folder, index)
        self._counter = 0
        self.job = None  # the running job
        self.pending = None  # the newest point waiting for the running job to end

    @property
    def tempDir(self):
        """The session's folder (inputs, feature caches, maps), made on first use: a module opened without a
        similarity click leaves nothing behind, even when its process ends without cleanup."""
        if self._tempDir is None:
            self._tempDir = tempfile.mkdtemp(prefix="AnyMC3D-similarity-", dir=self.logic.tempRoot)
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._tempDir, True)
        return self._tempDir

    # Volumes and command ---------------------------------------------------------------------------------------

    def inputFor(self, volumeNode):
        """``(input file, cache folder)`` of a volume: written on first use and again only when it changed."""
        stamp = _volumeStamp(volumeNode)
        known = self._volumes.get(volumeNode.GetID())
        if known is not None and known[0] == stamp and os.path.isfile(known[1]):
            return known[1], known[2]
        index = len(self._volumes) if known is None else known[3]
        path = os.path.join(self.tempDir, "inputs", f"volume{index}.{SIMILARITY_FORMAT}")
        cacheDir = os.path.join(self.tempDir, "features", f"volume{index}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.logic.writeInputVolume(volumeNode, path)
        self._volumes[volumeNode.GetID()] = (stamp, path, cacheDir, index)
        return path, cacheDir

    def buildCommand(self, volumeNode, ijk):
        """``anymc3d similarity IMAGE --seed i,j,k --backbone W --out FILE --features-cache DIR ...``"""
        path, cacheDir = self.inputFor(volumeNode)
        self._counter += 1
        outPath = os.path.join(self.tempDir, "maps", f"similarity{self._counter}.{SIMILARITY_FORMAT}")
        os.makedirs(os.path.dirname(outPath), exist_ok=True)
        command = self.logic.backendCommand + [
            "similarity", path, "--seed", ",".join(str(v) for v in ijk), "--backbone", self.backbonePath,
            "--out", outPath, "--features-cache", cacheDir, *self.options.commandLineArguments()]
        return command, outPath

    def cacheFolder(self, volumeNode):
        known = self._volumes.get(volumeNode.GetID())
        return None if known is None else known[2]

    # Points ---------------------------------------------------------------------------------------------------

    def request(self, volumeNode, ras, onFinished=None):
        """Start the map of world point ``ras`` on ``volumeNode``; returns its ``SimilarityJob``.

        A point outside the volume finishes at once ("failed", one line, nothing started or added). While a job
        runs, it is cancelled and this point waits for it to end (a point still waiting is dropped, "cancelled").
        """
        job = SimilarityJob(self, volumeNode, None, onFinished)
        try:
            job.ijk = rasToIjk(volumeNode, ras)
            if not os.path.isfile(self.backbonePath):
                raise ValueError(f"Select the backbone weights file first (not found: {self.backbonePath or 'none'})")
        except ValueError as error:
            job._finish(SimilarityResult("failed", str(error), ijk=job.ijk))
            return job
        if self.job is not None:
            if self.pending is not None:
                self.pending.cancel()
            self.pending = job
            self.job.cancel()
            return job
        if self.logic.runner.isRunning():
            job._finish(SimilarityResult("failed", "The backend is busy (a prediction is running); place the point "
                                         "again when it has finished", ijk=job.ijk))
            return job
        self.job = job
        job.start()
        return job

    def _jobFinished(self, job):
        if job is self.pending:
            self.pending = None
        if job is not self.job:
            return
        self.job = None
        if self.pending is not None:
            self.job, self.pending = self.pending, None
            self.job.start()

    def cancel(self):
        if self.pending is not None:
            self.pending.cancel()
        if self.job is not None:
            self.job.cancel()

    def cleanup(self):
        """Cancel, then remove the session's folder (inputs, caches, maps)."""
        self.cancel()
        self._volumes.clear()
        if self._finalizer is not None:
            self._finalizer()
        self._tempDir = self._finalizer = None  # a later use makes a new folder

    # Scene ----------------------------------------------------------------------------------------------------

    def similarityNodes(self, volumeNode):
        return [node for node in outputs.nodesByClass(self.logic.scene, "vtkMRMLScalarVolumeNode") if node.GetAttribute(KIND_ATTRIBUTE) == SIMILARITY_KIND
                and node.GetNodeReferenceID(outputs.INPUT_REFERENCE) == volumeNode.GetID()]

    def importMap(self, path, volumeNode, ijk):
        """Load the map with exactly the volume's geometry, show it as foreground, remove the previous one."""
        previous = self.similarityNodes(volumeNode)
        node = outputs.loadHeatmapVolume(self.logic.scene, path, volumeNode, f"{volumeNode.GetName()} similarity")
        try:
            node.SetAttribute(KIND_ATTRIBUTE, SIMILARITY_KIND)
            node.SetAttribute(SEED_ATTRIBUTE, ",".join(str(v) for v in ijk))
            node.SetNodeReferenceID(outputs.INPUT_REFERENCE, volumeNode.GetID())
            outputs.setUpHeatmapDisplay(node, outputs.heatmapColorTableNode(self.logic.scene), self.options.threshold)
            outputs.showHeatmapInSliceViews(self.logic.scene, node, volumeNode, self.options.opacity)
        except Exception:
            outputs.removeNode(self.logic.scene, node)
            raise
        for old in previous:
            outputs.removeNode(self.logic.scene, old)
        return node


class SimilarityPointController:
    """Starts a similarity map when a point of a Markups point list is placed or moved (debounced).

    Observes ``PointModifiedEvent`` (fired for added, moved and removed points; callData: the point index as
    ``int*``, or null for several) and ``PointEndInteractionEvent`` (end of a drag), as declared in Slicer's
    Modules/Loadable/Markups/MRML/vtkMRMLMarkupsNode.h (commit 00a117087b694b3fd9633e14b7815efef288aa93). Only points
    with a defined position count: a point being placed is a moving "preview" point until the click.

    Args:
        session: the ``SimilaritySession``.
        volumeNode: a function returning the current volume node (or None).
        schedule: ``schedule(milliseconds, callback)``; the Widget passes ``qt.QTimer.singleShot``.
        onStatus: ``onStatus(text)`` for the status line; onResult: ``onResult(SimilarityResult)``.
        delayMs: debounce delay; a burst of events starts one job, for the last point touched.
        configure: ``configure(session)`` just before each request (the Widget sets the backbone and device).
    """

    def __init__(self, session, volumeNode, schedule, onStatus=None, onResult=None, delayMs=300, configure=None):
        self.session = session
        self.configure = configure
        self.volumeNode = volumeNode
        self.schedule = schedule
        self.onStatus = onStatus
        self.onResult = onResult
        self.delayMs = delayMs
        self.markupsNode = None
        self._observations = []
        self._pointIndex = None
        self._generation = 0
        self.lastJob = None

    def setMarkupsNode(self, markupsNode):
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations = []
        self.markupsNode = markupsNode
        if markupsNode is not None:
            for event in (markupsNode.PointModifiedEvent, markupsNode.PointEndInteractionEvent):
                self._observations.append((markupsNode, markupsNode.AddObserver(event, self._onPointEvent)))

    @vtk.calldata_type(vtk.VTK_INT)
    def _onPointEvent(self, caller, event, callData=None):
        if callData is not None and self._isPreview(callData):
            # Persistent place mode: after each click a preview point follows the mouse, each move an event with
            # its index; it must neither start a job nor restart the debounce of the point just placed.
            return
        self._pointIndex = callData
        self._generation += 1
        generation = self._generation
        self.schedule(self.delayMs, lambda: self._fire(generation))

    def _fire(self, generation):
        if generation != self._generation or self.markupsNode is None:
            return  # a later event is pending: only the last of a burst starts a job
        index = self._definedPoint(self._pointIndex)
        volumeNode = self.volumeNode()
        if index is None or volumeNode is None:
            return
        ras = [0.0, 0.0, 0.0]
        self.markupsNode.GetNthControlPointPositionWorld(index, ras)
        if self.configure:
            self.configure(self.session)
        self._status("Computing the similarity map\u2026")
        self.lastJob = self.session.request(volumeNode, ras, self._onFinished)

    def _isPreview(self, index):
        node = self.markupsNode
        return (node is not None and 0 <= index < node.GetNumberOfControlPoints()
                and node.GetNthControlPointPositionStatus(index) == node.PositionPreview)

    def _definedPoint(self, index):
        node = self.markupsNode
        defined = [i for i in range(node.GetNumberOfControlPoints())
                   if node.GetNthControlPointPositionStatus(i) == node.PositionDefined]
        if index is not None:  # that point, once placed (a preview point starts nothing)
            return index if index in defined else None
        return defined[-1] if defined else None  # null callData: several points changed

    def _onFinished(self, result):
        if result.status == "ok":
            self._status(f"Similarity map of voxel {result.ijk}" + (" (cached features)" if result.cacheHit else ""))
        elif result.status == "failed":
            self._status(result.message)
        if self.onResult:
            self.onResult(result)

    def _status(self, text):
        if self.onStatus:
            self.onStatus(text)

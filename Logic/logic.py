"""AnyMC3DSlicerLogic: moves data between the MRML scene and the ``anymc3d`` backend process.

The Logic gets the scene and a process runner in its constructor, so the same code runs in the Slicer
application (``QProcessRunner``) and in pytest on a slicer-core scene (``SubprocessRunner`` or a fake runner).
A prediction is asynchronous: ``startPrediction`` writes the inputs to a fresh temporary folder, starts
``anymc3d predict ... --progress json`` and returns a ``PredictionJob``; progress arrives by stage through a
callback, and at the end the results are imported only if the exit code is 0 and every expected output exists.
The temporary folder is removed whatever the outcome; a failed or cancelled run leaves the scene as it was.
"""

import concurrent.futures
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import slicer
from anymc3d.contract import (
    FINDING_METHODS,
    HEATMAP_FORMATS,
    heatmap_name,
    image_stem,
    is_image_name,
    safe_name,
    validate_record,
    validate_records,
)

from . import outputs
from .parameters import DisplayOptions, PredictionOptions
from .process import ExitCode, SubprocessRunner, lastErrorLine, parseEventLine

INPUT_FORMAT = "nrrd"  # NRRD stores the geometry in double precision (NIfTI in float32): IJK-to-RAS kept exactly

# Share of the progress bar per stage of one case.
STAGE_RANGES = {"starting": (0.0, 0.0), "reading": (0.0, 0.05), "encoding": (0.05, 0.8), "heatmap": (0.8, 0.9),
                "writing": (0.9, 0.95), "importing": (0.95, 1.0), "done": (1.0, 1.0)}


@dataclasses.dataclass
class Progress:
    """One progress report: ``stage`` is starting, reading, encoding, heatmap, writing, importing or done."""

    stage: str
    fraction: float
    done: int = 0
    total: int = 0
    case: int = 0
    cases: int = 1

    @property
    def message(self):
        if self.stage == "encoding" and self.total:
            return f"Encoding slices {self.done}/{self.total}"
        return {"starting": "Starting the backend", "reading": "Reading the volume", "heatmap": "Computing the heatmap",
                "writing": "Writing the results", "importing": "Importing the results", "done": "Done"}.get(self.stage, self.stage)


@dataclasses.dataclass
class PredictionOutputs:
    """The nodes a successful prediction added to the scene."""

    inputNode: object
    tableNode: object
    heatmapNodes: list
    importanceTableNode: object
    chartNode: object
    folderItem: int
    record: dict


@dataclasses.dataclass
class CaseResult:
    """Outcome of one case: ``status`` is "ok", "failed" or "cancelled"."""

    name: str
    status: str
    message: str = ""
    exitCode: int = 0
    outputs: PredictionOutputs = None


def fileSafe(name):
    """File-safe name of a node, by the contract's rule (``anymc3d.contract.safe_name``); never empty."""
    return safe_name(str(name)) or "volume"


def imageStem(path):
    """The contract's image stem (``case1`` for ``case1.nii.gz``)."""
    return image_stem(str(path))


def imageFilesInFolder(folder):
    """The cases of a folder: finished image files by the contract's rule (the backend's own ``.partial`` and
    hidden files are never cases)."""
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if is_image_name(name) and os.path.isfile(os.path.join(folder, name)))


def defaultRunner():
    try:
        import qt  # noqa: F401
    except ImportError:
        return SubprocessRunner()
    from .process import QProcessRunner

    return QProcessRunner()


def defaultBackendCommand():
    """``PythonSlicer -m anymc3d`` in Slicer (PythonSlicer is on PATH there), else this Python."""
    return [shutil.which("PythonSlicer") or sys.executable, "-m", "anymc3d"]


def _moduleLogic(scene, moduleName, className):
    modules = getattr(slicer, "modules", None)
    if modules is not None and hasattr(modules, moduleName):
        return getattr(modules, moduleName).logic()
    logic = getattr(slicer, className)()
    logic.SetMRMLScene(scene)
    return logic


def _deliverUntilDone(job, timeout):
    """Deliver the runner's callbacks (and a job's heatmaps read ahead) until ``job.done``; False when ``timeout``
    seconds pass first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not job.done:
        if deadline is not None and time.monotonic() > deadline:
            return False
        job.logic.runner.processEvents(0.05)
        poll = getattr(job, "pollHeatmaps", None)
        if poll is not None:
            poll()
    return True


def _waitOrCancel(job, timeout):
    """Block until ``job`` ends; past ``timeout`` seconds cancel it and wait for the cancellation."""
    if not job.wait(timeout):
        job.cancel()
        job.wait(30)


class PredictionJob:
    """One running ``anymc3d predict`` process and the import of its results."""

    def __init__(self, logic, name, inputs, command, tempDir, pluginCount, options, displayOptions, onProgress, onFinished):
        self.logic = logic
        self.name = name
        self.inputs = inputs
        self.command = command
        self.tempDir = tempDir
        self.pluginCount = pluginCount
        self.options = options
        self.displayOptions = displayOptions
        self.onProgress = onProgress
        self.onFinished = onFinished
        self.jsonPath = os.path.join(tempDir, "results.json")
        self.heatmapDir = os.path.join(tempDir, "heatmaps")
        self.stdoutLog = []
        self.stderrLog = []
        self.events = []
        self.caseErrors = []
        self.result = None
        self.heatmapStem = None  # the stem the backend names this case's heatmaps by (set by startPrediction)
        self._caseBase = None
        self.heatmapReads = {}  # path -> Future of outputs.readVolumeFile: heatmaps read ahead, still to fill in
        self.heatmapErrors = {}  # path -> one-line error of a heatmap that could not be filled in

    @property
    def done(self):
        """The result is reported and every heatmap read ahead is in (the run's folder is then removed)."""
        return self.result is not None and not self.heatmapReads

    def start(self):
        self._report(Progress("starting", 0.0))
        try:
            self.logic.startBackend(self.command, self._onStdoutLine, self._onStderrLine, self._onFinished)
        except Exception as error:  # noqa: BLE001 - any start failure is a failed case
            self._finish(CaseResult(self.name, "failed", f"Cannot start the backend: {error}", int(ExitCode.FATAL)))

    def cancel(self):
        if not self.done:
            self.logic.runner.cancel()

    def wait(self, timeout=None):
        """Deliver the runner's callbacks until the job is finished (tests, self-test). False on timeout."""
        return _deliverUntilDone(self, timeout)

    # Backend output

    def _onStdoutLine(self, line):
        event = parseEventLine(line)
        if event is None:
            self.stdoutLog.append(line)
            return
        self.events.append(event)
        kind = event["event"]
        if kind == "progress":
            case, cases = int(event.get("case", 0)), max(1, int(event.get("cases", 1)))
            if self._caseBase is None:
                self._caseBase = 0 if case == 0 else 1  # the contract does not say whether cases count from 0 or 1
            caseIndex = min(max(case - self._caseBase, 0), cases - 1)
            stage = str(event.get("stage", ""))
            done, total = int(event.get("done", 0)), int(event.get("total", 0))
            low, high = STAGE_RANGES.get(stage, (0.0, 0.95))
            within = low + (high - low) * (done / total if total else 0.0)
            self._report(Progress(stage, (caseIndex + within) / cases, done, total, caseIndex, cases))
        elif kind == "case_done" and event.get("status") != "ok":
            self.caseErrors.append(str(event.get("error") or "unknown error"))

    def _onStderrLine(self, line):
        self.stderrLog.append(line)
        del self.stderrLog[:-200]

    def _onFinished(self, exitCode):
        if exitCode == ExitCode.CANCELLED:
            result = CaseResult(self.name, "cancelled", "Cancelled", int(ExitCode.CANCELLED))
        elif exitCode != 0:
            message = "; ".join(self.caseErrors) or lastErrorLine(self.stderrLog) or f"The backend exited with code {exitCode}"
            result = CaseResult(self.name, "failed", message, int(exitCode))
        else:
            try:
                self._report(Progress("importing", STAGE_RANGES["importing"][0]))
                record = self.logic.readRecord(self.jsonPath, self.pluginCount, self.tempDir, self.options,
                                               heatmapStem=self.heatmapStem)
                importedOutputs = self._import(record)
                result = CaseResult(self.name, "ok", "", 0, importedOutputs)
            except Exception as error:  # noqa: BLE001 - a failed import is a failed case (scene rolled back)
                result = CaseResult(self.name, "failed", f"Cannot import the results: {error}", 0)
        self._finish(result)

    def _import(self, record):
        """Import the record. With the Logic's ``readAhead``: only the heatmap shown first is read now; the others
        are imported pending and read in threads (:meth:`pollHeatmaps` fills them in on this thread)."""
        if not self.logic.readAhead:
            return self.logic.importResults(record, self.inputs, self.options, self.displayOptions)
        first = self.logic.firstHeatmapFile(record, self.options)
        preread = {first: self._readHeatmap(first)} if first else {}
        imported = self.logic.importResults(record, self.inputs, self.options, self.displayOptions, preread=preread,
                                            defer=True)
        pending = {outputs.pendingHeatmapFile(node) for node in imported.heatmapNodes} - {None}
        if pending:
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="AnyMC3D-read")
            self.heatmapReads = {path: pool.submit(self._readHeatmap, path) for path in sorted(pending)}
            pool.shutdown(wait=False)
        return imported

    def _readHeatmap(self, path):
        """One heatmap file (with its 3D-view blocks): SimpleITK and numpy release the GIL, so this runs in a thread."""
        display = self.displayOptions
        return outputs.readVolumeFile(path, blockMaxSize=display.volumeRenderingMaxSize if display.volumeRendering else 0)

    def pollHeatmaps(self):
        """Fill in the heatmaps whose files have been read (on the caller's, i.e. the GUI, thread); once all are in,
        remove the run's folder. Rescheduled through the Logic's ``schedule`` while some are still being read."""
        if self.result is None or self.result.outputs is None:
            return
        for path, future in list(self.heatmapReads.items()):
            if not future.done():
                continue
            del self.heatmapReads[path]
            for node in self.result.outputs.heatmapNodes:
                if outputs.pendingHeatmapFile(node) != path or node.GetScene() is None:
                    continue  # filled already, or removed meanwhile (scene closed)
                try:
                    self.logic.completeHeatmap(self.result.outputs.tableNode, node, future.result(), self.displayOptions)
                except (ValueError, OSError) as error:
                    self.heatmapErrors[path] = str(error)
        if self.heatmapReads:
            if self.logic.schedule is not None:
                self.logic.schedule(50, self.pollHeatmaps)
        else:
            shutil.rmtree(self.tempDir, ignore_errors=True)

    def _finish(self, result):
        """Report; the temporary folder is removed now (whatever the outcome) or, while heatmaps are still being
        read from it, once they are in (:meth:`pollHeatmaps`)."""
        if not self.heatmapReads:
            shutil.rmtree(self.tempDir, ignore_errors=True)
        elif self.logic.schedule is not None:
            self.logic.schedule(50, self.pollHeatmaps)
        self.result = result
        if result.status == "ok":
            self._report(Progress("done", 1.0))
        if self.onFinished:
            self.onFinished(result)

    def _report(self, progress):
        if self.onProgress:
            self.onProgress(progress)


class BatchJob:
    """Cases run one after another; a bad case is reported and skipped. ``results``: one CaseResult per case."""

    def __init__(self, logic, cases, startCase, onCaseDone, onFinished, onProgress):
        self.logic = logic
        self.cases = list(cases)
        self.startCase = startCase
        self.onCaseDone = onCaseDone
        self.onFinished = onFinished
        self.onProgress = onProgress
        self.results = []
        self.current = None
        self.cancelled = False
        self.done = False

    def start(self):
        self._next()

    def _next(self):
        index = len(self.results)
        if self.cancelled or index >= len(self.cases):
            self.done = True
            if self.onFinished:
                self.onFinished(self.results)
            return

        def caseProgress(progress):
            if self.onProgress:
                self.onProgress(dataclasses.replace(progress, case=index, cases=len(self.cases),
                                                    fraction=(index + progress.fraction) / len(self.cases)))

        self.current = self.startCase(self.cases[index], caseProgress, self._onCaseFinished)

    def _onCaseFinished(self, result):
        self.results.append(result)
        if result.status == "cancelled":
            self.cancelled = True
        if self.onCaseDone:
            self.onCaseDone(result)
        self._next()

    def cancel(self):
        self.cancelled = True
        if self.current is not None:
            self.current.cancel()

    def wait(self, timeout=None):
        return _deliverUntilDone(self, timeout)


class AnyMC3DSlicerLogic:
    """Runs the backend on scene volumes (or image files) and imports its results into the scene.

    Args:
        scene: the vtkMRMLScene (``slicer.mrmlScene`` in the application).
        runner: a ProcessRunner; default QProcessRunner in Slicer, SubprocessRunner elsewhere.
        backendCommand: the command prefix that runs the CLI; default ``[PythonSlicer, "-m", "anymc3d"]``.
        backendPath: a folder holding the ``anymc3d`` package, put first on the process's PYTHONPATH (or None).
        volumesLogic, volumeRenderingLogic: the module logics; default Slicer's, or new ones on ``scene``.
        tempRoot: where the per-run temporary folders are made (default: the system's).

    ``readAhead`` / ``schedule`` (default off; the Slicer module sets them): see the class attributes.

    ``keepBackendReady`` (default False; the Slicer module sets it): keep one ``anymc3d standby`` process started
    ahead of the next run, so that Apply does not wait for torch, timm and peft to import (9 s of the backend's
    start-up on 2 cores, see benchmarks/results). It holds the imported libraries in memory (~0.5 GB) while idle.
    """

    keepBackendReady = False
    #: import a run's results with only the first-shown heatmap read at once, the others read in threads and filled
    #: in by ``PredictionJob.pollHeatmaps`` (the Slicer module sets it, with ``schedule``)
    readAhead = False
    #: ``schedule(milliseconds, callback)`` on the GUI thread's event loop (the module passes ``qt.QTimer.singleShot``);
    #: None: callers poll (``job.wait``)
    schedule = None

    def __init__(self, scene, runner=None, backendCommand=None, backendPath=None, volumesLogic=None,
                 volumeRenderingLogic=None, tempRoot=None):
        self.scene = scene
        self.runner = runner if runner is not None else defaultRunner()
        self.backendCommand = list(backendCommand) if backendCommand else defaultBackendCommand()
        self.backendPath = backendPath
        self.volumesLogic = volumesLogic or _moduleLogic(scene, "volumes", "vtkSlicerVolumesLogic")
        self.volumeRenderingLogic = volumeRenderingLogic or _moduleLogic(scene, "volumerendering", "vtkSlicerVolumeRenderingLogic")
        self.tempRoot = tempRoot

    # Command line -------------------------------------------------------------------------------------------

    def backendEnvironment(self):
        env = dict(os.environ)
        if self.backendPath:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.backendPath), env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def startBackend(self, command, onStdoutLine, onStderrLine, onFinished):
        """Run ``command`` (``backendCommand + arguments``) through the runner.

        The arguments go as one JSON line to ``anymc3d standby`` on stdin, so a process kept ready serves the run
        and a new one runs the very same protocol; each run is still its own process (Cancel kills it). After the
        run a new process is kept ready when ``keepBackendReady`` is set.
        """
        prefix = list(self.backendCommand)
        if [str(c) for c in command[:len(prefix)]] != [str(c) for c in prefix]:
            raise ValueError(f"not a backend command: {command[:3]}")
        arguments = [str(c) for c in command[len(prefix):]]

        def finished(exitCode):
            onFinished(exitCode)
            self.prepareBackend()

        self.runner.start(prefix + ["standby"], onStdoutLine, onStderrLine, finished, env=self.backendEnvironment(),
                          stdinText=json.dumps(arguments) + "\n")

    def prepareBackend(self):
        """Keep one backend process ready for the next run (when ``keepBackendReady``; a no-op otherwise)."""
        if self.keepBackendReady:
            self.runner.prepare(self.backendCommand + ["standby"], env=self.backendEnvironment())

    def close(self):
        """End the process kept ready (the module's cleanup; it would also end when Slicer exits)."""
        self.runner.close()

    def buildCommand(self, imageArguments, backbonePath, pluginPaths, heatmapDir, jsonPath, options):
        """``anymc3d predict IMAGE... --backbone W --plugin P... --heatmap DIR --json OUT --progress json ...``"""
        command = self.backendCommand + ["predict", *[str(image) for image in imageArguments], "--backbone", str(backbonePath)]
        for pluginPath in pluginPaths:
            command += ["--plugin", str(pluginPath)]
        command += ["--heatmap", str(heatmapDir), "--heatmap-format", INPUT_FORMAT, "--json", str(jsonPath), "--progress", "json"]
        return command + options.commandLineArguments()

    def writeInputVolume(self, volumeNode, path):
        """Write a volume node to ``path`` with its IJK-to-RAS (the storage node converts RAS to the file's LPS)."""
        writer = slicer.vtkMRMLVolumeArchetypeStorageNode()  # not added to the scene
        writer.SetFileName(str(path))
        writer.SetUseCompression(False)
        if not writer.WriteData(volumeNode):
            raise OSError(f"Cannot write {volumeNode.GetName()} to {path}")

    # Prediction ---------------------------------------------------------------------------------------------

    def startPrediction(self, inputs, backbonePath, pluginPaths, options=None, displayOptions=None, onProgress=None,
                        onFinished=None, name=None):
        """Start one case. ``inputs``: volume nodes or image files, one per view in the plugin's view order."""
        options = options if options is not None else PredictionOptions()
        displayOptions = displayOptions if displayOptions is not None else DisplayOptions()
        inputs = list(inputs)
        if not inputs:
            raise ValueError("No input volume")
        if not pluginPaths:
            raise ValueError("No plugin selected")
        name = name or self.inputName(inputs[0])
        tempDir = tempfile.mkdtemp(prefix="AnyMC3D-", dir=self.tempRoot)
        try:
            imagePaths = []
            for index, item in enumerate(inputs):
                if isinstance(item, (str, os.PathLike)):
                    imagePaths.append(os.path.abspath(item))
                else:
                    os.makedirs(os.path.join(tempDir, "inputs"), exist_ok=True)
                    prefix = f"view{index}_" if len(inputs) > 1 else ""
                    path = os.path.join(tempDir, "inputs", f"{prefix}{fileSafe(item.GetName())}.{INPUT_FORMAT}")
                    self.writeInputVolume(item, path)
                    imagePaths.append(path)
            job = PredictionJob(self, name, inputs, None, tempDir, 1 if options.ensemble else len(pluginPaths),
                                options, displayOptions, onProgress, onFinished)
            os.makedirs(job.heatmapDir)
            job.heatmapStem = imageStem(imagePaths[0])
            job.command = self.buildCommand(["+".join(imagePaths)], backbonePath, pluginPaths, job.heatmapDir, job.jsonPath, options)
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        job.start()
        return job

    def runPrediction(self, inputs, backbonePath, pluginPaths, options=None, displayOptions=None, onProgress=None, timeout=None):
        """Blocking variant (tests, scripts, self-test): returns the CaseResult."""
        job = self.startPrediction(inputs, backbonePath, pluginPaths, options, displayOptions, onProgress)
        _waitOrCancel(job, timeout)
        return job.result

    def startBatch(self, cases, backbonePath, pluginPaths, options=None, displayOptions=None, onCaseDone=None,
                   onFinished=None, onProgress=None):
        """Run cases one after another. A case is a volume node, an image file, or a list of them (views)."""
        def startCase(case, onCaseProgress, onCaseFinished):
            inputs = case if isinstance(case, (list, tuple)) else [case]
            try:
                return self.startPrediction(inputs, backbonePath, pluginPaths, options, displayOptions,
                                            onCaseProgress, onCaseFinished)
            except Exception as error:  # noqa: BLE001 - e.g. a volume that cannot be written: report it, go on
                onCaseFinished(CaseResult(self.inputName(inputs[0]), "failed", str(error), int(ExitCode.FATAL)))
                return None

        batch = BatchJob(self, cases, startCase, onCaseDone, onFinished, onProgress)
        batch.start()
        return batch

    def runBatch(self, cases, backbonePath, pluginPaths, options=None, displayOptions=None, onCaseDone=None, timeout=None):
        batch = self.startBatch(cases, backbonePath, pluginPaths, options, displayOptions, onCaseDone)
        _waitOrCancel(batch, timeout)
        return batch.results

    @staticmethod
    def batchCasesFromFolder(folder):
        return imageFilesInFolder(folder)

    @staticmethod
    def inputName(item):
        return imageStem(str(item)) if isinstance(item, (str, os.PathLike)) else item.GetName()

    # Results ------------------------------------------------------------------------------------------------

    def readRecord(self, jsonPath, pluginCount, tempDir, options, heatmapStem=None):
        """Read the backend's JSON (checked by the contract's ``validate_records``) and check its one record."""
        if not os.path.isfile(jsonPath):
            raise ValueError(f"The backend wrote no result file {jsonPath}")
        with open(jsonPath, encoding="utf-8") as file:
            records = validate_records(json.load(file))
        if len(records) != 1:
            raise ValueError(f"{jsonPath}: expected one JSON record, got {len(records)}")
        return self.checkRecord(records[0], pluginCount, tempDir, options, heatmapStem=heatmapStem)

    def checkRecord(self, record, pluginCount, rootDir, options, heatmapStem=None):
        """Check one record: the contract (``anymc3d.contract.validate_record``: fields, types, probabilities,
        decisions), then what this run asked for: status ok, one result per plugin, the heatmap method's maps,
        each present, inside ``rootDir`` and, given ``heatmapStem``, named by the contract's ``heatmap_name``."""
        validate_record(record)
        if record["status"] != "ok":
            raise ValueError(record.get("error") or "The case failed")
        results = record["results"]
        if len(results) != pluginCount:
            raise ValueError(f"Expected {pluginCount} plugin result(s), got {len(results)}")
        gradient = options.heatmapMethod in FINDING_METHODS
        root = os.path.realpath(rootDir)
        for result in results:
            if gradient and set(result["finding_heatmaps"]) != set(result["labels"]):
                raise ValueError(f"Plugin {result['plugin']}: expected one heatmap per finding")
            maps = dict(result["finding_heatmaps"]) if gradient else {None: result["heatmap"]}
            for label, path in maps.items():
                if not path or not os.path.isfile(path):
                    raise ValueError(f"Plugin {result['plugin']}: heatmap file missing ({path})")
                if os.path.commonpath([os.path.realpath(path), root]) != root:
                    raise ValueError(f"Plugin {result['plugin']}: heatmap outside the run's folder ({path})")
                if heatmapStem is not None:
                    names = {heatmap_name(heatmapStem, result["plugin"], label, fmt) for fmt in HEATMAP_FORMATS}
                    if os.path.basename(path) not in names:
                        raise ValueError(f"Plugin {result['plugin']}: heatmap {path} is not named by the contract "
                                         f"({' or '.join(sorted(names))})")
            if len(result["slice_importance"]) != int(record["num_slices"]):
                raise ValueError(f"Plugin {result['plugin']}: slice importance does not have num_slices values")
        return record

    def importResults(self, record, inputs, options=None, displayOptions=None, preread=None, defer=False):
        """Add the table, heatmaps, displays and chart of one record. All or nothing: on error, nothing is left.

        ``preread``: ``{path: outputs.readVolumeFile(path)}`` for files already read (e.g. in a thread); the others
        are read here, or with ``defer`` imported as pending heatmap nodes (``outputs.pendingHeatmapVolume``) that
        :meth:`completeHeatmap` fills when their files have been read: a viewer shows the first finding sooner."""
        preread = preread or {}
        options = options if options is not None else PredictionOptions()
        displayOptions = displayOptions if displayOptions is not None else DisplayOptions()
        nodesBefore = {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}
        folderItem = 0
        try:
            inputNodes = [self.loadInputFile(item, preread.get(str(item))) if isinstance(item, (str, os.PathLike)) else item
                          for item in inputs]
            outputs_, folderItem = self._importResults(record, inputNodes[0], options, displayOptions, preread, defer)
            return outputs_
        except Exception:
            if folderItem:
                slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene).RemoveItem(folderItem, False, False)
            added = [self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes())]
            for node in added:
                if node.GetID() not in nodesBefore:
                    self.scene.RemoveNode(node)
            raise

    def loadInputFile(self, path, data=None):
        """A case's image as a volume node named by its stem; ``data``: the file already read by
        ``outputs.readVolumeFile`` (same node as the volumes logic makes: default display, storage node)."""
        if data is not None:
            node = outputs.volumeNodeFromArray(data[0], data[1], imageStem(str(path)))
            self.scene.AddNode(node)
            windowRange = getattr(data, "windowRange", None)
            if windowRange is None:
                node.CreateDefaultDisplayNodes()
            else:  # the automatic window, computed where the file was read (not a histogram on this thread)
                outputs.createDisplayNodeWithWindow(node, windowRange)
            for attribute, pair in ((outputs.AUTO_WINDOW_ATTRIBUTE, windowRange),
                                    (outputs.VALUE_RANGE_ATTRIBUTE, getattr(data, "valueRange", None))):
                if pair is not None:  # kept for "automatic window" and the modality check, no pass over the voxels
                    node.SetAttribute(attribute, " ".join(repr(float(v)) for v in pair))
            node.AddDefaultStorageNode(str(path))
            return node
        node = self.volumesLogic.AddArchetypeVolume(str(path), imageStem(str(path)), 0)
        if node is None:
            raise ValueError(f"Cannot load {path}")
        return node

    def _importResults(self, record, inputNode, options, displayOptions, preread=None, defer=False):
        preread = preread or {}

        paths = {}  # heatmap node ID -> its file

        def heatmapVolume(path, name):
            if defer and path not in preread:
                node = outputs.pendingHeatmapVolume(self.scene, path, inputNode, name)
            else:
                node = outputs.loadHeatmapVolume(self.scene, path, inputNode, name, preread.get(path))
            paths[node.GetID()] = path
            return node

        results = record["results"]
        uniqueNames = self._uniquePluginNames([result["plugin"] for result in results])
        inputName = inputNode.GetName()
        pluginTitle = " + ".join(uniqueNames)
        colorNode = outputs.heatmapColorTableNode(self.scene)
        gradient = options.heatmapMethod in FINDING_METHODS

        rows, rowHeatmaps, heatmapNodes = [], [], []
        for pluginName, result in zip(uniqueNames, results):
            if gradient:
                byLabel = {label: heatmapVolume(path, f"{inputName} {pluginName} heatmap {label}")
                           for label, path in result["finding_heatmaps"].items()}
                heatmapNodes += list(byLabel.values())
            else:
                heatmapNode = heatmapVolume(result["heatmap"], f"{inputName} {pluginName} heatmap")
                heatmapNodes.append(heatmapNode)
            for label in result["labels"]:
                rows.append({"Plugin": pluginName, "Finding": label,
                             "Probability": float(result["probabilities"][label]),
                             "Threshold": float((result.get("thresholds") or {}).get(label, float("nan"))),
                             "Decision": "positive" if (result.get("decisions") or {}).get(label) else "negative"})
                rowHeatmaps.append(byLabel[label] if gradient else heatmapNode)

        tableNode = outputs.createFindingsTable(self.scene, f"{inputName} {pluginTitle} findings", rows)
        tableNode.SetAttribute(outputs.SLICING_AXIS_ATTRIBUTE, str(int(record["slicing_axis"])))
        tableNode.SetAttribute("AnyMC3D.HeatmapMethod", options.heatmapMethod)
        tableNode.AddNodeReferenceID(outputs.INPUT_REFERENCE, inputNode.GetID())
        for heatmapNode in rowHeatmaps:
            tableNode.AddNodeReferenceID(outputs.HEATMAP_REFERENCE, heatmapNode.GetID())

        importanceTableNode, chartNode, seriesNodes = outputs.createImportanceChart(
            self.scene, f"{inputName} {pluginTitle} slice importance", int(record["slicing_axis"]),
            {name: result["slice_importance"] for name, result in zip(uniqueNames, results)})
        tableNode.SetNodeReferenceID(outputs.IMPORTANCE_REFERENCE, importanceTableNode.GetID())
        tableNode.SetNodeReferenceID(outputs.CHART_REFERENCE, chartNode.GetID())

        shownRow = int(np.argmax([row["Probability"] for row in rows])) if rows else 0
        for heatmapNode in heatmapNodes:
            outputs.setUpHeatmapDisplay(heatmapNode, colorNode, displayOptions.threshold)
            if displayOptions.volumeRendering and outputs.pendingHeatmapFile(heatmapNode) is None:
                data = preread.get(paths[heatmapNode.GetID()])
                outputs.setUpVolumeRendering(self.volumeRenderingLogic, heatmapNode, displayOptions.threshold,
                                             visible=heatmapNode is rowHeatmaps[shownRow],
                                             maxSize=displayOptions.volumeRenderingMaxSize,
                                             blocks=getattr(data, "blocks", None))
        copies = [h.GetNodeReference(outputs.VOLUME_RENDERING_COPY_REFERENCE) for h in heatmapNodes]
        folderItem = outputs.placeInSubjectHierarchy(
            self.scene, inputNode, f"AnyMC3D {pluginTitle}: {inputName}",
            [tableNode, *heatmapNodes, *[c for c in copies if c is not None], importanceTableNode, chartNode, *seriesNodes])
        self.selectFinding(tableNode, shownRow, displayOptions)
        return PredictionOutputs(inputNode, tableNode, heatmapNodes, importanceTableNode, chartNode, folderItem, record), folderItem

    @staticmethod
    def firstHeatmapFile(record, options=None):
        """The heatmap file of the row :meth:`importResults` shows first (the most probable finding, as there), or
        None: what a viewer reads first when it imports the others deferred."""
        gradient = (options if options is not None else PredictionOptions()).heatmapMethod in FINDING_METHODS
        rows = [(float(result["probabilities"][label]),
                 (result.get("finding_heatmaps") or {}).get(label) if gradient else result.get("heatmap"))
                for result in record.get("results") or [] for label in result.get("labels") or []]
        return rows[int(np.argmax([probability for probability, _ in rows]))][1] if rows else None

    @staticmethod
    def _uniquePluginNames(names):
        unique = []
        for name in names:
            candidate, counter = name, 2
            while candidate in unique:
                candidate, counter = f"{name} ({counter})", counter + 1
            unique.append(candidate)
        return unique

    # Display and navigation ---------------------------------------------------------------------------------

    @staticmethod
    def heatmapNodeForRow(tableNode, row):
        return tableNode.GetNthNodeReference(outputs.HEATMAP_REFERENCE, int(row))

    def selectFinding(self, tableNode, row, displayOptions=None):
        """Show the heatmap of a findings-table row: slice-view foreground, the only visible volume rendering."""
        displayOptions = displayOptions if displayOptions is not None else DisplayOptions()
        shown = self.heatmapNodeForRow(tableNode, row)
        tableNode.SetAttribute(outputs.SHOWN_ROW_ATTRIBUTE, str(int(row)))  # a heatmap filled later knows (completeHeatmap)
        for index in range(tableNode.GetNumberOfNodeReferences(outputs.HEATMAP_REFERENCE)):
            heatmapNode = tableNode.GetNthNodeReference(outputs.HEATMAP_REFERENCE, index)
            for displayNode in outputs.volumeRenderingDisplayNodes(heatmapNode):
                displayNode.SetVisibility(heatmapNode is shown and displayOptions.volumeRendering)
        outputs.showHeatmapInSliceViews(self.scene, shown, tableNode.GetNodeReference(outputs.INPUT_REFERENCE),
                                        displayOptions.opacity)
        return shown

    def completeHeatmap(self, tableNode, heatmapNode, data=None, displayOptions=None):
        """Give a pending heatmap of ``tableNode`` (``importResults(defer=True)``) its file's voxels (``data``: the
        file already read, with its 3D-view blocks), with the import's checks, and its 3D view (visible when its
        row is the one :meth:`selectFinding` showed last). Raises ValueError naming the file; the node then stays pending."""
        displayOptions = displayOptions if displayOptions is not None else DisplayOptions()
        inputNode = tableNode.GetNodeReference(outputs.INPUT_REFERENCE)
        outputs.fillHeatmapVolume(heatmapNode, inputNode, data)
        if displayOptions.volumeRendering:
            shownRow = tableNode.GetAttribute(outputs.SHOWN_ROW_ATTRIBUTE)
            shown = shownRow is not None and self.heatmapNodeForRow(tableNode, int(shownRow)) is heatmapNode
            outputs.setUpVolumeRendering(self.volumeRenderingLogic, heatmapNode, displayOptions.threshold,
                                         visible=shown, maxSize=displayOptions.volumeRenderingMaxSize,
                                         blocks=getattr(data, "blocks", None))
            copyNode = heatmapNode.GetNodeReference(outputs.VOLUME_RENDERING_COPY_REFERENCE)
            if copyNode is not None:  # next to its heatmap in the subject hierarchy
                outputs.placeBeside(self.scene, copyNode, heatmapNode)
        return heatmapNode

    def setHeatmapThreshold(self, heatmapNode, threshold):
        heatmapNode.GetDisplayNode().SetThreshold(float(threshold), 1.0)
        for displayNode in outputs.volumeRenderingDisplayNodes(heatmapNode):
            outputs.setHeatmapTransferFunctions(displayNode.GetVolumePropertyNode().GetVolumeProperty(), threshold)

    @staticmethod
    def heatmapMaximumRAS(heatmapNode):
        """RAS position of the heatmap's maximum voxel."""
        voxels = outputs.arrayFromVolumeNode(heatmapNode)
        k, j, i = np.unravel_index(int(np.argmax(voxels)), voxels.shape)
        return outputs.voxelToRas(heatmapNode, (i, j, k))

    @staticmethod
    def mostImportantSliceRAS(tableNode, row=0):
        """RAS position of the centre of the most important slice for the plugin of ``row``."""
        inputNode = tableNode.GetNodeReference(outputs.INPUT_REFERENCE)
        importanceTable = tableNode.GetNodeReference(outputs.IMPORTANCE_REFERENCE).GetTable()
        plugin = tableNode.GetCellText(int(row), 0)
        column = importanceTable.GetColumnByName(plugin) or importanceTable.GetColumn(1)
        importance = [column.GetValue(index) for index in range(column.GetNumberOfTuples())]
        axis = int(tableNode.GetAttribute(outputs.SLICING_AXIS_ATTRIBUTE))
        ijk = [(size - 1) / 2.0 for size in inputNode.GetImageData().GetDimensions()]
        ijk[axis] = int(np.argmax(importance))
        return outputs.voxelToRas(inputNode, ijk)

    def jumpSlicesTo(self, ras):
        """Centre every slice view on ``ras`` (no-op without slice views)."""
        slicer.vtkMRMLSliceNode.JumpAllSlices(self.scene, float(ras[0]), float(ras[1]), float(ras[2]),
                                              slicer.vtkMRMLSliceNode.CenteredJumpSlice)

    @staticmethod
    def estimatedSeconds(numSlices, device):
        """A rough expected run time, for the CPU note in the GUI (ViT-B: ~0.3 s per slice on a CPU)."""
        perSlice = 0.3 if device == "cpu" else 0.02
        return 10.0 + perSlice * int(numSlices)

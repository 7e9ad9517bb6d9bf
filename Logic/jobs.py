"""Running jobs of the Logic: one ``anymc3d predict`` process per case (``PredictionJob``), cases one after
another (``BatchJob``), and what they report (``Progress``, ``CaseResult``, ``PredictionOutputs``).

A job starts its process through the Logic (``AnyMC3DSlicerLogic.startBackend``, i.e. the Logic's process runner),
turns the backend's ``--progress json`` lines into ``Progress`` reports and, on exit code 0, has the Logic check and
import the record. The run's temporary folder is removed whatever the outcome.
"""

import concurrent.futures
import dataclasses
import os
import shutil
import time

from . import outputs
from .process import ExitCode, lastErrorLine, parseEventLine

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


def deliverUntilDone(job, timeout):
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


def waitOrCancel(job, timeout):
    """Block until ``job`` ends; past ``timeout`` seconds cancel it and wait for the cancellation."""
    if not job.wait(timeout):
        job.cancel()
        job.wait(30)


class BackendJob:
    """A job that runs one backend process at a time through the Logic's runner (``self.logic``, ``self.done``)."""

    def cancel(self):
        """Kill the running process tree; the job then ends as cancelled."""
        if not self.done:
            self.logic.runner.cancel()

    def wait(self, timeout=None):
        """Deliver the runner's callbacks until the job is finished (tests, self-test). False on timeout."""
        return deliverUntilDone(self, timeout)


class PredictionJob(BackendJob):
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
        return deliverUntilDone(self, timeout)

"""Train and evaluate a plugin from the case table (trainingtable.py), in the background, through the Logic's process
runner (the one predictions use: Cancel kills the process tree, the GUI thread only receives lines).

A :class:`TrainingJob` runs, one process after the other:

1. ``anymc3d train manifest.csv --out <work>/<name>.anymc3d ...`` (``--resume`` to continue an interrupted run from
   its checkpoint): its log lines give the plan with the expected time (``plan: ... about N min``), and per epoch the
   training loss and validation AUROC (``epoch e/E: training loss L, validation AUROC A``), shown live in a chart;
2. ``anymc3d eval`` on the manifest's test split: AUROC with its 95 % CI, sensitivity and specificity at the plugin's
   threshold and at the validation Youden threshold (``metrics.json``);
3. ``anymc3d predict`` on the test cases (``--json``): their probabilities, for the ROC curve (``eval`` writes it only
   as a picture).

Only then is the plugin copied into the plugins folder. The work folder (recorded on the table, so it is found again
after Slicer restarts) keeps the manifest, the written volumes and the checkpoint; a cancelled or failed run removes
the plugin it may have written there (complete or ``.partial``), never the checkpoint.
"""

import csv
import dataclasses
import glob
import math
import os
import re
import shutil
import tempfile

from . import outputs, trainingtable
from .jobs import BackendJob
from .process import ExitCode, lastErrorLine, parseEventLine

TRAINING_ROLE = {"history": "training history", "historyChart": "training chart", "metrics": "evaluation",
                 "roc": "roc curve", "rocChart": "roc chart"}
_NUMBER = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|nan|inf|-inf)"
PLAN_LINE = re.compile(r"plan: (.*?) about " + _NUMBER + r" min for at most (\d+) epochs")
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+): training loss " + _NUMBER + r", validation AUROC " + _NUMBER)
RESUME_LINE = re.compile(r"resuming .* at epoch (\d+)")
STAGES = ("training", "evaluating", "scoring")


@dataclasses.dataclass
class TrainingProgress:
    """One report: ``stage`` training, evaluating or scoring; per epoch ``epoch``/``epochs``, ``loss`` and
    ``valAuroc``; ``expectedMinutes`` from the trainer's measured plan (None until it is printed)."""

    stage: str
    fraction: float
    message: str
    epoch: int = 0
    epochs: int = 0
    loss: float = float("nan")
    valAuroc: float = float("nan")
    expectedMinutes: float = None


@dataclasses.dataclass
class TrainingResult:
    """``status`` ok, failed or cancelled. On success: the installed plugin, ``metrics`` (eval's metrics.json), the
    metrics table, the ROC table and chart, the test cases' volume nodes."""

    status: str
    message: str = ""
    pluginPath: str = ""
    metrics: dict = None
    metricsTableNode: object = None
    rocTableNode: object = None
    rocChartNode: object = None
    testVolumeNodes: list = dataclasses.field(default_factory=list)
    workFolder: str = ""


def parseTrainLine(line):
    """``("plan", minutes, epochs)``, ``("epoch", epoch, epochs, loss, valAuroc)``, ``("resume", epoch)`` or None for a
    line of ``anymc3d train``'s log (progress bars may share the line: searched, not matched)."""
    match = PLAN_LINE.search(line)
    if match:
        return "plan", float(match.group(2)), int(match.group(3))
    match = EPOCH_LINE.search(line)
    if match:
        return "epoch", int(match.group(1)), int(match.group(2)), float(match.group(3)), float(match.group(4))
    match = RESUME_LINE.search(line)
    return ("resume", int(match.group(1))) if match else None


def pluginFileName(settings):
    return f"{trainingtable.outputs_safe(settings.name)}.anymc3d"


def cardArguments(settings):
    """The ``anymc3d train`` options that put the table's name, description, intended modality and body part into
    the plugin's model card (the ones left empty are left out: the backend's defaults)."""
    card = (("--name", settings.name), ("--description", settings.description), ("--modality", settings.modality),
            ("--body-part", settings.bodyPart))
    return [part for option, value in card if str(value).strip() for part in (option, str(value).strip())]


def checkCard(settings):
    """TrainingInputError before anything runs when a model-card text breaks the plugin file's rules (the backend's
    check: one line, length-limited, the modality a DICOM Modality code)."""
    from anymc3d.plugin_file import check_card

    try:
        check_card(name=settings.name.strip(), description=settings.description.strip(),
                   modality=settings.modality.strip(), body_part=settings.bodyPart.strip())
    except ValueError as error:
        raise trainingtable.TrainingInputError([f"plugin {error}"]) from None


class TrainingJob(BackendJob):
    """``train``, ``eval`` and the test cases' scores of one case table, then the plugin installed in
    ``pluginLibrary``. Start with :meth:`start`; ``onProgress(TrainingProgress)``, ``onFinished(TrainingResult)``.
    :meth:`cancel` keeps the checkpoint for a resume."""

    def __init__(self, logic, table, pluginLibrary, onProgress=None, onFinished=None, resume=False, overwrite=False,
                 trainArguments=()):
        self.logic, self.table, self.pluginLibrary = logic, table, pluginLibrary
        self.onProgress, self.onFinished = onProgress, onFinished
        self.resume, self.overwrite = resume, overwrite
        self.trainArguments = [str(a) for a in trainArguments]  # extra ``anymc3d train`` options (tests: a tiny run)
        self.settings = trainingtable.trainingSettings(table)
        self.stage = None
        self.result = None
        self.history = []  # (epoch, loss, valAuroc)
        self.expectedMinutes = None
        self.stderrLog = []
        self.stdoutLog = []
        self.workFolder = self.manifestPath = self.pluginPath = None
        self.cases = self.splits = None

    @property
    def done(self):
        return self.result is not None

    # Start ------------------------------------------------------------------------------------------------------

    def start(self):
        """Check the table (TrainingInputError before anything runs), write the manifest (or, resuming, take the one
        of the recorded work folder), then start ``anymc3d train``."""
        settings = self.settings.validate()
        checkCard(settings)
        if not os.path.isfile(settings.backbone):
            raise trainingtable.TrainingInputError([f"backbone weights file not found: {settings.backbone!r}"])
        if self.resume:
            self._resumeFolder(settings)
        else:
            self.cases, self.splits = trainingtable.checkedCases(self.table)
            self._checkInstallable(settings)
            root = self.logic.trainingRoot or os.path.join(tempfile.gettempdir(), "AnyMC3D-training")
            os.makedirs(root, exist_ok=True)
            self.workFolder = tempfile.mkdtemp(prefix=f"{trainingtable.outputs_safe(settings.name)}-", dir=root)
            self.manifestPath = trainingtable.writeManifest(self.table, self.workFolder, self.logic.writeInputVolume,
                                                            self.cases, self.splits)
            trainingtable.setTrainingSettings(self.table, dataclasses.replace(settings, workFolder=self.workFolder))
        self.pluginPath = os.path.join(self.workFolder, pluginFileName(settings))
        self._run("training", ["train", self.manifestPath, "--backbone", settings.backbone, "--out", self.pluginPath,
                               "--epochs", str(settings.epochs), "--seed", str(settings.seed), "--device", settings.device,
                               *cardArguments(settings), *(["--resume"] if self.resume else []),
                               *self.trainArguments])
        return self

    def _resumeFolder(self, settings):
        folder = settings.workFolder
        manifest = os.path.join(folder, "manifest.csv") if folder else ""
        checkpoint = os.path.join(folder, pluginFileName(settings) + ".checkpoint.safetensors") if folder else ""
        if not (os.path.isfile(manifest) and os.path.isfile(checkpoint)):
            raise trainingtable.TrainingInputError([(f"nothing to resume: no manifest and checkpoint in the table's work "
                                                    f"folder {folder!r}; start a new training")])
        self._checkInstallable(settings)
        self.workFolder, self.manifestPath = folder, manifest
        self.cases = trainingtable.readCases(self.table)

    def _checkInstallable(self, settings):
        destination = os.path.join(self.pluginLibrary.folder, pluginFileName(settings))
        if os.path.exists(destination) and not self.overwrite:
            raise trainingtable.TrainingInputError([(f"a plugin named {pluginFileName(settings)!r} is already in the "
                                                    f"plugins folder: choose another name or remove it first")])

    def _run(self, stage, arguments):
        self.stage = stage
        self._report(TrainingProgress(stage, self._fraction(), {"training": "Starting the training",
                                                                 "evaluating": "Evaluating on the test cases",
                                                                 "scoring": "Scoring the test cases"}[stage]))
        try:
            self.logic.startBackend(self.logic.backendCommand + arguments, self._onStdoutLine, self._onStderrLine,
                                    self._onFinished)
        except Exception as error:  # noqa: BLE001 - any start failure ends the job with its message
            self._finish(TrainingResult("failed", f"Cannot start the backend: {error}", workFolder=self.workFolder))

    # Output -----------------------------------------------------------------------------------------------------

    def _onStdoutLine(self, line):
        event = parseEventLine(line)
        if event is not None and event.get("event") == "progress" and self.stage == "scoring":
            done, total = int(event.get("case", 0) or 0), max(1, int(event.get("cases", 1) or 1))
            self._report(TrainingProgress("scoring", self._fraction(done / total), f"Scoring test case {done}/{total}"))
        elif event is None:
            self.stdoutLog.append(line)
            del self.stdoutLog[:-200]

    def _onStderrLine(self, line):
        self.stderrLog.append(line)
        del self.stderrLog[:-200]
        parsed = parseTrainLine(line) if self.stage == "training" else None
        if parsed is None:
            return
        if parsed[0] == "plan":
            self.expectedMinutes = parsed[1]
            message = f"Expected time: about {parsed[1]:.1f} min for at most {parsed[2]} epochs"
            self._report(TrainingProgress("training", self._fraction(), message, 0, parsed[2],
                                          expectedMinutes=self.expectedMinutes))
        elif parsed[0] == "epoch":
            _, epoch, epochs, loss, valAuroc = parsed
            self.history.append((epoch, loss, valAuroc))
            self._updateHistoryChart()
            self._report(TrainingProgress("training", self._fraction(epoch / max(1, epochs)),
                                          f"Epoch {epoch}/{epochs}: loss {loss:.4f}, validation AUROC {valAuroc:.3f}",
                                          epoch, epochs, loss, valAuroc, self.expectedMinutes))

    def _fraction(self, within=0.0):
        """Training takes the first 80 % of the bar, evaluation and scoring 10 % each."""
        low, high = {"training": (0.0, 0.8), "evaluating": (0.8, 0.9), "scoring": (0.9, 1.0)}.get(self.stage, (0, 1))
        return low + (high - low) * min(max(within, 0.0), 1.0)

    def _onFinished(self, exitCode):
        if exitCode == ExitCode.CANCELLED:
            return self._finish(TrainingResult("cancelled", "Cancelled: the checkpoint is kept, Resume continues it",
                                               workFolder=self.workFolder))
        if exitCode != 0:
            message = lastErrorLine(self.stderrLog) or f"anymc3d exited with code {int(exitCode)}"
            return self._finish(TrainingResult("failed", f"{self.stage.capitalize()} failed: {message}",
                                               workFolder=self.workFolder))
        if self.stage == "training":
            return self._run("evaluating", ["eval", self.manifestPath, "--backbone", self.settings.backbone, "--plugin",
                                            self.pluginPath, "--out", self.evaluationFolder, "--device",
                                            self.settings.device, "--record-evaluation",
                                            *self._localisationArguments()])
        if self.stage == "evaluating":
            testList = self._writeTestList()
            return self._run("scoring", ["predict", testList, "--backbone", self.settings.backbone, "--plugin",
                                         self.pluginPath, "--json", self.scoresPath, "--device", self.settings.device,
                                         "--progress", "json"])
        try:
            result = self._results()
        except Exception as error:  # noqa: BLE001 - a result that cannot be read or installed: a failed job
            result = TrainingResult("failed", f"Cannot read or install the results: {error}", workFolder=self.workFolder)
        return self._finish(result)

    def _localisationArguments(self):
        """With masks: measure where the heatmaps point and record it in the plugin's model card; else skip it."""
        if any(case.maskNode is not None for case in self.cases or []):
            return ["--record-localisation", self.settings.description or self.settings.name]
        return ["--no-localisation"]

    @property
    def evaluationFolder(self):
        return os.path.join(self.workFolder, "evaluation")

    @property
    def scoresPath(self):
        return os.path.join(self.workFolder, "evaluation", "test_scores.json")

    def _writeTestList(self):
        """``test.csv``: the manifest's test rows (image column only), for ``predict``."""
        with open(self.manifestPath, encoding="utf-8", newline="") as file:
            rows = [row for row in csv.DictReader(file) if row["split"] == "test"]
        path = os.path.join(self.workFolder, "test.csv")
        with open(path, "w", encoding="utf-8", newline="") as file:
            writer = csv.writer(file, lineterminator="\n")
            writer.writerow(["image"])
            writer.writerows([[row["image"]] for row in rows])
        return path

    # Results ----------------------------------------------------------------------------------------------------

    def _results(self):
        from anymc3d.safeio import read_json

        metrics = read_json(os.path.join(self.evaluationFolder, "metrics.json"))
        scores = read_json(self.scoresPath)
        rocTable, rocChart = rocCurves(self.logic.scene, self.manifestPath, scores, self.settings, self.workFolder)
        metricsTable = metricsTableNode(self.logic.scene, metrics, self.settings.name)
        info = self.pluginLibrary.importPlugin(self.pluginPath, overwrite=self.overwrite)
        testNames = testCaseNames(self.manifestPath)
        volumes = [case.volumeNode for case in (self.cases or []) if case.name in testNames and case.volumeNode]
        summary = f"held-out AUROC {metrics['macro_auroc']:.3f}" if metrics.get("macro_auroc") is not None else ""
        return TrainingResult("ok", f"Plugin {info.name} added to the plugins folder ({summary})", info.path, metrics,
                              metricsTable, rocTable, rocChart, volumes, self.workFolder)

    def _updateHistoryChart(self):
        self.historyTableNode, self.historyChartNode = historyChart(self.logic.scene, self.settings.name, self.history)

    def _finish(self, result):
        if result.status != "ok" and self.pluginPath:
            removeUnfinishedPlugin(self.pluginPath)
        self.result = result
        if self.onFinished:
            self.onFinished(result)

    def _report(self, progress):
        if self.onProgress:
            self.onProgress(progress)


def removeUnfinishedPlugin(pluginPath):
    """Remove a plugin the job wrote but did not install, and any ``.partial`` file of its atomic write."""
    folder, name = os.path.split(pluginPath)
    for path in [pluginPath, *glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.partial*"))]:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)


def testCaseNames(manifestPath):
    with open(manifestPath, encoding="utf-8", newline="") as file:
        return [row["id"] for row in csv.DictReader(file) if row["split"] == "test"]


# ---------------------------------------------------------------------------------------------------------------
# Scene output: live history chart, metrics table, ROC curve


def _namedNode(scene, className, name, role):
    """The scene's node of ``className`` with this name and AnyMC3D role, or a new one."""
    for node in outputs.nodesByClass(scene, className):
        if node.GetName() == name and outputs.nodeRole(node) == role:
            return node
    node = scene.AddNewNodeByClass(className, name)
    node.SetAttribute(outputs.ROLE_ATTRIBUTE, role)
    return node


def _fillTable(tableNode, columns, rows):
    """Replace ``tableNode``'s content: ``columns`` [(name, "double"|"string")], ``rows`` lists of values."""
    import vtk

    table = tableNode.GetTable()
    table.Initialize()
    for name, kind in columns:
        array = vtk.vtkDoubleArray() if kind == "double" else vtk.vtkStringArray()
        array.SetName(name)
        table.AddColumn(array)
    table.SetNumberOfRows(len(rows))
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            column = table.GetColumn(c)
            if columns[c][1] == "double":
                column.SetValue(r, float("nan") if value is None else float(value))
            else:
                column.SetValue(r, str(value))
    tableNode.Modified()
    return tableNode


def _chart(scene, name, role, tableNode, series, xTitle, yTitle):
    """A line chart of ``tableNode``: ``series`` [(xColumn, yColumn, title)]; reused (not duplicated) when redrawn."""
    chart = _namedNode(scene, "vtkMRMLPlotChartNode", name, TRAINING_ROLE[role])
    chart.SetTitle(name)
    chart.SetXAxisTitle(xTitle)
    chart.SetYAxisTitle(yTitle)
    chart.RemoveAllPlotSeriesNodeIDs()
    for xColumn, yColumn, title in series:
        seriesNode = _namedNode(scene, "vtkMRMLPlotSeriesNode", f"{name}: {title}", TRAINING_ROLE[role] + " series")
        seriesNode.SetAndObserveTableNodeID(tableNode.GetID())
        seriesNode.SetXColumnName(xColumn)
        seriesNode.SetYColumnName(yColumn)
        seriesNode.SetPlotType(seriesNode.PlotTypeScatter)
        seriesNode.SetMarkerStyle(seriesNode.MarkerStyleNone)
        chart.AddAndObservePlotSeriesNodeID(seriesNode.GetID())
    return chart


def historyChart(scene, name, history):
    """The live chart: training loss and validation AUROC per epoch (one table, two series)."""
    table = _namedNode(scene, "vtkMRMLTableNode", f"{name} training history", TRAINING_ROLE["history"])
    _fillTable(table, [("Epoch", "double"), ("Training loss", "double"), ("Validation AUROC", "double")],
               [list(entry) for entry in history])
    chart = _chart(scene, f"{name} training", "historyChart", table,
                   [("Epoch", "Training loss", "training loss"), ("Epoch", "Validation AUROC", "validation AUROC")],
                   "epoch", "")
    return table, chart


def metricsTableNode(scene, metrics, name):
    """One row per finding and operating point: AUROC with its 95 % CI, threshold, sensitivity, specificity."""
    rows = []
    for label, entry in metrics["per_label"].items():
        low, high = entry.get("auroc_ci95") or (None, None)
        for point, key in (("plugin threshold", "at_stored_threshold"), ("Youden (validation)", "at_youden")):
            at = entry.get(key) or {}
            rows.append([label, entry.get("auroc"), low, high, point, at.get("threshold"), at.get("sensitivity"),
                         at.get("specificity")])
    table = _namedNode(scene, "vtkMRMLTableNode", f"{name} evaluation", TRAINING_ROLE["metrics"])
    return _fillTable(table, [("Finding", "string"), ("AUROC", "double"), ("AUROC CI low", "double"),
                              ("AUROC CI high", "double"), ("Operating point", "string"), ("Threshold", "double"),
                              ("Sensitivity", "double"), ("Specificity", "double")], rows)


def _testTargets(manifestPath, settings):
    """{image path relative to the manifest: 0/1 per finding} of the test rows (multi-class: one-hot)."""
    columns = trainingtable.manifestColumns(settings)[2:-2]
    with open(manifestPath, encoding="utf-8", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row["split"] == "test"]
    if settings.task == "multiclass":
        return {row["image"]: [int(int(row[columns[0]]) == k) for k in range(len(settings.labels))] for row in rows}
    return {row["image"]: [int(row[column]) for column in columns] for row in rows}


def rocCurves(scene, manifestPath, records, settings, workFolder):
    """The test cases' ROC curve per finding (scikit-learn's ``roc_curve`` of the probabilities ``predict`` wrote
    against the manifest's labels) as one table (``FPR <finding>``, ``TPR <finding>`` columns, NaN padded) and a
    chart with one series per finding."""
    import numpy as np
    from sklearn.metrics import roc_curve

    targets = _testTargets(manifestPath, settings)
    root = os.path.realpath(workFolder)
    byImage = {os.path.relpath(os.path.realpath(record["image"]), root).replace(os.sep, "/"): record for record in records}
    missing = sorted(set(targets) - set(byImage))
    if missing:
        raise ValueError(f"no score for test case(s) {missing[:5]}")
    (result,) = byImage[next(iter(targets))]["results"]
    labels = list(result["labels"])
    y = np.array([targets[image] for image in targets])
    p = np.array([[byImage[image]["results"][0]["probabilities"][label] for label in labels] for image in targets])
    curves = {}
    for k, label in enumerate(labels):
        if 0 < y[:, k].sum() < len(y):
            fpr, tpr, _ = roc_curve(y[:, k], p[:, k])
            curves[label] = (fpr, tpr)
    length = max((len(fpr) for fpr, _ in curves.values()), default=0)
    columns = [(f"{axis} {label}", "double") for label in curves for axis in ("FPR", "TPR")]
    rows = [[(values[i] if i < len(values) else math.nan) for label in curves for values in curves[label]]
            for i in range(length)]
    table = _fillTable(_namedNode(scene, "vtkMRMLTableNode", f"{settings.name} ROC", TRAINING_ROLE["roc"]), columns, rows)
    chart = _chart(scene, f"{settings.name} ROC", "rocChart", table,
                   [(f"FPR {label}", f"TPR {label}", label) for label in curves], "1 - specificity", "sensitivity")
    return table, chart

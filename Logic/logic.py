"""AnyMC3DSlicerLogic: moves data between the MRML scene and the ``anymc3d`` backend process.

The Logic gets the scene and a process runner in its constructor, so the same code runs in the Slicer
application (``QProcessRunner``) and in pytest on a slicer-core scene (``SubprocessRunner`` or a fake runner).
A prediction is asynchronous: ``startPrediction`` writes the inputs to a fresh temporary folder, starts
``anymc3d predict ... --progress json`` and returns a ``PredictionJob``; progress arrives by stage through a
callback, and at the end the results are imported only if the exit code is 0 and every expected output exists.
The temporary folder is removed whatever the outcome; a failed or cancelled run leaves the scene as it was.
"""

import json
import os
import shutil
import sys
import tempfile

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
from .jobs import (
    BatchJob,
    CaseResult,
    PredictionJob,
    PredictionOutputs,
    Progress,
    waitOrCancel,
)
from .parameters import DisplayOptions, PredictionOptions
from .process import ExitCode, SubprocessRunner

INPUT_FORMAT = "nrrd"  # NRRD stores the geometry in double precision (NIfTI in float32): IJK-to-RAS kept exactly

__all__ = ["AnyMC3DSlicerLogic", "BatchJob", "CaseResult", "PredictionJob", "PredictionOutputs", "Progress"]


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


class AnyMC3DSlicerLogic:
    """Runs the backend on scene volumes (or image files) and imports its results into the scene.

    Args:
        scene: the vtkMRMLScene (``slicer.mrmlScene`` in the application).
        runner: a ProcessRunner; default QProcessRunner in Slicer, SubprocessRunner elsewhere.
        backendCommand: the command prefix that runs the CLI; default ``[PythonSlicer, "-m", "anymc3d"]``.
        backendPath: a folder holding the ``anymc3d`` package, put first on the process's PYTHONPATH (or None).
        volumesLogic, volumeRenderingLogic: the module logics; default Slicer's, or new ones on ``scene``.
        tempRoot: where the per-run temporary folders are made (default: the system's).

    The class attributes below are off by default; the Slicer module sets them.
    """

    #: keep one ``anymc3d standby`` process started ahead of the next run, so that Apply does not wait for torch, timm
    #: and peft to import (9 s on 2 cores, benchmarks/results); it holds them in memory (~0.5 GB) while idle
    keepBackendReady = False
    #: import a run's results with only the first-shown heatmap read at once, the others read in threads and filled
    #: in by ``PredictionJob.pollHeatmaps`` (the Slicer module sets it, with ``schedule``)
    readAhead = False
    #: where training work folders are made (manifest, volumes, checkpoint; training.py); None: the system's temp
    trainingRoot = None
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
        waitOrCancel(job, timeout)
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
        waitOrCancel(batch, timeout)
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
        root = os.path.realpath(rootDir)
        for result in results:
            gradient = _perFinding(result, options)
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
        rows, rowHeatmaps, heatmapNodes = self._findingRows(results, uniqueNames, inputName, options, heatmapVolume)

        tableNode = outputs.createFindingsTable(self.scene, f"{inputName} {pluginTitle} findings", rows)
        tableNode.SetAttribute(outputs.SLICING_AXIS_ATTRIBUTE, str(int(record["slicing_axis"])))
        methods = sorted({result.get("heatmap_method") or options.heatmapMethod for result in results})
        tableNode.SetAttribute("AnyMC3D.HeatmapMethod", ", ".join(methods))  # what ran ("auto" resolved per plugin)
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
            self._setUpHeatmapViews(heatmapNode, colorNode, displayOptions, visible=heatmapNode is rowHeatmaps[shownRow],
                                    data=preread.get(paths[heatmapNode.GetID()]))
        copies = [h.GetNodeReference(outputs.VOLUME_RENDERING_COPY_REFERENCE) for h in heatmapNodes]
        folderItem = outputs.placeInSubjectHierarchy(
            self.scene, inputNode, f"AnyMC3D {pluginTitle}: {inputName}",
            [tableNode, *heatmapNodes, *[c for c in copies if c is not None], importanceTableNode, chartNode, *seriesNodes])
        self.selectFinding(tableNode, shownRow, displayOptions)
        return PredictionOutputs(inputNode, tableNode, heatmapNodes, importanceTableNode, chartNode, folderItem, record), folderItem

    @staticmethod
    def _findingRows(results, uniqueNames, inputName, options, heatmapVolume):
        """The findings table's rows (one per plugin and finding), the heatmap node of each row, and every heatmap
        node made (``heatmapVolume(path, name)``): one per finding with a finding method, else one per plugin."""
        rows, rowHeatmaps, heatmapNodes = [], [], []
        for pluginName, result in zip(uniqueNames, results):
            gradient = _perFinding(result, options)
            if gradient:
                byLabel = {label: heatmapVolume(path, f"{inputName} {pluginName} heatmap {label}")
                           for label, path in result["finding_heatmaps"].items()}
            else:
                heatmapNode = heatmapVolume(result["heatmap"], f"{inputName} {pluginName} heatmap")
                byLabel = {label: heatmapNode for label in result["labels"]}
            heatmapNodes += list(byLabel.values()) if gradient else [heatmapNode]
            thresholds, decisions = result.get("thresholds") or {}, result.get("decisions") or {}
            for label in result["labels"]:
                rows.append({"Plugin": pluginName, "Finding": label,
                             "Probability": float(result["probabilities"][label]),
                             "Threshold": float(thresholds.get(label, float("nan"))),
                             "Decision": "positive" if decisions.get(label) else "negative"})
                rowHeatmaps.append(byLabel[label])
        return rows, rowHeatmaps, heatmapNodes

    def _setUpHeatmapViews(self, heatmapNode, colorNode, displayOptions, visible, data=None):
        """A heatmap's slice-view display and, once its voxels are in (not pending), its 3D view."""
        outputs.setUpHeatmapDisplay(heatmapNode, colorNode, displayOptions.threshold)
        if displayOptions.volumeRendering and outputs.pendingHeatmapFile(heatmapNode) is None:
            outputs.setUpVolumeRendering(self.volumeRenderingLogic, heatmapNode, displayOptions.threshold,
                                         visible=visible, maxSize=displayOptions.volumeRenderingMaxSize,
                                         blocks=getattr(data, "blocks", None))

    @staticmethod
    def firstHeatmapFile(record, options=None):
        """The heatmap file of the row :meth:`importResults` shows first (the most probable finding, as there), or
        None: what a viewer reads first when it imports the others deferred."""
        options = options if options is not None else PredictionOptions()
        rows = [(float(result["probabilities"][label]),
                 (result.get("finding_heatmaps") or {}).get(label) if _perFinding(result, options) else result.get("heatmap"))
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
        outputs.setHeatmapWindow(heatmapNode.GetDisplayNode(), threshold)
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


def _perFinding(result, options):
    """Whether a plugin's result came with one heatmap per finding: by the method its record names (what "auto"
    chose for that plugin), else the method asked for."""
    return (result.get("heatmap_method") or options.heatmapMethod) in FINDING_METHODS

"""AnyMC3D: classify 3D medical images with a frozen 2D foundation model and small task plugins.

The Module, a thin Widget that wires Resources/UI/AnyMC3DSlicer.ui to the Logic, and the self-test. All scene and
process work is in the Logic package (``Logic/`` in the source tree, installed as ``AnyMC3DSlicerLogic``).
"""

import importlib
import importlib.util
import logging
import os
import shutil
import sys

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
SETTINGS_BACKBONE = "AnyMC3D/BackbonePath"
SAMPLE_NAME = "AnyMC3DSyntheticCT"
SAMPLE_SHA256 = "385a2ec06beb1726f5cdf0fd0ddab27ab256d1712c4de529679ebbe3c0fa7e86"
#: Slicer 5.10 ships Python 3.12; the backend needs Python 3.10 or later (Slicer 5.8 ships 3.9).
MINIMUM_SLICER_VERSION = (5, 10)
MINIMUM_PYTHON = (3, 10)
LOGIC_PACKAGE = "AnyMC3DSlicerLogic"
WIDGET_PACKAGE = "AnyMC3DSlicerLib"
DEVICE_LABELS = {"auto": "auto", "cuda": "GPU", "cpu": "CPU"}


def _loadSourcePackage(name, folder):
    """Import the package in ``folder`` under ``name`` (no ``sys.path`` change)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    try:
        spec.loader.exec_module(package)
    except BaseException:
        del sys.modules[name]
        raise
    return package


def importLogicPackage():
    """The Logic package, always under its one name ``AnyMC3DSlicerLogic``.

    Installed (the extension, or ``pip install -e Logic``): a plain import; the extension installs the package and
    the ``anymc3d`` backend beside this file, in a folder Slicer puts on ``sys.path``.

    Source tree (Slicer's *Additional module paths* pointing at ``AnyMC3DSlicer/``): the only fallback of the
    project, used only when the installed package is absent. The repository's ``Logic/`` is loaded as
    ``AnyMC3DSlicerLogic`` and, if ``anymc3d`` is not importable, ``python_backend/anymc3d`` as ``anymc3d``, by file
    location: ``sys.path`` is not changed.
    """
    try:
        return importlib.import_module(LOGIC_PACKAGE)
    except ModuleNotFoundError as error:
        if error.name != LOGIC_PACKAGE:
            raise
    repositoryRoot = os.path.dirname(MODULE_DIR)
    try:
        backendImportable = importlib.util.find_spec("anymc3d") is not None
    except ImportError:
        backendImportable = False
    if not backendImportable:
        _loadSourcePackage("anymc3d", os.path.join(repositoryRoot, "python_backend", "anymc3d"))
    return _loadSourcePackage(LOGIC_PACKAGE, os.path.join(repositoryRoot, "Logic"))


def checkVersions(slicerVersion=None):
    """Log an error when Slicer or its Python is older than this module supports; True when supported."""
    slicerVersion = slicerVersion or (int(slicer.app.majorVersion), int(slicer.app.minorVersion))
    if tuple(slicerVersion) < MINIMUM_SLICER_VERSION or sys.version_info[:2] < MINIMUM_PYTHON:
        logging.getLogger("AnyMC3D").error(
            "AnyMC3D needs Slicer %d.%d or later (Python %d.%d or later); this is Slicer %d.%d, Python %d.%d",
            *MINIMUM_SLICER_VERSION, *MINIMUM_PYTHON, *slicerVersion, *sys.version_info[:2])
        return False
    return True


LogicPackage = importLogicPackage()
# after importLogicPackage(), which may load anymc3d from the source tree; the widget's parts import the Logic package
from anymc3d.contract import DEVICES, HEATMAP_CHOICES
from AnyMC3DSlicerLib import selftest
from AnyMC3DSlicerLib.pluginsection import SETTINGS_PLUGIN_FOLDER, PluginSection
from AnyMC3DSlicerLib.resultsection import ResultSection
from AnyMC3DSlicerLib.trainsection import TrainSection


def backendPath():
    """The folder that holds the ``anymc3d`` package (put on the backend process's PYTHONPATH)."""
    import anymc3d

    return os.path.dirname(os.path.dirname(os.path.abspath(anymc3d.__file__)))


def resourcePath(*parts):
    for root in (os.path.join(MODULE_DIR, "Resources"), os.path.join(os.path.dirname(MODULE_DIR), "Resources")):
        if os.path.exists(os.path.join(root, *parts)):
            return os.path.join(root, *parts)
    return os.path.join(MODULE_DIR, "Resources", *parts)


def gpuDriverPresent():
    """Whether an NVIDIA driver is installed, found without importing torch (for the CPU-time note only)."""
    return shutil.which("nvidia-smi") is not None or os.path.exists("/proc/driver/nvidia/version")


#
# Module
#


class AnyMC3DSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("AnyMC3D")
        self.parent.categories = ["Classification"]
        self.parent.dependencies = []
        self.parent.contributors = ["AnyMC3D contributors"]
        self.parent.helpText = _(
            "Classify a 3D volume (CT, MRI) with a frozen 2D foundation model (DINOv2/DINOv3) and a small task "
            "plugin. Shows calibrated probabilities per finding, a heatmap overlay and volume rendering, and the "
            "importance of each slice. Inference runs in a background process; Cancel stops it. "
            "Research use only: not a medical device.")
        self.parent.acknowledgementText = _("Uses timm, peft and PyTorch. Process handling follows SlicerMONAIAuto3DSeg.")
        # Slicer looks for <module folder>/Resources/Icons/<module>.png: found when installed, not in the source tree
        self.parent.icon = qt.QIcon(resourcePath("Icons", "AnyMC3DSlicer.png"))
        checkVersions()
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """A small synthetic CT-like volume shipped with the module, for the self-test and for trying the module."""
    import SampleData

    path = resourcePath("SampleData", f"{SAMPLE_NAME}.nrrd")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="AnyMC3D", sampleName=SAMPLE_NAME, uris=qt.QUrl.fromLocalFile(path).toString(),
        fileNames=f"{SAMPLE_NAME}.nrrd", nodeNames=SAMPLE_NAME, thumbnailFileName=resourcePath("Icons", "AnyMC3DSlicer.png"),
        checksums=f"SHA256:{SAMPLE_SHA256}", loadFileTypes="VolumeFile")


#
# Parameter node
#


@parameterNodeWrapper
class AnyMC3DSlicerParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    secondView: vtkMRMLScalarVolumeNode  # multi-view plugins: the second view, in the plugin's view order
    options: LogicPackage.PredictionOptions
    display: LogicPackage.DisplayOptions
    resultTable: vtkMRMLTableNode


#
# Widget
#


def reloadLogicPackage():
    """Drop the Logic package's modules and the widget's parts (AnyMC3DSlicerLib), so that the module file's
    re-execution (Slicer's Reload, which re-executes this file only) imports them afresh from their files."""
    for name in [name for name in sys.modules if name.split(".")[0] in (LOGIC_PACKAGE, WIDGET_PACKAGE)]:
        del sys.modules[name]


class AnyMC3DSlicerWidget(PluginSection, ResultSection, TrainSection, ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        # Set before the base class's __init__: given no parent, it calls setup() itself.
        self.logic = None
        self.pluginLibrary = None
        self.job = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._shownDisplay = None
        self._dependenciesChecked = False
        VTKObservationMixin.__init__(self)
        ScriptedLoadableModuleWidget.__init__(self, parent)

    def onReload(self):
        """Reload ``Logic/`` too, not only this file."""
        reloadLogicPackage()
        ScriptedLoadableModuleWidget.onReload(self)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resourcePath("UI", "AnyMC3DSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AnyMC3DSlicerLogic()

        settings = qt.QSettings()
        self.ui.backbonePathLineEdit.currentPath = settings.value(SETTINGS_BACKBONE, "")
        defaultFolder = os.path.join(os.path.dirname(slicer.app.slicerUserSettingsFilePath), "AnyMC3D", "plugins")
        self.ui.pluginFolderPathLineEdit.currentPath = settings.value(SETTINGS_PLUGIN_FOLDER, defaultFolder)
        self.ui.deviceComboBox.addItems([_(DEVICE_LABELS[device]) for device in DEVICES])
        self.ui.heatmapMethodComboBox.addItems(list(HEATMAP_CHOICES))
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, lambda caller, event: self.hideHeatmapsFromInputSelectors())
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.backbonePathLineEdit.connect("currentPathChanged(QString)", lambda path: qt.QSettings().setValue(SETTINGS_BACKBONE, path))
        self.ui.pluginFolderPathLineEdit.connect("currentPathChanged(QString)", self.onPluginFolderChanged)
        self.ui.importPluginButton.connect("clicked(bool)", self.onImportPlugin)
        self.ui.removePluginButton.connect("clicked(bool)", self.onRemovePlugin)
        self.ui.refreshPluginsButton.connect("clicked(bool)", self.refreshPlugins)
        self.ui.pluginListWidget.connect("itemSelectionChanged()", self.onPluginSelectionChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.heatmapMethodComboBox.connect("currentIndexChanged(int)", self.onHeatmapMethodChanged)
        self.ui.resultTableSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onResultTableChanged)
        self.ui.findingsTableView.connect("selectionChanged()", self.onFindingSelected)
        # The opacity/threshold/volume-rendering widgets are bound to the parameter node ("display.*" in the .ui):
        # the display follows the node (onParameterNodeModified), never the widgets' signals, which PythonQt would
        # deliver before the node has the new value when connected before connectGui.
        self.ui.jumpToMaximumButton.connect("clicked(bool)", self.onJumpToMaximum)
        self.ui.jumpToSliceButton.connect("clicked(bool)", self.onJumpToSlice)
        self.ui.batchRunButton.connect("clicked(bool)", self.onBatchRun)
        self.exportDicomButton, self.lastOutputs = qt.QPushButton(), None  # Export to DICOM (Logic/dicomexport.py)
        self.exportDicomButton.text, self.exportDicomButton.enabled = _("Export to DICOM"), False
        self.layout.addWidget(self.exportDicomButton)
        self.exportDicomButton.connect("clicked(bool)", self.onExportDicom)

        self.setupSimilarity()
        self.setupTrainSection()  # AnyMC3DSlicerLib/trainsection.py
        self.ui.getBackboneButton.connect("clicked(bool)", self.onGetBackbone)  # Logic/backbones.py
        self.onPluginFolderChanged(self.ui.pluginFolderPathLineEdit.currentPath)
        self.initializeParameterNode()

    def onGetBackbone(self):
        rows = LogicPackage.listBackbones()
        labels = [LogicPackage.describeBackbone(row) for row in rows]
        label = qt.QInputDialog.getItem(slicer.util.mainWindow(), _("Get backbone"), _("Backbone:"), labels, 0, False)
        if label in labels:
            name = rows[labels.index(label)]["name"]
            self.startJob(lambda onProgress, onFinished: LogicPackage.BackboneDownload(
                self.logic, name, onProgress, lambda result: self.onBackboneFetched(result, onFinished)).start())

    def onBackboneFetched(self, result, onFinished):
        if result.status == "ok":
            self.ui.backbonePathLineEdit.currentPath = result.weightsFile
        onFinished(result)  # buttons, progress bar and the status line as for any job
        self.ui.statusLabel.text = result.message

    def setupSimilarity(self):
        """The "Similarity from point" section: a Markups point on the input volume starts ``anymc3d similarity`` in the background
        (same runner as predictions; features cached per volume for the session), debounced by a Qt timer."""
        def configure(session):
            session.backbonePath = self.ui.backbonePathLineEdit.currentPath
            session.options.device = self._parameterNode.options.device if self._parameterNode else "auto"

        self.similaritySession = LogicPackage.SimilaritySession(self.logic, "")
        self.similarityController = LogicPackage.SimilarityPointController(
            self.similaritySession, lambda: self._parameterNode.inputVolume if self._parameterNode else None,
            lambda milliseconds, callback: qt.QTimer.singleShot(milliseconds, callback),
            onStatus=lambda text: setattr(self.ui.similarityStatusLabel, "text", text),
            onResult=lambda result: self.hideHeatmapsFromInputSelectors(), configure=configure)
        self.ui.similarityMarkupsSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.similarityController.setMarkupsNode)

    def cleanup(self):
        for job in (self.job, self.trainingJob):
            if job is not None:
                job.cancel()
        self.similarityController.setMarkupsNode(None)
        self.similaritySession.cleanup()  # its temporary inputs and feature caches
        self.logic.close()  # the backend process kept ready
        self.setParameterNode(None)
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()
        if self._dependenciesChecked or not LogicPackage.DependencyChecker().missingPackages():
            self.logic.prepareBackend()  # imports paid now, in the background, not at Apply

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        for job in (self.job, self.trainingJob):
            if job is not None:
                job.cancel()
        self.similaritySession.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        self.showTrainingTable(None)
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = next(iter(self.inputVolumeCandidates()), None)
        self.hideHeatmapsFromInputSelectors()

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        self._shownDisplay = None
        if self._parameterNode:
            # Widgets with a SlicerParameterName property in the .ui (e.g. "display.opacity") follow the node.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.ui.deviceComboBox.currentIndex = DEVICES.index(self._parameterNode.options.device)
            self.ui.heatmapMethodComboBox.currentIndex = HEATMAP_CHOICES.index(self._parameterNode.options.heatmapMethod)

    def onParameterNodeModified(self, caller=None, event=None):
        """The parameter node changed (a bound widget, a script, an undo): show the display options it now holds."""
        display = self._parameterNode.display if self._parameterNode else None
        shown = None if display is None else (display.opacity, display.threshold, display.volumeRendering)
        if shown != self._shownDisplay:
            self._shownDisplay = shown
            self.updateHeatmapDisplay()

    @staticmethod
    def isHeatmap(node):
        return LogicPackage.nodeRole(node) == "heatmap"

    def inputVolumeCandidates(self):
        return [node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode") if not self.isHeatmap(node)]

    def hideHeatmapsFromInputSelectors(self):
        """AnyMC3D's own heatmaps are results, never inputs: hide them in the input selectors."""
        heatmapIds = [node.GetID() for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode") if self.isHeatmap(node)]
        for selector in (self.ui.inputVolumeSelector, self.ui.secondViewSelector):
            selector.sortFilterProxyModel().hiddenNodeIDs = heatmapIds

    # Options

    def onDeviceChanged(self, index):
        if self._parameterNode:
            self._parameterNode.options.device = DEVICES[index]
        self.updateDeviceNote()

    def onHeatmapMethodChanged(self, index):
        if self._parameterNode:
            self._parameterNode.options.heatmapMethod = HEATMAP_CHOICES[index]

    def updateDeviceNote(self):
        device = DEVICES[self.ui.deviceComboBox.currentIndex]
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        if device == "auto":
            device = "cuda" if gpuDriverPresent() else "cpu"
        if device == "cpu" and volume is not None and volume.GetImageData() is not None:
            seconds = LogicPackage.AnyMC3DSlicerLogic.estimatedSeconds(max(volume.GetImageData().GetDimensions()), "cpu")
            self.ui.deviceNoteLabel.text = _("No GPU in use: expect about {minutes:.0f} min on the CPU.").format(minutes=max(1, seconds / 60))
        else:
            self.ui.deviceNoteLabel.text = ""

    # Run

    def onApplyButton(self):
        inputs = [node for node in (self._parameterNode.inputVolume, self._parameterNode.secondView) if node]
        plugins = self.selectedPlugins()
        backbone = self.ui.backbonePathLineEdit.currentPath
        if not inputs or not plugins or not os.path.isfile(backbone):
            slicer.util.errorDisplay(_("Select an input volume, at least one plugin and the backbone weights file."))
            return
        if not self.ensureDependencies():
            return
        self.updateDeviceNote()
        self.startJob(lambda onProgress, onFinished: self.logic.startPrediction(
            inputs, backbone, [p.path for p in plugins], self._parameterNode.options, self._parameterNode.display,
            onProgress=onProgress, onFinished=onFinished))

    def onBatchRun(self):
        folder = self.ui.batchFolderPathLineEdit.currentPath
        plugins = self.selectedPlugins()
        if not os.path.isdir(folder) or not plugins or not os.path.isfile(self.ui.backbonePathLineEdit.currentPath):
            slicer.util.errorDisplay(_("Select a folder of images, at least one plugin and the backbone weights file."))
            return
        if not self.ensureDependencies():
            return
        cases = self.logic.batchCasesFromFolder(folder)
        self.ui.batchResultsTableWidget.setRowCount(0)
        self.startJob(lambda onProgress, onFinished: self.logic.startBatch(
            cases, self.ui.backbonePathLineEdit.currentPath, [p.path for p in plugins], self._parameterNode.options,
            self._parameterNode.display, onCaseDone=self.onBatchCaseDone, onFinished=onFinished, onProgress=onProgress))

    def startJob(self, start):
        self.ui.applyButton.enabled = self.ui.batchRunButton.enabled = False
        self.ui.cancelButton.enabled = True
        self.ui.progressBar.show()
        self.ui.progressBar.value = 0
        try:
            self.job = start(self.onProgress, self.onJobFinished)
        except Exception as error:  # noqa: BLE001 - shown to the user, the GUI stays usable
            self.onJobFinished(LogicPackage.CaseResult("", "failed", str(error)))

    def onProgress(self, progress):
        self.ui.progressBar.value = int(100 * progress.fraction)
        prefix = f"{progress.case + 1}/{progress.cases}: " if progress.cases > 1 else ""
        self.ui.statusLabel.text = prefix + progress.message

    def onBatchCaseDone(self, result):
        table = self.ui.batchResultsTableWidget
        row = table.rowCount
        table.insertRow(row)
        for column, text in enumerate((result.name, result.status, result.message)):
            table.setItem(row, column, qt.QTableWidgetItem(text))

    def onJobFinished(self, result):
        self.job = None
        self.ui.applyButton.enabled = self.ui.batchRunButton.enabled = True
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.hide()
        results = result if isinstance(result, list) else [result]
        done = [r for r in results if r.status == "ok"]
        if any(r.status == "cancelled" for r in results):
            self.ui.statusLabel.text = _("Cancelled: the scene is unchanged") if not done else _("Cancelled")
        else:
            self.ui.statusLabel.text = _("{ok} of {total} done").format(ok=len(done), total=len(results))
        if done and done[-1].outputs is not None:  # a fetched backbone adds nothing to the scene
            outputs = done[-1].outputs
            self.lastOutputs, self.exportDicomButton.enabled = outputs, bool(outputs.inputNode.GetAttribute("DICOM.instanceUIDs"))
            self._parameterNode.resultTable = outputs.tableNode
            slicer.modules.plots.logic().ShowChartInLayout(outputs.chartNode)
        self.hideHeatmapsFromInputSelectors()
        failed = [r for r in results if r.status == "failed"]
        if failed and not isinstance(result, list):
            slicer.util.errorDisplay(_("AnyMC3D failed: {message}").format(message=failed[0].message))

    def onCancelButton(self):
        if self.job is not None:
            self.job.cancel()

    def onExportDicom(self):
        dicomexport = importlib.import_module(LOGIC_PACKAGE + ".dicomexport")
        try:
            written = dicomexport.exportToDicom(self.logic, self.lastOutputs, slicer.dicomDatabase)
        except dicomexport.DicomExportError as error:
            return slicer.util.errorDisplay(_("Export to DICOM failed: {message}").format(message=str(error)))
        self.ui.statusLabel.text = _("{n} DICOM objects added to the DICOM database").format(n=len(written))


#
# Logic
#


class AnyMC3DSlicerLogic(LogicPackage.AnyMC3DSlicerLogic, ScriptedLoadableModuleLogic):
    """The module logic: the scene-level Logic on ``slicer.mrmlScene`` plus the parameter node.

    The package's Logic comes first in the bases: Slicer's ``ScriptedLoadableModuleLogic.__init__`` calls
    ``super().__init__()`` with no arguments, which must reach ``object``, not the Logic's ``__init__(scene, ...)``.
    """

    keepBackendReady = True  # Apply should not wait for the backend's imports (see the package Logic)
    readAhead = True  # the table and first heatmap at once, the other heatmaps read in threads

    def __init__(self, runner=None):
        ScriptedLoadableModuleLogic.__init__(self)
        LogicPackage.AnyMC3DSlicerLogic.__init__(self, slicer.mrmlScene, runner=runner, backendPath=backendPath())
        self.schedule = lambda milliseconds, callback: qt.QTimer.singleShot(milliseconds, callback)
        # training work folders (checkpoints) where a restart finds them again: beside Slicer's settings
        self.trainingRoot = os.path.join(os.path.dirname(slicer.app.slicerUserSettingsFilePath), "AnyMC3D", "training")

    def getParameterNode(self):
        return AnyMC3DSlicerParameterNode(super().getParameterNode())


#
# Test
#


class AnyMC3DSlicerTest(selftest.EndToEndTest):
    """The module's self-test (AnyMC3DSlicerLib/selftest.py) on this module's logic and sample data."""

    logicClass = AnyMC3DSlicerLogic
    logicPackage = LogicPackage
    registerSampleData = staticmethod(registerSampleData)
    sampleName, sampleSha256 = SAMPLE_NAME, SAMPLE_SHA256
    samplePath = staticmethod(lambda: resourcePath("SampleData", f"{SAMPLE_NAME}.nrrd"))

"""Scenarios that open the module file in a Slicer-like Python (slicer-core + Testing/slicer_standins), one per
child process: ``python module_scenarios.py SCENARIO JSON_ARGUMENTS``. The folder holding AnyMC3DSlicer.py comes on
PYTHONPATH, as Slicer puts a scripted module's folder on sys.path. Prints one JSON line with what it saw.
"""

import json
import os
import sys
import time

import qt
import slicer_app

app = slicer_app.install()
import slicer

import AnyMC3DSlicer


def openModule(pluginFolder=None):
    """What Slicer does when the user opens the module: build the widget in its module panel, call setup() and
    enter()."""
    if pluginFolder:
        qt.QSettings.store[AnyMC3DSlicer.SETTINGS_PLUGIN_FOLDER] = pluginFolder
    widget = AnyMC3DSlicer.AnyMC3DSlicerWidget(slicer_app.ModulePanel())
    widget.setup()
    widget.enter()
    return widget


def construct(args):
    """The module's logic built as Slicer's widget and self-test do: no arguments."""
    logic = AnyMC3DSlicer.AnyMC3DSlicerLogic()
    node = logic.getParameterNode()
    node.options.device = "cpu"
    again = AnyMC3DSlicer.AnyMC3DSlicerLogic().getParameterNode()
    return {"moduleName": logic.moduleName, "sceneIsApplications": logic.scene is slicer.mrmlScene,
            "runner": type(logic.runner).__name__, "device": again.options.device,
            "singleton": node.parameterNode.GetID() == again.parameterNode.GetID(),
            "logicPackage": AnyMC3DSlicer.LogicPackage.__name__, "logicFile": AnyMC3DSlicer.LogicPackage.__file__,
            "backendPath": logic.backendPath, "anymc3dFile": sys.modules["anymc3d"].__file__,
            "resources": AnyMC3DSlicer.resourcePath("UI", "AnyMC3DSlicer.ui"), "versionOk": AnyMC3DSlicer.checkVersions(),
            "oldSlicerRefused": not AnyMC3DSlicer.checkVersions((5, 8))}


def freshInstall(args):
    """A fresh Slicer (torch & co. absent): open the module, pick inputs, press Apply."""
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    volume.SetAndObserveImageData(__import__("vtk").vtkImageData())
    widget = openModule(args["pluginFolder"])
    listed = [item.text() for item in widget.ui.pluginListWidget.items]
    problems = [text for kind, text in app.dialogs if kind == "showStatusMessage"]
    qt.QFileDialog.nextOpenFileName = args["importPlugin"]
    widget.ui.importPluginButton.click()  # Import plugin: reads plugin.json only, copies the file in
    afterImport = [item.text() for item in widget.ui.pluginListWidget.items]
    widget.ui.pluginListWidget.selectRow(0)
    widget.ui.backbonePathLineEdit.currentPath = args["backbone"]
    app.answers["confirmOkCancelDisplay"] = True
    widget.ui.applyButton.click()
    widget.ui.batchFolderPathLineEdit.currentPath = args["batchFolder"]
    app.answers["confirmOkCancelDisplay"] = False
    widget.ui.batchRunButton.click()  # Batch asks too (the first install failed); declined: nothing runs
    return {"listed": listed, "afterImport": afterImport, "problems": problems, "info": widget.ui.pluginInfoLabel.text,
            "inputVolume": widget._parameterNode.inputVolume.GetName(), "dialogs": app.dialogs,
            "torchInstalls": app.torchInstalls, "pipInstalls": app.pipInstalls, "jobStarted": widget.job is not None,
            "modules": sorted(name for name in ("torch", "timm", "peft", "jsonschema") if name in sys.modules)}


def installFailure(args):
    """Apply when the install step fails (pip or light-the-torch exits non-zero, as without network)."""
    slicer.app.failures = dict(args["failures"])
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    volume.SetAndObserveImageData(__import__("vtk").vtkImageData())
    widget = openModule(args["pluginFolder"])
    widget.ui.pluginListWidget.selectRow(0)
    widget.ui.backbonePathLineEdit.currentPath = args["backbone"]
    app.answers["confirmOkCancelDisplay"] = True
    raised = None
    try:
        widget.ui.applyButton.click()
    except Exception as error:  # noqa: BLE001 - what used to reach the Python console as a traceback
        raised = f"{type(error).__name__}: {error}"
    return {"raised": raised, "dialogs": app.dialogs, "pip": app.pipInstalls, "constraints": app.pipConstraints,
            "torchInstalls": app.torchInstalls, "jobStarted": widget.job is not None}


def lifecycle(args):
    """The widget as Slicer builds it without a parent (setup() inside __init__), the module's icon, Reload, and
    the module manager's unload (cleanup): no backend process may be left waiting."""
    moduleFile = os.path.join(args["moduleDir"], "AnyMC3DSlicer.py")
    module = AnyMC3DSlicer.AnyMC3DSlicer(slicer_app.ModulePanel(path=moduleFile))
    widget = AnyMC3DSlicer.AnyMC3DSlicerWidget()  # no parent: the base class calls setup() itself
    seen = {"logicAfterInit": widget.logic is not None, "icon": getattr(module.parent.icon, "path", None)}
    widget.logic.backendCommand = [sys.executable, "-c", "import sys, time; sys.stdin.readline(); time.sleep(60)"]
    widget.logic.prepareBackend()
    ready = widget.logic.runner._ready
    oldLogicModule = sys.modules["AnyMC3DSlicerLogic.logic"]
    widget.onReload()  # Slicer re-executes the module file
    seen["logicReloaded"] = sys.modules["AnyMC3DSlicerLogic.logic"] is not oldLogicModule
    seen["moduleUsesNewLogic"] = sys.modules["AnyMC3DSlicer"].LogicPackage is sys.modules["AnyMC3DSlicerLogic"]
    slicer.app.moduleManager().unloadModule("AnyMC3DSlicer")  # calls the widget's cleanup()
    popen = ready.process._popen if ready is not None and ready.process is not None else None
    deadline = time.monotonic() + 10
    while popen is not None and popen.poll() is None and time.monotonic() < deadline:
        qt.QCoreApplication.processEvents()
        time.sleep(0.05)
    seen["readyStarted"] = popen is not None
    seen["readyEnded"] = popen is not None and popen.poll() is not None
    return seen


def importRecord(logic, volume, heatmaps, method):
    """Results of one run with one heatmap per finding (two findings), imported by the Logic."""
    numSlices = volume.GetImageData().GetDimensions()[2]
    record = {"image": "x.nrrd", "status": "ok", "error": None, "slicing_axis": 2, "num_slices": numSlices,
              "results": [{"plugin": "p", "plugin_path": "p.anymc3d", "task": "multilabel", "labels": ["low", "high"],
                           "probabilities": {"low": 0.2, "high": 0.9}, "probabilities_raw": {"low": 0.2, "high": 0.9},
                           "thresholds": {"low": 0.5, "high": 0.5}, "decisions": {"low": False, "high": True},
                           "slicing_axis": 2, "slice_importance": [1.0 / numSlices] * numSlices, "heatmap_method": method,
                           "heatmap": None, "finding_heatmaps": heatmaps}]}
    options = AnyMC3DSlicer.LogicPackage.PredictionOptions(heatmapMethod=method)
    return logic.importResults(record, [volume], options)


def display(args):
    """Results in the scene; the user moves the opacity and threshold sliders, then selects findings rows."""
    widget = openModule()
    volume = widget.logic.loadInputFile(args["volume"])
    composite = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    outputs = importRecord(widget.logic, volume, {"low": args["heatmaps"][0], "high": args["heatmaps"][1]}, "grad_last")
    widget._parameterNode.resultTable = outputs.tableNode
    seen = {}
    widget.ui.opacitySliderWidget.value = 0.8
    seen["opacity"] = composite.GetForegroundOpacity()
    widget.ui.thresholdSliderWidget.value = 0.6
    shown = slicer.mrmlScene.GetNodeByID(composite.GetForegroundVolumeID())
    seen["threshold"] = shown.GetDisplayNode().GetLowerThreshold()
    view = widget.ui.findingsTableView
    view.sortByColumn(2, descending=True)  # probability: the "high" row (table row 1) is now shown first
    view.selectViewRow(0)
    seen["selectedViewRow0"] = slicer.mrmlScene.GetNodeByID(composite.GetForegroundVolumeID()).GetName()
    view.selectViewRow(1)
    seen["selectedViewRow1"] = slicer.mrmlScene.GetNodeByID(composite.GetForegroundVolumeID()).GetName()
    seen["thresholdOfShown"] = slicer.mrmlScene.GetNodeByID(composite.GetForegroundVolumeID()).GetDisplayNode().GetLowerThreshold()
    widget.onJobFinished(AnyMC3DSlicer.LogicPackage.CaseResult("x", "failed", "no"))  # refreshes the selectors' filter
    seen["inputChoices"] = sorted(node.GetName() for node in widget.ui.inputVolumeSelector.nodes())
    seen["heatmaps"] = sorted(node.GetName() for node in outputs.heatmapNodes)
    seen["dialogs"] = app.dialogs
    return seen


def processRunner(args):
    """The QProcess runner: two processes, the second started from the first one's onFinished (as a batch does)."""
    from AnyMC3DSlicerLogic import QProcessRunner

    runner, events = QProcessRunner(), []
    command = [sys.executable, "-c", "import sys; print('a'); print('b', file=sys.stderr); sys.exit(3)"]

    def first(code):
        events.append(("finished", int(code)))
        runner.start(command, lambda line: events.append(("out2", line)), lambda line: None,
                     lambda code: events.append(("finished2", int(code))))

    runner.start(command, lambda line: events.append(("out", line)), lambda line: events.append(("err", line)), first)
    deadline = time.monotonic() + 60
    while len([e for e in events if e[0].startswith("finished")]) < 2 and time.monotonic() < deadline:
        runner.processEvents(0.05)
    runner.processEvents()
    return {"events": events, "deletedDuringSignal": qt.deletedDuringSignal, "live": len(qt.QProcess.live)}


def selfTest(args):
    """The module's own self-test, as Slicer's Reload & Test runs it, with the real backend."""
    module = AnyMC3DSlicer.AnyMC3DSlicer(slicer_app.ModulePanel(path=AnyMC3DSlicer.__file__))
    made = []
    original = AnyMC3DSlicer.AnyMC3DSlicerLogic.__init__

    def remember(self, *a, **k):
        original(self, *a, **k)
        made.append(self)

    AnyMC3DSlicer.AnyMC3DSlicerLogic.__init__ = remember
    commands, realRun = [], AnyMC3DSlicer.selftest.subprocess.run
    AnyMC3DSlicer.selftest.subprocess.run = lambda command, **kwargs: commands.append([str(c) for c in command]) or realRun(command, **kwargs)
    for signature, handler in app.connections:
        if signature == "startupCompleted()":
            handler()
    test = AnyMC3DSlicer.AnyMC3DSlicerTest()
    try:
        test.runTest()
    except __import__("unittest").SkipTest as skipped:
        return {"skipped": str(skipped), "messages": test.messages, "madeLogic": len(made), "pip": app.pipInstalls,
                "torchInstalls": app.torchInstalls, "commands": commands}
    test.lastLogic = made[-1]
    source = slicer_app.SampleDataLogic.sources[AnyMC3DSlicer.SAMPLE_NAME]
    return {"messages": test.messages, "registered": module.moduleName in slicer.selfTests,
            "checksum": source["checksums"], "deprecatedLoadFileType": source["deprecatedLoadFileType"], "commands": commands,
            "leftRunning": [int(run.process.processId()) for run in (test.lastLogic.runner._ready,) if run and not run.ended]}


def similarityFromPoint(args):
    """The "Similarity from point" section: the user picks a point list, places a point on the input volume, then moves it."""
    widget = openModule()
    widget.ui.backbonePathLineEdit.currentPath = args["backbone"]
    widget._parameterNode.options.device = "cpu"
    widget.similaritySession.options.inputSize = 112
    volume = widget.logic.loadInputFile(args["volume"])
    widget._parameterNode.inputVolume = volume
    composite = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    markups = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    widget.ui.similarityMarkupsSelector.setCurrentNode(markups)
    seen = {}
    for key, ras in (("first", args["ras"][0]), ("second", args["ras"][1])):
        if key == "first":
            markups.AddControlPoint(ras)
        else:
            markups.SetNthControlPointPositionWorld(0, *ras)
        qt.QCoreApplication.processEvents()  # the debounce timer fires: the job starts
        job = widget.similarityController.lastJob
        seen[key + "Started"] = job is not None and not job.done
        job.wait(300)
        shown = slicer.mrmlScene.GetNodeByID(composite.GetForegroundVolumeID() or "")
        seen[key] = {"status": job.result.status, "message": job.result.message, "ijk": job.result.ijk,
                     "cacheHit": job.result.cacheHit, "shown": shown.GetName() if shown else None,
                     "label": widget.ui.similarityStatusLabel.text,
                     "inputChoices": sorted(node.GetName() for node in widget.ui.inputVolumeSelector.nodes())}
    tempDir = widget.similaritySession.tempDir
    widget.cleanup()
    seen["tempDirRemoved"] = not os.path.exists(tempDir)
    return seen


def trainSection(args):
    """The Train section: the case table filled from the loaded volumes, labelled in its cells, Train and evaluate
    (the real backend through the module's QProcess runner), progress, the evaluation, the plugin in the list."""
    import dataclasses

    from AnyMC3DSlicerLogic import trainingtable

    widget = openModule(args["pluginFolder"])
    widget.ui.backbonePathLineEdit.currentPath = args["backbone"]
    widget._parameterNode.options.device = "cpu"
    for path in args["volumes"]:
        widget.logic.loadInputFile(path)
    ui, seen, messages = widget.trainUi, {}, []
    ui.nameEdit.type("lesion")
    ui.findingsEdit.type("lesion")
    ui.addVolumesButton.click()
    table = ui.caseTableView.tableNode
    seen["rows"] = [table.GetCellText(row, 0) for row in range(table.GetNumberOfRows())]
    seen["columns"] = [table.GetColumnName(column) for column in range(table.GetNumberOfColumns())]
    view = ui.caseTableView
    seen["caseClickChanged"] = view.clickCheckBox(0, seen["columns"].index("Case"))  # a text cell: no checkbox
    for row, label in enumerate(args["labels"]):  # what clicking the table view's checkboxes does
        if label:
            view.clickCheckBox(row, seen["columns"].index("lesion"))
        view.clickCheckBox(row, seen["columns"].index("Labelled"))
    settings = trainingtable.trainingSettings(table)
    trainingtable.setTrainingSettings(table, dataclasses.replace(settings, epochs=args["epochs"]))
    original = widget.onTrainingProgress
    widget.onTrainingProgress = lambda progress: (messages.append(progress.message), original(progress))
    ui.startButton.click()
    job = widget.trainingJob
    seen["started"] = job is not None and ui.cancelButton.enabled and not ui.startButton.enabled
    job.wait(900)
    seen.update({"messages": messages, "status": ui.statusLabel.text, "dialogs": app.dialogs,
                 "plugins": [item.text() for item in widget.ui.pluginListWidget.items],
                 "charts": [chart.GetName() for chart in slicer.modules.plots.shown],
                 "metricsTable": ui.metricsTableView.tableNode.GetName() if ui.metricsTableView.tableNode else None,
                 "runTestEnabled": ui.runTestButton.enabled, "progressHidden": not ui.progressBar.visible,
                 "testCases": sorted(node.GetName() for node in widget.trainingResult.testVolumeNodes)})
    widget.cleanup()
    return seen


def manifestCases(args):
    """Add cases from a manifest: the file dialog cancelled (nothing happens), then a CSV whose cases are read one at
    a time off the event loop (the section answers at once), the bad rows in one message; a second CSV cancelled
    after its first case."""
    widget = openModule(args["pluginFolder"])
    ui, seen = widget.trainUi, {}
    ui.addManifestButton.click()  # the dialog cancelled: ""
    seen["afterCancelledDialog"] = {"table": widget.trainingTable(create=False) is not None, "dialogs": list(app.dialogs)}
    statuses = []
    original = widget.onManifestProgress
    widget.onManifestProgress = lambda *a: (original(*a), statuses.append(ui.statusLabel.text))
    qt.QFileDialog.nextOpenFileName = args["manifest"]
    ui.addManifestButton.click()
    table = ui.caseTableView.tableNode
    seen["rightAfterClick"] = {"rows": table.GetNumberOfRows(), "status": ui.statusLabel.text,
                               "buttonsEnabled": [ui.addManifestButton.enabled, ui.startButton.enabled],
                               "cancelEnabled": ui.cancelButton.enabled}
    qt.QCoreApplication.processEvents()  # the event loop: one case per scheduled turn
    seen.update({"statuses": list(statuses), "status": ui.statusLabel.text, "dialogs": list(app.dialogs),
                 "rows": [table.GetCellText(row, 0) for row in range(table.GetNumberOfRows())],
                 "columns": [table.GetColumnName(column) for column in range(table.GetNumberOfColumns())],
                 "findingsEdit": ui.findingsEdit.text, "buttonsEnabled": [ui.addManifestButton.enabled, ui.startButton.enabled],
                 "asked": qt.QFileDialog.asked})
    qt.QFileDialog.nextOpenFileName = args["second"]
    ui.addManifestButton.click()
    while table.GetNumberOfRows() == len(seen["rows"]):
        qt._pending.pop(0)()
    ui.cancelButton.click()
    qt.QCoreApplication.processEvents()
    seen["afterCancel"] = {"rows": table.GetNumberOfRows(), "status": ui.statusLabel.text,
                           "addEnabled": ui.addManifestButton.enabled}
    widget.cleanup()
    return seen


if __name__ == "__main__":
    result = globals()[sys.argv[1]](json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
    print(json.dumps(result, default=str))
    sys.stdout.flush()
    os._exit(0)  # skip VTK's slow teardown

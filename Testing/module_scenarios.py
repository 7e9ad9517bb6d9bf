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
    """What Slicer does when the user opens the module: build the widget, call setup() and enter()."""
    if pluginFolder:
        qt.QSettings.store[AnyMC3DSlicer.SETTINGS_PLUGIN_FOLDER] = pluginFolder
    widget = AnyMC3DSlicer.AnyMC3DSlicerWidget()
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
    module = AnyMC3DSlicer.AnyMC3DSlicer(slicer_app.ModulePanel())
    for signature, handler in app.connections:
        if signature == "startupCompleted()":
            handler()
    test = AnyMC3DSlicer.AnyMC3DSlicerTest()
    test.runTest()
    return {"messages": test.messages, "registered": module.moduleName in slicer.selfTests,
            "checksum": slicer_app.SampleDataLogic.sources[AnyMC3DSlicer.SAMPLE_NAME]["checksums"]}


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


if __name__ == "__main__":
    result = globals()[sys.argv[1]](json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
    print(json.dumps(result, default=str))
    sys.stdout.flush()
    os._exit(0)  # skip VTK's slow teardown

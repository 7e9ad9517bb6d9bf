"""The widget's "Train" section: the case table of the scene's volumes or a manifest CSV's cases (labels, optional
segmentation, split) and the plugin's settings, then ``anymc3d train`` / ``eval`` in the background through the Logic's process runner (the GUI
only receives its lines), a live chart of loss and validation AUROC, Cancel, Resume, the evaluation, and the plugin
added to the plugin list. A mixin of the module's widget (``self.layout``, ``self.logic``, ``self.ui``,
``self.pluginLibrary``, ``startJob``)."""

import dataclasses

import AnyMC3DSlicerLogic as LogicPackage
import ctk
import qt
import slicer
from AnyMC3DSlicerLogic import manifestcases, training, trainingtable
from slicer.i18n import tr as _


class TrainSection:
    """Train section of AnyMC3DSlicerWidget; everything the scene holds is in the case table node (saved with it)."""

    trainingJob = None
    trainingResult = None
    manifestImport = None

    def setupTrainSection(self):
        """Build the collapsed "Train" section below the .ui's sections."""
        section = ctk.ctkCollapsibleButton()
        section.text = _("Train")
        section.collapsed = True
        self.layout.addWidget(section)
        form = qt.QFormLayout(section)
        self.trainUi = ui = TrainWidgets()
        for name, label in (("nameEdit", _("Plugin name:")), ("findingsEdit", _("Findings (comma-separated):")),
                            ("descriptionEdit", _("Description:")), ("modalityEdit", _("Modality (CT, MR):")),
                            ("bodyPartEdit", _("Body part:"))):
            setattr(ui, name, qt.QLineEdit())
            form.addRow(label, getattr(ui, name))
        ui.nameEdit.text, ui.findingsEdit.text = "finding", "finding"
        ui.multiclassCheckBox = qt.QCheckBox(_("One class per case (multi-class)"))
        ui.addVolumesButton = qt.QPushButton(_("Add loaded volumes"))
        ui.addManifestButton = qt.QPushButton(_("Add cases from a manifest…"))
        ui.addManifestButton.toolTip = _("A CSV as anymc3d train reads it: image, label columns (0/1 per "
                                         "finding, or one class number), optional mask, split, id; paths relative "
                                         "to the CSV")
        ui.caseTableView = slicer.qMRMLTableView()  # a checkbox per finding and Labelled (bit columns); text cells
        ui.caseTableView.setMRMLScene(slicer.mrmlScene)
        ui.startButton, ui.resumeButton, ui.cancelButton = (qt.QPushButton(text) for text in (
            _("Train and evaluate"), _("Resume"), _("Cancel training")))
        ui.progressBar, ui.statusLabel = qt.QProgressBar(), qt.QLabel()
        ui.metricsTableView = slicer.qMRMLTableView()
        ui.metricsTableView.setMRMLScene(slicer.mrmlScene)
        ui.runTestButton = qt.QPushButton(_("Run on the test cases"))
        for widget in (ui.multiclassCheckBox, ui.addVolumesButton, ui.addManifestButton, ui.caseTableView, ui.startButton, ui.resumeButton,
                       ui.cancelButton, ui.progressBar, ui.statusLabel, ui.metricsTableView, ui.runTestButton):
            form.addRow(widget)
        ui.cancelButton.enabled = ui.runTestButton.enabled = False
        ui.progressBar.hide()
        ui.addVolumesButton.connect("clicked(bool)", self.onAddTrainingVolumes)
        ui.addManifestButton.connect("clicked(bool)", self.onAddManifestCases)
        ui.startButton.connect("clicked(bool)", lambda checked: self.onStartTraining(resume=False))
        ui.resumeButton.connect("clicked(bool)", lambda checked: self.onStartTraining(resume=True))
        ui.cancelButton.connect("clicked(bool)", self.onCancelTraining)
        ui.runTestButton.connect("clicked(bool)", self.onRunTestCases)
        self.showTrainingTable(self.trainingTable(create=False))

    def trainingTable(self, create=True):
        """The scene's case table (the first one), made on demand with the section's settings."""
        tables = [node for node in LogicPackage.nodesByClass(slicer.mrmlScene, "vtkMRMLTableNode")
                  if trainingtable.isTrainingTable(node)]
        if tables or not create:
            return tables[0] if tables else None
        return trainingtable.createTrainingTable(slicer.mrmlScene, self.trainingSettingsFromGui())

    def showTrainingTable(self, table):
        self.trainUi.caseTableView.setMRMLTableNode(table)
        if table is not None:  # the section shows what the scene saved
            settings = trainingtable.trainingSettings(table)
            ui = self.trainUi
            ui.nameEdit.text, ui.findingsEdit.text = settings.name, ", ".join(settings.labels)
            ui.descriptionEdit.text, ui.modalityEdit.text, ui.bodyPartEdit.text = (
                settings.description, settings.modality, settings.bodyPart)
            ui.multiclassCheckBox.checked = settings.task == "multiclass"

    def trainingSettingsFromGui(self, base=None):
        ui = self.trainUi
        return dataclasses.replace(
            base or trainingtable.TrainingSettings(), name=ui.nameEdit.text.strip(),
            labels=tuple(label.strip() for label in ui.findingsEdit.text.split(",") if label.strip()),
            task="multiclass" if ui.multiclassCheckBox.checked else "multilabel", description=ui.descriptionEdit.text,
            modality=ui.modalityEdit.text.strip().upper(), bodyPart=ui.bodyPartEdit.text.strip(),
            backbone=self.ui.backbonePathLineEdit.currentPath,
            device=self._parameterNode.options.device if self._parameterNode else "auto")

    def onAddTrainingVolumes(self):
        with slicer.util.tryWithErrorDisplay(_("Cannot make the case table."), waitCursor=True):
            table = self.trainingTable()
            trainingtable.setTrainingSettings(table, self.trainingSettingsFromGui(trainingtable.trainingSettings(table)))
            added = trainingtable.fillFromScene(table, slicer.mrmlScene)
            self.showTrainingTable(table)
            self.trainUi.statusLabel.text = _(
                "{n} volume(s) added: tick each case's findings and then its Labelled box (multi-class: type the "
                "class name), and the split (auto, train, val, test)").format(n=len(added))

    def onAddManifestCases(self):
        """Ask for a manifest CSV and add its cases: read one at a time off the event loop (the status label counts
        them, Cancel stops), then one message listing every row not added."""
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Add cases from a manifest"), "", _("Manifest (*.csv)"))
        if not path:  # cancelled
            return None
        table = self.trainingTable()
        try:
            trainingtable.setTrainingSettings(table, self.trainingSettingsFromGui(trainingtable.trainingSettings(table)))
            self.manifestImport = manifestcases.ManifestImport(self.logic, table, path, self.onManifestProgress,
                                                               self.onManifestFinished)
            self.setManifestImportRunning(True)
            self.manifestImport.start()
        except (trainingtable.TrainingInputError, ValueError) as error:  # the file itself: nothing was added
            self.manifestImport = None
            self.setManifestImportRunning(False)
            slicer.util.errorDisplay(_("Cannot add cases from the manifest:") + "\n" + str(error))
            return None
        self.showTrainingTable(table)  # the rows appear as the cases are read
        self.trainUi.statusLabel.text = _("Reading {n} case(s) from {path}").format(n=len(self.manifestImport.plan.cases),
                                                                                 path=path)
        return self.manifestImport

    def setManifestImportRunning(self, running):
        ui = self.trainUi
        ui.addManifestButton.enabled = ui.addVolumesButton.enabled = ui.startButton.enabled = not running
        ui.resumeButton.enabled = not running
        ui.cancelButton.enabled = running

    def onManifestProgress(self, done, total, name):
        self.trainUi.statusLabel.text = _("Case {done}/{total} read: {name}").format(done=done, total=total, name=name)

    def onManifestFinished(self, job):
        self.manifestImport = None
        self.setManifestImportRunning(False)
        self.showTrainingTable(job.table)
        self.trainUi.statusLabel.text = _("{n} case(s) added from {path}{cancelled}").format(
            n=len(job.added), path=job.path, cancelled=_(" (cancelled)") if job.cancelled else "")
        if job.problems:
            shown = job.problems[:40] + ([_("... and {n} more").format(n=len(job.problems) - 40)] if len(job.problems) > 40 else [])
            slicer.util.warningDisplay(_("{n} row(s) of the manifest not added:").format(n=len(job.problems)) + "\n"
                                       + "\n".join(shown))

    def onStartTraining(self, resume=False):
        table = self.trainingTable(create=False)
        if table is None:
            return slicer.util.errorDisplay(_("Add the loaded volumes to the case table first."))
        try:
            trainingtable.setTrainingSettings(table, self.trainingSettingsFromGui(trainingtable.trainingSettings(table)))
        except ValueError as error:
            return slicer.util.errorDisplay(str(error))
        if not self.ensureDependencies(training=True):
            return None
        self.setTrainingRunning(True)
        try:
            self.trainingJob = training.TrainingJob(self.logic, table, self.pluginLibrary, self.onTrainingProgress,
                                                    self.onTrainingFinished, resume=resume).start()
        except (trainingtable.TrainingInputError, ValueError, OSError) as error:  # before anything ran: one message
            self.setTrainingRunning(False)
            self.trainingJob = None
            slicer.util.errorDisplay(_("Cannot train:") + "\n" + str(error))
        return self.trainingJob

    def setTrainingRunning(self, running):
        ui = self.trainUi
        ui.startButton.enabled = ui.resumeButton.enabled = ui.addVolumesButton.enabled = not running
        ui.cancelButton.enabled = running
        ui.progressBar.value = 0
        ui.progressBar.visible = running

    def onTrainingProgress(self, progress):
        self.trainUi.progressBar.value = int(100 * progress.fraction)
        self.trainUi.statusLabel.text = progress.message
        job = self.trainingJob
        if progress.epoch and job is not None and len(job.history) == 1:  # the live chart, from the first epoch
            slicer.modules.plots.logic().ShowChartInLayout(job.historyChartNode)

    def onTrainingFinished(self, result):
        self.trainingJob = None
        self.setTrainingRunning(False)
        self.trainUi.statusLabel.text = result.message
        if result.status != "ok":
            if result.status == "failed":
                slicer.util.errorDisplay(_("Training failed: {message}").format(message=result.message))
            return
        self.trainingResult = result
        self.trainUi.metricsTableView.setMRMLTableNode(result.metricsTableNode)
        if result.rocChartNode is not None:
            slicer.modules.plots.logic().ShowChartInLayout(result.rocChartNode)
        self.refreshPlugins()  # the new plugin in the list
        self.trainUi.runTestButton.enabled = bool(result.testVolumeNodes)

    def onCancelTraining(self):
        if self.manifestImport is not None:
            self.manifestImport.cancel()
        if self.trainingJob is not None:
            self.trainingJob.cancel()

    def onRunTestCases(self):
        """The trained plugin on its test cases, by the module's prediction path (findings, heatmaps, batch table)."""
        result = self.trainingResult
        backbone = trainingtable.trainingSettings(self.trainingTable(create=False)).backbone
        self.ui.batchResultsTableWidget.setRowCount(0)
        self.startJob(lambda onProgress, onFinished: self.logic.startBatch(
            result.testVolumeNodes, backbone, [result.pluginPath], self._parameterNode.options,
            self._parameterNode.display, onCaseDone=self.onBatchCaseDone, onFinished=onFinished, onProgress=onProgress))


class TrainWidgets:
    """The Train section's widgets, by name (as ``slicer.util.childWidgetVariables`` gives the .ui's)."""

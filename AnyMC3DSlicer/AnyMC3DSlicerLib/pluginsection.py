"""The widget's plugin list (a folder of ``.anymc3d`` files, read through the Logic's PluginLibrary) and the first-run
install of the backend's Python packages: a mixin of the module's widget, which has ``self.ui`` and ``self.parent``."""

import logging

import AnyMC3DSlicerLogic as LogicPackage
import qt
import slicer
from slicer.i18n import tr as _

SETTINGS_PLUGIN_FOLDER = "AnyMC3D/PluginFolder"


class PluginSection:
    """Plugin list and dependency install of AnyMC3DSlicerWidget."""

    pluginLibrary = None
    _dependenciesChecked = False
    _trainingDependenciesChecked = False

    def onPluginFolderChanged(self, folder):
        qt.QSettings().setValue(SETTINGS_PLUGIN_FOLDER, folder)
        self.pluginLibrary = LogicPackage.PluginLibrary(folder)  # reads plugin.json only: no torch, no process
        self.refreshPlugins()

    def refreshPlugins(self):
        self.ui.pluginListWidget.clear()
        with slicer.util.WaitCursor():
            plugins, problems = self.pluginLibrary.plugins()
        for plugin in plugins:
            item = qt.QListWidgetItem(plugin.name)
            item.setData(qt.Qt.UserRole, plugin.path)
            item.setToolTip(plugin.description())
            self.ui.pluginListWidget.addItem(item)
        for path, message in problems:
            slicer.util.showStatusMessage(_("Cannot read plugin {path}: {message}").format(path=path, message=message), 5000)

    def selectedPlugins(self):
        return [self.pluginLibrary.plugin(item.data(qt.Qt.UserRole)) for item in self.ui.pluginListWidget.selectedItems()]

    def onPluginSelectionChanged(self):
        self.ui.pluginInfoLabel.text = "\n".join(plugin.description() for plugin in self.selectedPlugins())

    def onImportPlugin(self):
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Import plugin"), "", _("AnyMC3D plugin (*.anymc3d)"))
        if path:
            with slicer.util.tryWithErrorDisplay(_("Cannot import the plugin."), waitCursor=True):
                self.pluginLibrary.importPlugin(path)
            self.refreshPlugins()

    def onRemovePlugin(self):
        plugins = self.selectedPlugins()
        if plugins and slicer.util.confirmYesNoDisplay(_("Remove {names}?").format(names=", ".join(p.name for p in plugins))):
            for plugin in plugins:
                self.pluginLibrary.removePlugin(plugin.path)
            self.refreshPlugins()

    def ensureDependencies(self, training=False):
        """Install what the backend needs (``training``: also what ``anymc3d train`` / ``eval`` need) after asking."""
        if self._dependenciesChecked and (self._trainingDependenciesChecked or not training):
            return True
        from AnyMC3DSlicerLogic.dependencies import trainingRequirements

        checker = LogicPackage.DependencyChecker(trainingRequirements() if training else None)
        missing = checker.missingPackages()
        try:
            checker.install(missing, confirm=lambda lines: slicer.util.confirmOkCancelDisplay(
                _("AnyMC3D needs these Python packages, which will be downloaded and installed now:") + "\n\n" + "\n".join(lines)))
        except LogicPackage.InstallError as error:
            if error.restartRequired and slicer.util.confirmOkCancelDisplay(error.message + "\n\n" + _("Restart Slicer now?")):
                slicer.util.restart()
            else:
                slicer.util.errorDisplay(error.message)
            return False
        except Exception as error:  # any other install failure: a message, not a console traceback
            logging.getLogger("AnyMC3D").exception("Installing the Python dependencies failed")
            slicer.util.errorDisplay(_("Installing the Python packages AnyMC3D needs failed: {error}").format(error=error))
            return False
        self._dependenciesChecked = True
        self._trainingDependenciesChecked = self._trainingDependenciesChecked or training
        return True

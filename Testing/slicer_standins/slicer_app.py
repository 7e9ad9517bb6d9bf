"""A Slicer-like Python for the module file: slicer-core's real MRML (the ``slicer`` package) plus stand-ins for
what only the application has. ``install()`` must run before the module file is imported.

Each stand-in names the real code it mirrors and behaves as it does where the module depends on it:

- ``slicer.ScriptedLoadableModule`` (Slicer/Slicer 583e9b3, and v5.10.0 a2b6d08: Base/Python/slicer/
  ScriptedLoadableModule.py): every base class's ``__init__`` calls ``super().__init__()`` with no arguments; the
  module's icon is ``<folder of parent.path>/Resources/Icons/<ModuleName>.svg|.png`` when that file exists; the
  logic's module name is its class name without "Logic"; ``getParameterNode`` finds or adds the singleton
  ``vtkMRMLScriptedModuleNode`` of ``slicer.mrmlScene``; the widget given no parent makes one with a layout and
  calls ``setup()`` itself, inside ``__init__``; every widget connects the module manager's
  ``moduleAboutToBeUnloaded(QString)`` to ``cleanup()`` (Slicer calls it on unload and at exit).
- ``slicer.parameterNodeWrapper`` (same commit, Base/Python/slicer/parameterNodeWrapper/wrapper.py,
  guiConnectors.py, parameterPack.py): typed members stored in the node's parameters and references;
  ``connectGui(ui)`` binds the widgets whose ``SlicerParameterName`` names a member: it writes the member into
  the widget, then connects the widget's signal (so handlers connected before run first and see the old value),
  and observes the node to update the widgets; ``AddObserver`` / ``RemoveObserver`` reach the node.
- ``SampleData`` (Modules/Scripted/SampleData/SampleData.py): ``registerCustomSampleDataSource(..., checksums=...)``
  and ``downloadSample`` that verifies a "SHA256:" checksum before loading.
- ``PyTorchUtils`` (fepegar/SlicerPyTorch f677db9, PyTorchUtils/PyTorchUtils.py, now Slicer/SlicerPyTorch):
  ``PyTorchUtilsLogic().installTorch(askConfirmation, forceComputationBackend, torchVersionRequirement,
  torchvisionVersionRequirement)`` runs ``slicer.util._executePythonModule('light_the_torch', ["install",
  "torch<spec>", "torchvision<spec>"])`` (blocking; ``subprocess.CalledProcessError`` on failure), then
  ``import torch`` in Slicer's own process and returns it. Here light-the-torch installs nothing: it records the
  call, fails when ``app.failures["light_the_torch"]`` is an exit code, and then torch is imported for real (so a
  fresh Slicer, torch blocked, gets ModuleNotFoundError as a broken install would).
- ``slicer.util.pip_install`` (Slicer v5.10.0 a2b6d08, Base/Python/slicer/util.py: ``pip_install``,
  ``_executePythonModule``, ``logProcessOutput``): a string is split as the shell does, a list is taken as
  arguments, anything else is ValueError; ``PythonSlicer -m pip install ...`` runs blocking and a non-zero exit
  raises ``subprocess.CalledProcessError``. Here it records the arguments (and the contents of a
  ``-c``/``--constraint`` file, as pip reads it) and fails when ``app.failures["pip"]`` is an exit code.
- ``slicer.util`` dialogs record what they were asked and answer from ``app.answers``.
"""

import contextlib
import dataclasses
import hashlib
import itertools
import os
import shlex
import subprocess
import sys
import tempfile
import types
import typing
import unittest

import qt
import slicer
import slicer.util
import vtk


class Application:
    """``slicer.app``: version, settings path, signal connections; records dialogs and installs."""

    majorVersion, minorVersion = 5, 10

    def __init__(self):
        self.dialogs = []  # (kind, text)
        self.answers = {"confirmOkCancelDisplay": False, "confirmYesNoDisplay": False}
        self.pipInstalls = []  # the arguments after "install"
        self.pipConstraints = []  # the lines of each constraints file given to pip
        self.torchInstalls = []
        self.failures = {}  # "pip" / "light_the_torch": the exit code that command returns
        self.connections = []
        self._moduleManager = ModuleManager()
        self.slicerUserSettingsFilePath = os.path.join(tempfile.mkdtemp(prefix="slicer-settings-"), "Slicer.ini")

    def connect(self, signature, handler):
        self.connections.append((signature, handler))

    def commandOptions(self):
        return types.SimpleNamespace(testingEnabled=True)

    def moduleManager(self):
        return self._moduleManager


class ModuleManager(qt.QObject):
    """qSlicerModuleManager: emits ``moduleAboutToBeUnloaded(QString)`` before a module is unloaded (and at exit)."""

    SIGNALS = ("moduleAboutToBeUnloaded",)

    def unloadModule(self, moduleName):
        self.moduleAboutToBeUnloaded.emit(moduleName)


def _executePythonModule(module, args):
    """``PythonSlicer -m module args`` as Slicer runs it: blocking, CalledProcessError on a non-zero exit."""
    commandLine = ["PythonSlicer", "-m", module, *args]
    exitCode = slicer.app.failures.get(module)
    if exitCode:
        raise subprocess.CalledProcessError(exitCode, commandLine)


# --------------------------------------------------------------------------- ScriptedLoadableModule
class ScriptedLoadableModule:
    def __init__(self, parent):
        super().__init__()
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title, parent.categories, parent.dependencies, parent.contributors = "", [], [], []
        moduleDir = os.path.dirname(self.parent.path)
        for iconExtension in (".svg", ".png"):
            iconPath = os.path.join(moduleDir, "Resources/Icons", self.moduleName + iconExtension)
            if os.path.isfile(iconPath):
                parent.icon = qt.QIcon(iconPath)
                break
        slicer.selfTests[self.moduleName] = self.runTest

    def runTest(self, msec=100, **kwargs):
        testCase = getattr(sys.modules[self.__module__], self.moduleName + "Test")()
        testCase.messageDelay = msec
        testCase.runTest(**kwargs)


class ModulePanel(qt.QWidget):
    """The parent the application gives a module (``path``: the module file, ``icon``) and its widget (a layout,
    ``isEntered``)."""

    def __init__(self, path=""):
        super().__init__()
        self._layout = qt.QVBoxLayout()
        self.isEntered = True
        self.path = path
        self.icon = None

    def layout(self):
        return self._layout


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        super().__init__()
        self.moduleName = self.__class__.__name__
        self.moduleName = self.moduleName.removesuffix("Widget")
        self.parent = parent if parent else ModulePanel()
        self.layout = self.parent.layout()
        if not parent:
            self.setup()
        slicer.app.moduleManager().connect("moduleAboutToBeUnloaded(QString)", self._onModuleAboutToBeUnloaded)

    def setup(self):
        pass

    def cleanup(self):
        pass

    def onReload(self):
        slicer.util.reloadScriptedModule(self.moduleName)

    def _onModuleAboutToBeUnloaded(self, moduleName):
        if moduleName == self.moduleName:
            self.cleanup()
            slicer.app.moduleManager().disconnect("moduleAboutToBeUnloaded(QString)", self._onModuleAboutToBeUnloaded)


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        super().__init__()
        self.moduleName = self.__class__.__name__
        self.moduleName = self.moduleName.removesuffix("Logic")
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node:
            return node
        return slicer.mrmlScene.AddNode(self.createParameterNode())

    def createParameterNode(self):
        node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        node.SetSingletonTag(self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.messages = []

    def runTest(self):
        pass

    def delayDisplay(self, message, requestedDelay=None, msec=None):
        self.messages.append(message)


# --------------------------------------------------------------------------- parameterNodeWrapper
@dataclasses.dataclass(frozen=True)
class Choice:
    choices: tuple


@dataclasses.dataclass(frozen=True)
class Minimum:
    minimum: float


@dataclasses.dataclass(frozen=True)
class Maximum:
    maximum: float


def _validate(name, annotation, value):
    for item in getattr(annotation, "__metadata__", ()):
        if isinstance(item, Choice) and value not in item.choices:
            raise ValueError(f"{name}: {value!r} is not one of {item.choices}")
        if isinstance(item, Minimum) and value < item.minimum:
            raise ValueError(f"{name}: {value!r} is below {item.minimum}")
        if isinstance(item, Maximum) and value > item.maximum:
            raise ValueError(f"{name}: {value!r} is above {item.maximum}")


def parameterPack(cls):
    """A dataclass whose members are validated on assignment (Choice, Minimum, Maximum)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    cls = dataclasses.dataclass(cls)

    def __setattr__(self, name, value):
        if name in hints:
            _validate(name, hints[name], value)
        object.__setattr__(self, name, value)

    cls.__setattr__ = __setattr__
    cls._parameterPackHints = hints
    return cls


def _baseType(annotation):
    return typing.get_origin(annotation) and typing.get_args(annotation)[0] or annotation


def _serialize(value):
    return repr(value) if isinstance(value, str) else str(value)


def _parse(text, kind):
    if kind is bool:
        return text == "True"
    if kind is str:
        return text[1:-1]
    return kind(text)


class _BoundPack:
    """A parameter pack read through the wrapper: members read from and written to the node."""

    def __init__(self, node, prefix, packType):
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_hints", packType._parameterPackHints)

    def __getattr__(self, name):
        return _parse(self._node.GetParameter(f"{self._prefix}.{name}"), _baseType(self._hints[name]))

    def __setattr__(self, name, value):
        _validate(name, self._hints[name], value)
        self._node.SetParameter(f"{self._prefix}.{name}", _serialize(value))


def _connector(widget, read, write):
    """(signal, write the widget, read the widget) for the widget kinds the module binds."""
    if isinstance(widget, qt.ctkSliderWidget):
        return widget.valueChanged, lambda v: setattr(widget, "value", v), lambda: widget.value
    if isinstance(widget, qt.QCheckBox):
        return widget.toggled, lambda v: setattr(widget, "checked", v), lambda: widget.checked
    if isinstance(widget, qt.qMRMLNodeComboBox):
        return widget.currentNodeChanged, widget.setCurrentNode, widget.currentNode
    raise TypeError(f"no GUI connector for {type(widget).__name__}")


def parameterNodeWrapper(cls):
    hints = typing.get_type_hints(cls, include_extras=True)

    class Wrapper:
        allParameters = hints

        def __init__(self, parameterNode):
            self.parameterNode = parameterNode
            self._guis = {}
            self._nextTag = 0
            for name, annotation in hints.items():
                kind = _baseType(annotation)
                if hasattr(kind, "_parameterPackHints"):
                    defaults = kind()
                    for member in kind._parameterPackHints:
                        key = f"{name}.{member}"
                        if not parameterNode.GetParameter(key):
                            parameterNode.SetParameter(key, _serialize(getattr(defaults, member)))

        def getValue(self, name):
            top, _, member = name.partition(".")
            value = getattr(self, top)
            return getattr(value, member) if member else value

        def setValue(self, name, value):
            top, _, member = name.partition(".")
            if member:
                setattr(getattr(self, top), member, value)
            else:
                setattr(self, top, value)

        def connectGui(self, gui):
            widgets = {w.property("SlicerParameterName"): w for w in vars(gui).values()
                       if isinstance(w, qt.QObject) and w.property("SlicerParameterName")}
            connections = []
            for name, widget in widgets.items():
                signal, writeWidget, readWidget = _connector(widget, None, None)
                writeWidget(self.getValue(name))

                def changed(*args, name=name, readWidget=readWidget):
                    self.setValue(name, readWidget())

                signal.connect(changed)
                connections.append((signal, changed, name, writeWidget))

            def updateGui(caller, event):
                for _, _, name, writeWidget in connections:
                    writeWidget(self.getValue(name))

            tag = self._nextTag
            self._nextTag += 1
            self._guis[tag] = (connections, self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, updateGui))
            return tag

        def disconnectGui(self, tag):
            if tag in self._guis:
                connections, observer = self._guis.pop(tag)
                for signal, changed, _, _ in connections:
                    signal.disconnect(changed)
                self.parameterNode.RemoveObserver(observer)

        def AddObserver(self, event, callback, priority=0.0):
            return self.parameterNode.AddObserver(event, callback, priority)

        def RemoveObserver(self, tag):
            self.parameterNode.RemoveObserver(tag)

        def Modified(self):
            self.parameterNode.Modified()

    for name, annotation in hints.items():
        kind = _baseType(annotation)
        if hasattr(kind, "_parameterPackHints"):
            setattr(Wrapper, name, property(lambda self, name=name, kind=kind: _BoundPack(self.parameterNode, name, kind)))
        else:  # an MRML node type: a node reference
            setattr(Wrapper, name, property(
                lambda self, name=name: self.parameterNode.GetNodeReference(name),
                lambda self, node, name=name: self.parameterNode.SetNodeReferenceID(name, node.GetID() if node else None)))
    Wrapper.__name__ = Wrapper.__qualname__ = cls.__name__
    return Wrapper


# --------------------------------------------------------------------------- SampleData, PyTorchUtils
class SampleDataLogic:
    sources: typing.ClassVar[dict] = {}

    @staticmethod
    def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None, nodeNames=None,
                                       customDownloader=None, thumbnailFileName=None, loadFileTypes=None,
                                       loadFiles=None, loadFileProperties=None, checksums=None, loadFileType=None):
        """As Slicer v5.10.0's: ``loadFileType`` is the deprecated alias of ``loadFileTypes`` (both: ValueError);
        the stand-in records which one was used."""
        if loadFileType is not None and loadFileTypes is not None:
            raise ValueError("loadFileType and loadFileTypes cannot be specified at the same time")
        SampleDataLogic.sources[sampleName] = {"uris": uris, "fileNames": fileNames, "nodeNames": nodeNames,
                                               "checksums": checksums, "loadFileTypes": loadFileTypes or loadFileType,
                                               "deprecatedLoadFileType": loadFileType is not None}


def downloadSample(sampleName):
    source = SampleDataLogic.sources[sampleName]
    path = source["uris"].removeprefix("file://")
    algorithm, _, digest = source["checksums"].partition(":")
    with open(path, "rb") as file:
        if hashlib.new(algorithm.lower(), file.read()).hexdigest() != digest:
            raise ValueError(f"Checksum of {path} does not match {source['checksums']}")
    return slicer.modules.volumes.logic().AddArchetypeVolume(path, source["nodeNames"], 0)


class PyTorchUtilsLogic:
    def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                     torchvisionVersionRequirement=None):
        slicer.app.torchInstalls.append({"askConfirmation": askConfirmation, "torch": torchVersionRequirement,
                                         "torchvision": torchvisionVersionRequirement})
        args = ["install", "torch" + (torchVersionRequirement or ""), "torchvision" + (torchvisionVersionRequirement or "")]
        _executePythonModule("light_the_torch", args)
        import torch  # into Slicer's own process, as the real one does

        return torch


def pip_install(requirements):
    if type(requirements) is str:
        args = ["install", *shlex.split(requirements)]
    elif type(requirements) is list:
        args = ["install", *requirements]
    else:
        raise ValueError("pip_install requirement input must be string or list")
    slicer.app.pipInstalls.append(args[1:])
    for flag, value in itertools.pairwise(args):
        if flag in ("-c", "--constraint"):
            with open(value, encoding="utf-8") as file:
                slicer.app.pipConstraints.append([line.strip() for line in file if line.strip()])
    _executePythonModule("pip", args)


# --------------------------------------------------------------------------- install
def _module(name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    if "." in name:
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, module)
    return module


def reloadScriptedModule(moduleName):
    """slicer.util.reloadScriptedModule (v5.10.0): re-executes the module's file under its name; nothing else is
    reloaded (the packages it imports stay in sys.modules)."""
    import importlib.util

    filePath = sys.modules[moduleName].__file__
    spec = importlib.util.spec_from_file_location(moduleName, filePath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[moduleName] = module
    spec.loader.exec_module(module)


def childWidgetVariables(widget):
    return types.SimpleNamespace(**{child.objectName: child for child in widget.findChildren(qt.QObject) if child.objectName})


def install():
    """Make ``slicer`` look like the application's: a scene with its logics, modules, util dialogs, stand-ins."""
    app = Application()
    scene = slicer.vtkMRMLScene()
    appLogic = slicer.vtkSlicerApplicationLogic()
    appLogic.SetMRMLScene(scene)
    colorLogic = slicer.vtkSlicerColorLogic()
    colorLogic.SetMRMLApplicationLogic(appLogic)
    colorLogic.SetMRMLScene(scene)
    appLogic.SetModuleLogic("Colors", colorLogic)
    volumesLogic = slicer.vtkSlicerVolumesLogic()
    volumesLogic.SetMRMLApplicationLogic(appLogic)
    volumesLogic.SetMRMLScene(scene)
    volumeRenderingLogic = slicer.vtkSlicerVolumeRenderingLogic()
    volumeRenderingLogic.SetMRMLApplicationLogic(appLogic)
    volumeRenderingLogic.SetMRMLScene(scene)
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    plots = types.SimpleNamespace(shown=[])
    plots.logic = lambda: types.SimpleNamespace(ShowChartInLayout=plots.shown.append)

    slicer.app, slicer.mrmlScene, slicer.selfTests = app, scene, {}
    slicer.modules = types.SimpleNamespace(volumes=types.SimpleNamespace(logic=lambda: volumesLogic),
                                           volumerendering=types.SimpleNamespace(logic=lambda: volumeRenderingLogic),
                                           plots=plots)
    slicer.appLogic = appLogic
    slicer.qMRMLWidget = qt.qMRMLWidget
    slicer.qMRMLTableView = qt.qMRMLTableView  # PythonQt wraps Slicer's MRML widgets into the slicer module
    _module("slicer.ScriptedLoadableModule", ScriptedLoadableModule=ScriptedLoadableModule,
            ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget,
            ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest=ScriptedLoadableModuleTest)
    _module("slicer.parameterNodeWrapper", parameterNodeWrapper=parameterNodeWrapper, parameterPack=parameterPack,
            Choice=Choice, Minimum=Minimum, Maximum=Maximum)
    _module("slicer.i18n", tr=lambda text: text)
    _module("SampleData", SampleDataLogic=SampleDataLogic, downloadSample=downloadSample)
    _module("PyTorchUtils", PyTorchUtilsLogic=PyTorchUtilsLogic)

    def dialog(kind):
        def show(text, *args, **kwargs):
            app.dialogs.append((kind, str(text)))
            return app.answers.get(kind)
        return show

    @contextlib.contextmanager
    def tryWithErrorDisplay(message="", waitCursor=False):
        try:
            yield
        except Exception as error:  # noqa: BLE001 - as Slicer's: shown, not raised
            app.dialogs.append(("errorDisplay", f"{message} {error}"))

    slicer.util.loadUI = qt.loadUI
    slicer.util.childWidgetVariables = childWidgetVariables
    slicer.util.reloadScriptedModule = reloadScriptedModule
    slicer.util.WaitCursor = contextlib.nullcontext
    slicer.util.tryWithErrorDisplay = tryWithErrorDisplay
    for kind in ("errorDisplay", "confirmOkCancelDisplay", "confirmYesNoDisplay", "showStatusMessage", "infoDisplay",
                 "warningDisplay"):
        setattr(slicer.util, kind, dialog(kind))
    slicer.util.pip_install = pip_install
    slicer.util._executePythonModule = _executePythonModule
    slicer.util.restart = lambda: app.dialogs.append(("restart", ""))
    return app

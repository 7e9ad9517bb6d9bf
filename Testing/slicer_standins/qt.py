"""Stand-in for PythonQt's ``qt`` module (one file of over 500 lines, as ``qt`` is one module in PythonQt): just
the classes the module file uses, behaving as PythonQt does where it matters for the module (MeVisLab/pythonqt
642c06b: src/PythonQtSignalReceiver.cpp, PythonQtSignalTarget::call; src/PythonQtInstanceWrapper.cpp, the
wrapper's dealloc) and with the members Slicer's and CTK's widgets expose
(Slicer/Slicer 583e9b3 Libs/MRML/Widgets: qMRMLNodeComboBox.h, qMRMLSortFilterProxyModel.h, qMRMLTableView.h,
qMRMLTableModel.h; commontk/CTK 868d56c Libs/Widgets):

- ``obj.connect("signal(args)", handler)`` and ``obj.signal.connect(handler)`` are the same signal; handlers run in
  connection order, synchronously, when the signal is emitted (a widget value set from code emits it too), and
  get only as many of the signal's arguments as they accept (PythonQt reads the function's argument count).
- Only slots, ``Q_INVOKABLE`` methods and properties of a C++ class are reachable from Python: e.g. the table
  view's ``tableModel()`` returns a model without ``mrmlTableRowIndex`` (a plain C++ method of qMRMLTableModel).
- A QObject made from Python without a parent belongs to Python: its wrapper's dealloc deletes it when the last
  Python reference goes, at once, even while one of its own signals is being dispatched (``deletedDuringSignal``
  records that; the real application would crash). ``QTimer.singleShot`` callbacks run from the event loop.
"""

import inspect
import queue
import subprocess
import threading
import typing
import weakref
import xml.etree.ElementTree as ET

# ------------------------------------------------------------------------------------------- event loop
_pending = []  # callables queued for the event loop (QTimer.singleShot, deleteLater)
deletedDuringSignal = []  # (class name, signal) of objects deleted while their signal was dispatching


class Qt:
    UserRole = 256
    Horizontal = 1
    Vertical = 2


class QCoreApplication:
    @staticmethod
    def processEvents(*args):
        while _pending:
            _pending.pop(0)()


class QTimer:
    @staticmethod
    def singleShot(msec, callback):
        _pending.append(callback)


# ------------------------------------------------------------------------------------------- signals
class Signal:
    """A signal of one object; holds the object weakly, as the C++ side holds no Python reference."""

    def __init__(self, owner, name):
        self._owner = weakref.ref(owner)
        self.name = name
        self.handlers = []

    def connect(self, handler):
        self.handlers.append(handler)
        return True

    def disconnect(self, handler=None):
        self.handlers = [] if handler is None else [h for h in self.handlers if h != handler]

    def emit(self, *args):
        owner = self._owner()
        ownerName = type(owner).__name__
        del owner  # dispatch holds no strong reference, as PythonQt's signal receiver
        for handler in list(self.handlers):
            handler(*args[: _acceptedArguments(handler, len(args))])
            if self._owner() is None:  # the object was deleted by a handler while its signal was dispatching
                deletedDuringSignal.append((ownerName, self.name))
                return


def _acceptedArguments(handler, available):
    """PythonQt passes a Python handler only as many signal arguments as it accepts (PythonQtSignalReceiver)."""
    try:
        parameters = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):
        return available
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return available
    return min(available, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters))


class QObject:
    SIGNALS = ()

    def __init__(self, parent=None):
        self._properties = {}
        self._signals = {name: Signal(self, name) for name in self.SIGNALS}
        self._children = []
        self.objectName = ""
        if parent is not None:
            parent._children.append(self)

    def __getattr__(self, name):
        signals = self.__dict__.get("_signals", {})
        if name in signals:
            return signals[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r} (not a slot, Q_INVOKABLE or property)")

    def connect(self, signature, handler):
        name = signature.split("(")[0]
        if name not in self._signals:
            raise ValueError(f"{type(self).__name__} has no signal {signature}")
        return self._signals[name].connect(handler)

    def disconnect(self, signature, handler=None):
        self._signals[signature.split("(")[0]].disconnect(handler)

    def property(self, name):
        return self._properties.get(name)

    def setProperty(self, name, value):
        self._properties[name] = value

    def findChildren(self, kind=None):
        found = []
        for child in self._children:
            if kind is None or isinstance(child, kind):
                found.append(child)
            found += child.findChildren(kind)
        return found

    def isWidgetType(self):
        return False

    def deleteLater(self):
        pass


class QWidget(QObject):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.enabled = True
        self.visible = True
        self.toolTip = ""
        self.text = ""

    def isWidgetType(self):
        return True

    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False

    def setToolTip(self, text):
        self.toolTip = text

    def setMRMLScene(self, scene):
        self.mrmlScene = scene
        if "mrmlSceneChanged" in self._signals:
            self.mrmlSceneChanged.emit(scene)  # the .ui's <connections> pass the scene on to the selectors


class QVBoxLayout:
    def __init__(self, parent=None):
        self.widgets = []

    def addWidget(self, widget):
        self.widgets.append(widget)


class _TextFirst(QWidget):
    """Widgets whose constructors also take their text first, ``QLabel(text, parent=None)``, ``QPushButton(text,
    parent=None)``, ``QCheckBox(text, parent=None)`` (Qt 5 qlabel.h, qpushbutton.h, qcheckbox.h)."""

    def __init__(self, textOrParent=None, parent=None):
        text = textOrParent if isinstance(textOrParent, str) else ""
        super().__init__(parent if isinstance(textOrParent, str) else textOrParent)
        self.text = text


class QLabel(_TextFirst):
    pass


class QPushButton(_TextFirst):
    SIGNALS = ("clicked",)

    def click(self):
        if self.enabled:
            self.clicked.emit(False)


class QLineEdit(QWidget):
    """``text`` property; ``textChanged(QString)`` is emitted whenever the text changes, from code too (Qt 5
    qlineedit.cpp: setText -> QWidgetLineControl::setText -> textChanged), ``textEdited`` only on typing."""

    SIGNALS = ("textChanged", "textEdited")

    def __init__(self, textOrParent=None, parent=None):
        self._text = ""  # before QWidget's constructor sets ``text``
        super().__init__(parent if isinstance(textOrParent, str) else textOrParent)
        self._text = textOrParent if isinstance(textOrParent, str) else ""

    @property
    def text(self):
        return self._text

    @text.setter
    def text(self, value):
        if str(value) != self._text:
            self._text = str(value)
            self.textChanged.emit(self._text)

    def type(self, value):
        """What typing does: the new text, ``textEdited`` then ``textChanged`` (test helper, not a Qt member)."""
        self._text = str(value)
        self.textEdited.emit(self._text)
        self.textChanged.emit(self._text)


class QFormLayout:
    """``QFormLayout(parentWidget)``; ``addRow(labelText, field)`` and ``addRow(widget)`` (Qt 5 qformlayout.h)."""

    def __init__(self, parent=None):
        self.rows = []
        if parent is not None:
            parent.formLayout = self

    def addRow(self, labelOrWidget, field=None):
        self.rows.append((labelOrWidget, field) if field is not None else (None, labelOrWidget))


class ctkCollapsibleButton(_TextFirst):
    """``collapsed`` property and ``contentsCollapsed(bool)`` (CTK Libs/Widgets/ctkCollapsibleButton.h)."""

    SIGNALS = ("contentsCollapsed",)

    def __init__(self, textOrParent=None, parent=None):
        super().__init__(textOrParent, parent)
        self._collapsed = False

    @property
    def collapsed(self):
        return self._collapsed

    @collapsed.setter
    def collapsed(self, value):
        if bool(value) != self._collapsed:
            self._collapsed = bool(value)
            self.contentsCollapsed.emit(self._collapsed)


class qMRMLWidget(QWidget):
    SIGNALS = ("mrmlSceneChanged",)


class QProgressBar(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.value = 0


class QCheckBox(_TextFirst):
    SIGNALS = ("toggled",)

    def __init__(self, textOrParent=None, parent=None):
        super().__init__(textOrParent, parent)
        self._checked = False

    @property
    def checked(self):
        return self._checked

    @checked.setter
    def checked(self, value):
        if bool(value) != self._checked:
            self._checked = bool(value)
            self.toggled.emit(self._checked)


class QComboBox(QWidget):
    SIGNALS = ("currentIndexChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.items = []
        self._currentIndex = -1

    def addItems(self, items):
        self.items += list(items)
        if self._currentIndex < 0 and self.items:
            self.currentIndex = 0

    @property
    def count(self):
        return len(self.items)

    @property
    def currentIndex(self):
        return self._currentIndex

    @currentIndex.setter
    def currentIndex(self, index):
        if index != self._currentIndex:
            self._currentIndex = index
            self.currentIndexChanged.emit(index)


class ctkSliderWidget(QWidget):
    SIGNALS = ("valueChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.minimum, self.maximum, self.singleStep, self._value = 0.0, 99.0, 1.0, 0.0

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value):
        value = min(max(float(value), self.minimum), self.maximum)
        if value != self._value:
            self._value = value
            self.valueChanged.emit(value)


class ctkPathLineEdit(QWidget):
    SIGNALS = ("currentPathChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._currentPath = ""

    @property
    def currentPath(self):
        return self._currentPath

    @currentPath.setter
    def currentPath(self, path):
        if path != self._currentPath:
            self._currentPath = path
            self.currentPathChanged.emit(path)


class QListWidgetItem:
    def __init__(self, text=""):
        self._text = text
        self._data = {}
        self.toolTip = ""
        self.selected = False

    def text(self):
        return self._text

    def setData(self, role, value):
        self._data[role] = value

    def data(self, role):
        return self._data.get(role)

    def setToolTip(self, text):
        self.toolTip = text

    def setSelected(self, selected):
        self.selected = selected


class QListWidget(QWidget):
    SIGNALS = ("itemSelectionChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.items = []

    def clear(self):
        self.items = []

    def addItem(self, item):
        self.items.append(item)

    @property
    def count(self):
        return len(self.items)

    def item(self, row):
        return self.items[row]

    def selectedItems(self):
        return [item for item in self.items if item.selected]

    def selectRow(self, row):
        for index, item in enumerate(self.items):
            item.selected = index == row
        self.itemSelectionChanged.emit()


class QTableWidgetItem:
    def __init__(self, text=""):
        self._text = text

    def text(self):
        return self._text


class QTableWidget(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.rows = []

    @property
    def rowCount(self):
        return len(self.rows)

    def setRowCount(self, count):
        self.rows = self.rows[:count] + [{} for _ in range(count - len(self.rows))]

    def insertRow(self, row):
        self.rows.insert(row, {})

    def setItem(self, row, column, item):
        self.rows[row][column] = item


class QModelIndex:
    def __init__(self, row, column=0):
        self._row, self._column = row, column

    def row(self):
        return self._row

    def column(self):
        return self._column


class QItemSelectionModel(QObject):
    def __init__(self):
        super().__init__()
        self.selected = []

    def selectedIndexes(self):
        return list(self.selected)


# ------------------------------------------------------------------------------------------- MRML widgets
class qMRMLSortFilterProxyModel(QObject):
    """Q_PROPERTY hiddenNodeIDs (Libs/MRML/Widgets/qMRMLSortFilterProxyModel.h)."""

    def __init__(self):
        super().__init__()
        self.hiddenNodeIDs = []


class qMRMLNodeComboBox(QWidget):
    SIGNALS = ("currentNodeChanged", "currentNodeIDChanged")

    def __init__(self, parent=None):
        super().__init__(parent)
        self.mrmlScene = None
        self.nodeTypes = []
        self._currentNode = None
        self._proxy = qMRMLSortFilterProxyModel()

    def sortFilterProxyModel(self):  # Q_INVOKABLE
        return self._proxy

    def setMRMLScene(self, scene):
        self.mrmlScene = scene

    def nodes(self):
        """The nodes the combo box offers: its types, minus the proxy's hidden IDs."""
        found = []
        for nodeType in self.nodeTypes:
            collection = self.mrmlScene.GetNodesByClass(nodeType)
            found += [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
        return [node for node in found if node.GetID() not in self._proxy.hiddenNodeIDs]

    def currentNode(self):
        return self._currentNode

    def setCurrentNode(self, node):
        if node is not self._currentNode:
            self._currentNode = node
            self.currentNodeChanged.emit(node)


class qMRMLTableModel(QObject):
    """Its ``mrmlTableRowIndex(QModelIndex)`` is a plain C++ method (Libs/MRML/Widgets/qMRMLTableModel.h): PythonQt
    does not expose it, so it is absent here."""


class QSortFilterProxyModel(QObject):
    """The table view's sorting proxy: ``mapToSource`` maps a view row to the table row."""

    def __init__(self):
        super().__init__()
        self.order = []  # view row -> source row

    def mapToSource(self, index):
        return QModelIndex(self.order[index.row()] if self.order else index.row(), index.column())


class qMRMLTableView(QWidget):
    SIGNALS = ("selectionChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._model = qMRMLTableModel()
        self._proxy = QSortFilterProxyModel()
        self._selection = QItemSelectionModel()
        self.tableNode = None

    def setMRMLTableNode(self, node):
        self.tableNode = node
        self._selection.selected = []
        self._proxy.order = list(range(node.GetNumberOfRows())) if node is not None else []

    def tableModel(self):  # Q_INVOKABLE
        return self._model

    def sortFilterProxyModel(self):  # Q_INVOKABLE
        return self._proxy

    def selectionModel(self):
        return self._selection

    def sortByColumn(self, column, descending=True):
        """What clicking a column header does: the view's rows are reordered, the table's are not."""
        values = [self.tableNode.GetCellText(row, column) for row in range(self.tableNode.GetNumberOfRows())]
        self._proxy.order = sorted(range(len(values)), key=lambda row: float(values[row]), reverse=descending)

    def clickCheckBox(self, viewRow, column):
        """What clicking a cell's checkbox does (Slicer/Slicer 583e9b3 Libs/MRML/Widgets/qMRMLTableModel.cxx,
        updateModelFromMRML / updateMRMLFromModel): only a ``vtkBitArray`` column's cells are checkable, and only
        while the table is not locked; a click flips the cell's bit in the table. Any other cell has no checkbox and
        the click changes nothing. Returns whether the bit changed."""
        row = self._proxy.mapToSource(QModelIndex(viewRow, column)).row()
        array = self.tableNode.GetTable().GetColumn(column)
        if not array.IsA("vtkBitArray") or self.tableNode.GetLocked():
            return False
        before = self.tableNode.GetTable().GetValue(row, column).ToInt()
        self.tableNode.GetTable().SetValue(row, column, 0 if before else 1)
        self.tableNode.GetTable().Modified()
        return self.tableNode.GetTable().GetValue(row, column).ToInt() != before

    def selectViewRow(self, viewRow):
        self._selection.selected = [QModelIndex(viewRow, 0)]
        self.selectionChanged.emit()


# ------------------------------------------------------------------------------------------- misc
class QSettings:
    store: typing.ClassVar[dict] = {}

    def value(self, key, default=None):
        return self.store.get(key, default)

    def setValue(self, key, value):
        self.store[key] = value


class QUrl:
    def __init__(self, text):
        self._text = text

    @staticmethod
    def fromLocalFile(path):
        return QUrl("file://" + path)

    def toString(self):
        return self._text


class QFileDialog:
    """``getOpenFileName(parent, caption, dir, filter)`` returns the chosen path, or an empty string when the user
    cancels (Qt 5 qfiledialog.cpp, QFileDialog::getOpenFileName: "If the user presses Cancel, it returns a null
    string"; PythonQt gives a QString as a Python str). The test sets ``nextOpenFileName``; ``asked`` records the
    captions and filters."""

    nextOpenFileName = ""
    asked: typing.ClassVar[list] = []

    @staticmethod
    def getOpenFileName(parent=None, caption="", directory="", filter=""):
        QFileDialog.asked.append((caption, filter))
        return QFileDialog.nextOpenFileName


class QIcon:
    def __init__(self, path=""):
        self.path = path


class QProcessEnvironment:
    def __init__(self):
        self.values = {}

    def insert(self, key, value):
        self.values[key] = value


class _Bytes:
    def __init__(self, data):
        self._data = data

    def data(self):
        return self._data


class QByteArray(_Bytes):
    """PythonQt builds a QByteArray from Python ``bytes`` (qt.QByteArray(b"...")); ``data()`` gives them back."""

    def __init__(self, data=b""):
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("QByteArray(bytes) expected")
        super().__init__(bytes(data))


class QProcess(QObject):
    """Runs the command for real (subprocess), as Qt 5's QProcess on Unix does (qtbase 5.15
    src/corelib/io/qprocess.cpp and qprocess_unix.cpp: ``start``, ``_q_startupNotification``, ``_q_processDied``,
    ``setErrorAndEmit``, ``cleanup``; as read for /work/shared/notes/slicer-real.md, "Failure paths", 2026-12-07),
    with the signals delivered by the event loop (processEvents()):

    - ``started()`` once the child runs; ``processId()`` is its pid until it has ended, 0 before a start and after
      the exit (``cleanup()`` runs before ``finished`` is emitted);
    - a program that cannot be executed: ``errorOccurred(FailedToStart)`` only, never ``started`` or ``finished``,
      ``processId()`` 0, ``errorString()`` saying why;
    - output streamed: ``readyReadStandardOutput/Error`` as chunks arrive, while the process runs;
    - a child killed by a signal: ``errorOccurred(Crashed)``, then ``finished(0, CrashExit)`` (the exit code of a
      signalled child is 0 in Qt 5);
    - the child stays in the caller's process group (QProcess does not call setsid).

    Made without a parent from Python, it is deleted with its last Python reference (see the module docstring)."""

    SIGNALS = ("readyReadStandardOutput", "readyReadStandardError", "finished", "errorOccurred", "started")
    FailedToStart, Crashed = 0, 1
    NormalExit, CrashExit = 0, 1
    live: typing.ClassVar[weakref.WeakSet] = weakref.WeakSet()
    _running: typing.ClassVar[list] = []  # the "C++ side": dicts without a strong reference to the wrapper

    def __init__(self, parent=None):
        super().__init__(parent)
        self._environment = None
        self._cwd = None
        self._out = {"stdout": b"", "stderr": b""}
        self._popen = None
        self._pid = 0
        self._errorString = "Unknown error"
        QProcess.live.add(self)

    def setProcessEnvironment(self, environment):
        self._environment = environment.values

    def setWorkingDirectory(self, cwd):
        self._cwd = cwd

    def start(self, program, arguments):
        # QProcess opens stdin as a pipe (ReadWrite by default): the child reads what write() sends until
        # closeWriteChannel() (Qt 5/6 QProcess::start, QIODevice::ReadWrite).
        entry = {"ref": weakref.ref(self), "chunks": queue.Queue(), "readers": [], "started": False}
        try:
            self._popen = subprocess.Popen([program, *arguments], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, env=self._environment, cwd=self._cwd)
        except OSError as error:
            self._popen = None
            self._errorString = f"Process failed to start: {error.strerror or error}"
            entry["failed"] = True
            QProcess._running.append(entry)
            return
        self._pid = self._popen.pid
        entry["popen"] = self._popen
        for kind, stream in (("stdout", self._popen.stdout), ("stderr", self._popen.stderr)):
            reader = threading.Thread(target=QProcess._readChunks, args=(stream, kind, entry["chunks"]), daemon=True)
            reader.start()
            entry["readers"].append(reader)
        QProcess._running.append(entry)

    @staticmethod
    def _readChunks(stream, kind, chunks):
        while True:
            data = stream.read1(65536)
            if not data:
                return
            chunks.put((kind, data))

    def write(self, data):
        """QIODevice::write(const QByteArray&): the stand-in accepts only a QByteArray, as the module passes one."""
        if not isinstance(data, QByteArray):
            raise TypeError("QProcess.write expects a QByteArray")
        if self._popen is None:
            return -1
        try:
            self._popen.stdin.write(data.data())
            self._popen.stdin.flush()
        except (BrokenPipeError, ValueError):
            return -1
        return len(data.data())

    def closeWriteChannel(self):
        if self._popen is None:
            return
        try:
            self._popen.stdin.close()
        except BrokenPipeError:
            pass

    def kill(self):
        """QProcess::kill (a slot): SIGKILL to the child itself, nothing when it does not run."""
        if self._popen is not None and self._pid and self._popen.poll() is None:
            self._popen.kill()

    def processId(self):
        return self._pid

    def errorString(self):
        return self._errorString

    def readAllStandardOutput(self):
        data, self._out["stdout"] = self._out["stdout"], b""
        return _Bytes(data)

    def readAllStandardError(self):
        data, self._out["stderr"] = self._out["stderr"], b""
        return _Bytes(data)

    @staticmethod
    def deliver():
        """Event-loop step: startup notification, output chunks, then exit (see the class docstring)."""
        for entry in list(QProcess._running):
            ref = entry["ref"]
            process = ref()
            if process is None:
                QProcess._running.remove(entry)
                continue
            signals = process._signals
            if entry.get("failed"):
                QProcess._running.remove(entry)
                del process
                signals["errorOccurred"].emit(QProcess.FailedToStart)
                continue
            del process
            if not entry["started"]:
                entry["started"] = True
                signals["started"].emit()
            ended = entry["popen"].poll() is not None and not any(r.is_alive() for r in entry["readers"])
            while ref() is not None:
                try:
                    kind, data = entry["chunks"].get_nowait()
                except queue.Empty:
                    break
                ref()._out[kind] += data
                signals["readyReadStandardOutput" if kind == "stdout" else "readyReadStandardError"].emit()
            if not ended or ref() is None:
                continue
            QProcess._running.remove(entry)
            ref()._pid = 0  # cleanup() before finished
            returncode = entry["popen"].returncode
            if returncode < 0:
                signals["errorOccurred"].emit(QProcess.Crashed)
                if ref() is not None:
                    signals["finished"].emit(0, QProcess.CrashExit)
            else:
                signals["finished"].emit(returncode, QProcess.NormalExit)


_originalProcessEvents = QCoreApplication.processEvents


def _processEvents(*args):
    QProcess.deliver()
    _originalProcessEvents()


QCoreApplication.processEvents = staticmethod(_processEvents)


# ------------------------------------------------------------------------------------------- .ui loading
WIDGET_CLASSES = {cls.__name__: cls for cls in (
    QWidget, QLabel, QPushButton, QLineEdit, ctkCollapsibleButton, qMRMLWidget, QProgressBar, QCheckBox, QComboBox,
    ctkSliderWidget, ctkPathLineEdit, QListWidget, QTableWidget, qMRMLNodeComboBox, qMRMLTableView)}


def _propertyValue(element):
    child = next(iter(element))
    if child.tag == "bool":
        return child.text == "true"
    if child.tag == "double":
        return float(child.text)
    if child.tag in ("number", "enum"):
        return int(child.text) if child.tag == "number" else child.text
    if child.tag == "stringlist":
        return [s.text for s in child.findall("string")]
    return child.text


def loadUI(path):
    """Build stand-in widgets from a Qt Designer file: one per <widget>, named, with its properties set (value
    properties of sliders after their range, as Qt's uic does)."""
    root = ET.parse(path).getroot()

    def build(element, parent):
        widget = WIDGET_CLASSES.get(element.get("class"), QWidget)(parent)
        widget.objectName = element.get("name")
        properties = {p.get("name"): _propertyValue(p) for p in element.findall("property")}
        for name in ("minimum", "maximum"):
            if name in properties:
                setattr(widget, name, properties.pop(name))
        for name, value in properties.items():
            if name == "SlicerParameterName":
                widget.setProperty(name, value)
            elif name == "checked":
                widget.checked = value
            elif name in ("value", "nodeTypes", "text", "singleStep"):
                setattr(widget, name, value)
            else:
                widget.setProperty(name, value)
        for child in element.iter("widget"):
            if child is not element and _parentWidget(element, child):
                build(child, widget)
        return widget

    def _parentWidget(parent, child):
        """True when ``parent`` is the closest <widget> ancestor of ``child``."""
        stack = [(parent, iter(parent))]
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                continue
            if nxt is child:
                return node is parent
            if nxt.tag != "widget":
                stack.append((node, iter(nxt)))
        return False

    top = build(root.find("widget"), None)
    byName = {w.objectName: w for w in [top, *top.findChildren(QObject)]}
    for connection in root.iter("connection"):
        sender, receiver = byName[connection.findtext("sender")], byName[connection.findtext("receiver")]
        sender.connect(connection.findtext("signal"), getattr(receiver, connection.findtext("slot").split("(")[0]))
    return top

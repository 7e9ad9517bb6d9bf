"""Cases from a manifest: the backend's own CSV (what ``anymc3d train MANIFEST`` reads) turned into rows of the
training case table, so that a researcher need not load every case into the scene by hand.

The CSV is read with the backend's column rules (:mod:`anymc3d.manifest_rules`, torch-free: ``anymc3d.data`` imports
torch, which never enters Slicer's process): an ``image`` column (paths relative to the CSV), label columns (0/1 per
finding, or ONE integer class column), optional ``mask``, ``split`` and ``id`` / ``case``. :func:`readManifest` checks
every row first (one line per problem, naming the CSV and the row's line); :class:`ManifestImport` then reads each good
case's image and mask with ``outputs.readVolumeFile`` in a thread, one case ahead, and adds it to the scene and the
table on the caller's (the GUI's) thread, so the event loop goes on between cases. A row that fails adds nothing.

Labels follow the table's settings: the CSV's label columns must be the table's findings, or its one class column
must hold class numbers the table names (class k is the k-th name). A table with no rows and no settings yet (the
default task and findings) takes them from the CSV as ``anymc3d train`` would: the label columns as findings, or,
for a multi-class CSV (one column holding a number above 1), classes named ``<column>_<k>``.
"""

import concurrent.futures
import csv
import dataclasses
import os
import time

from anymc3d import manifest_rules as rules
from anymc3d.safeio import link_problem

from . import outputs, trainingtable
from .trainingtable import CLASS_COLUMN, TrainingInputError

#: cases read ahead of the one being added (each holds its voxels until added)
READ_AHEAD = 2


@dataclasses.dataclass
class ManifestCase:
    """One good row: where it is (``line`` in the CSV), the case's name, its files, its table labels ({finding: 0/1}
    or {"Class": name}) and split ("auto" when not given)."""

    line: int
    name: str
    image: str
    mask: str
    labels: dict
    split: str


@dataclasses.dataclass
class ManifestPlan:
    """A checked manifest: the table's settings for it, its good cases, and one line per bad row."""

    path: str
    settings: trainingtable.TrainingSettings
    cases: list
    problems: list


def _fileProblem(path, message):
    return TrainingInputError([f"{path}: {message}"])


def _readRows(path):
    """The header and the (line, row) pairs, read with the backend's limits; TrainingInputError naming the CSV."""
    try:
        _, header, rows = rules.read_rows(path)
    except OSError as error:
        raise _fileProblem(path, f"cannot read the manifest ({error.strerror or error})") from None
    except (UnicodeDecodeError, ValueError, csv.Error) as error:  # csv.Error: a field over csv's size limit, a NUL
        raise _fileProblem(path, f"cannot read the manifest ({error})") from None
    images, _ = rules.view_columns(header)
    if images != ["image"]:
        raise _fileProblem(path, "needs one 'image' column (the case table holds one view per case)")
    if not rows:
        raise _fileProblem(path, "no data rows")
    labels = rules.label_candidates(header, images)
    if not labels:
        raise _fileProblem(path, "no label column (every column other than image, mask, split, id is a label)")
    return header, rows, labels


def _classCount(rows, column):
    values = [rules.parse_class((r.get(column) or "").strip()) for _, r in rows]
    return max((v for v in values if v is not None), default=0) + 1


def settingsFor(table, path, rows, labelColumns):
    """The table's settings for this CSV. A table with no rows and the default task and findings ("no settings
    yet") takes them from the CSV: the backend's task guess, the label columns as findings, or a class column's
    classes named ``<column>_<k>`` as ``anymc3d train`` names them. Otherwise the table's task and findings (class
    names) stay, and the CSV's label columns must fit them: TrainingInputError naming the CSV."""
    current = trainingtable.trainingSettings(table)
    default = trainingtable.TrainingSettings()
    unset = table.GetNumberOfRows() == 0 and (current.task, current.labels) == (default.task, default.labels)
    guessed = rules.guess_task([r.get(labelColumns[0]) or "" for _, r in rows], labelColumns)
    task = guessed if unset else current.task
    if task == "multilabel":
        if not unset and set(labelColumns) != set(current.labels):
            raise _fileProblem(path, f"label columns {labelColumns} are not the table's findings {list(current.labels)}")
        labels = tuple(labelColumns) if unset else current.labels
    else:
        if len(labelColumns) != 1:
            raise _fileProblem(path, f"a multi-class table needs ONE integer class column, got {labelColumns}")
        labels = current.labels if current.task == "multiclass" else tuple(
            rules.class_names(labelColumns[0], max(2, _classCount(rows, labelColumns[0]))))
    try:
        return dataclasses.replace(current, task=task, labels=tuple(labels)).validate()
    except ValueError as error:
        raise _fileProblem(path, str(error)) from None


def _cellPath(base, value, column, problems, where):
    """The file a cell names (relative to the CSV's folder), or None with the problem: missing, a broken link, a
    folder (a DICOM series is loaded through Slicer's DICOM module)."""
    given = value if os.path.isabs(value) else os.path.join(base, value)
    problem = link_problem(given)
    if problem is None and os.path.isdir(given):
        problem = "is a folder (load a DICOM series with the DICOM module, then Add loaded volumes)"
    if problem is not None:
        problems.append(f"{where}: {column} {given}: {problem}")
        return None
    return os.path.abspath(given)


def _rowLabels(r, settings, labelColumns, problems, where):
    """{finding: 0/1} or {"Class": class name} of one row (the backend's cell rules); None with the problems when a
    cell is not one, or names a class the table has no name for."""
    bad = []
    values = rules.row_target(r, labelColumns, settings.task, where, bad)
    if settings.task == "multiclass" and not bad and values[0] >= len(settings.labels):
        bad.append(f"{where}: class {labelColumns[0]} {values[0]} has no name in the table (its classes are 0.."
                   f"{len(settings.labels) - 1}: {', '.join(settings.labels)})")
    problems.extend(bad)
    if bad:
        return None
    if settings.task == "multiclass":
        return {CLASS_COLUMN: settings.labels[values[0]]}
    return {column: int(value) for column, value in zip(labelColumns, values)}


def _rowName(r, image):
    """The case's name: its ``id`` (or ``case``) cell, else the image file's stem."""
    from .logic import imageStem

    named = [str(v).strip() for k, v in r.items() if k is not None and k.lower() in ("id", "case") and str(v or "").strip()]
    return named[0] if named else imageStem(image)


def _row(path, line, r, settings, labelColumns, problems):
    """One row as a :class:`ManifestCase`, or None with its problems (every one, not only the first)."""
    where, before = f"{path} line {line}", len(problems)
    base = os.path.dirname(os.path.abspath(path))
    value = (r.get("image") or "").strip()
    if not value:
        problems.append(f"{where}: image is empty")
    image = _cellPath(base, value, "image", problems, where) if value else None
    maskValue = (r.get("mask") or "").strip()
    mask = _cellPath(base, maskValue, "mask", problems, where) if maskValue else ""
    labels = _rowLabels(r, settings, labelColumns, problems, where)
    split = rules.row_split(r, where, problems) if (r.get("split") or "").strip() else "auto"  # empty: auto
    if len(problems) > before:
        return None
    return ManifestCase(line, _rowName(r, image), image, mask, labels, split)


def readManifest(table, path):
    """Check the CSV at ``path`` against ``table``: a :class:`ManifestPlan` with the good cases and every bad row's
    problem (a case named twice, or already in the table, included). TrainingInputError (one line naming the CSV)
    when the file itself cannot be used: unreadable, over the limits, no image or label column, labels that do not
    fit the table."""
    path = os.path.abspath(str(path))
    _, rows, labelColumns = _readRows(path)
    settings = settingsFor(table, path, rows, labelColumns)
    problems, cases = [], []
    seen = {case.name: "the case table" for case in trainingtable.readCases(table)}
    for line, r in rows:
        case = _row(path, line, r, settings, labelColumns, problems)
        if case is None:
            continue
        if case.name in seen:
            problems.append(f"{path} line {line}: case {case.name!r} is already in {seen[case.name]}")
            continue
        seen[case.name] = f"line {line}"
        cases.append(case)
    return ManifestPlan(path, settings, cases, problems)


# ---------------------------------------------------------------------------------------------------------------
# Reading the cases off the event loop


def readCaseFiles(case):
    """The image's and the mask's :class:`outputs.VolumeData` (mask None): SimpleITK and numpy release the GIL, so this
    runs in a thread while the event loop goes on. ValueError names the file."""
    image = outputs.readVolumeFile(case.image, autoWindow=True)
    return image, (outputs.readVolumeFile(case.mask) if case.mask else None)


class ManifestImport:
    """Add a manifest's cases to the case table, one at a time: each case's files are read in a thread (one case
    ahead) and added on the caller's thread by :meth:`poll`, rescheduled through the Logic's ``schedule`` (the GUI's
    event loop) or driven by :meth:`wait`. ``onProgress(done, total, name)``; ``onFinished(self)`` with ``added``
    (table rows) and ``problems`` (one line each, the CSV's check's and the files'). :meth:`cancel` stops before the
    next case; the cases already added stay."""

    def __init__(self, logic, table, path, onProgress=None, onFinished=None):
        self.logic, self.table, self.path = logic, table, str(path)
        self.onProgress, self.onFinished = onProgress, onFinished
        self.plan, self.added, self.problems = None, [], []
        self.done = self.cancelled = False
        self._pool, self._reads, self._next, self.finished = None, [], 0, 0

    def start(self):
        """Check the CSV (TrainingInputError when the file itself cannot be used: nothing is changed), set the table's
        settings for it, and start reading the first cases."""
        self.plan = readManifest(self.table, self.path)
        self.problems = list(self.plan.problems)
        trainingtable.setTrainingSettings(self.table, self.plan.settings)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="AnyMC3D-manifest")
        self._fill()
        self._reschedule()
        return self

    def _fill(self):
        while len(self._reads) < READ_AHEAD and self._next < len(self.plan.cases):
            case = self.plan.cases[self._next]
            self._reads.append((case, self._pool.submit(readCaseFiles, case)))
            self._next += 1

    def _reschedule(self):
        if self.done:
            return
        if not self._reads:
            return self._finish()
        if self.logic.schedule is not None:
            self.logic.schedule(50, self.poll)
        return None

    def poll(self):
        """Add the next case if its files have been read (on the caller's thread); reschedule while cases remain. The
        table gone from the scene (the scene closed) ends the import as cancelled."""
        if self.done:
            return
        if self.table.GetScene() is None:
            return self.cancel()
        if self._reads and self._reads[0][1].done():
            case, future = self._reads.pop(0)
            self._add(case, future)
            self.finished += 1
            self._fill()
            if self.onProgress:
                self.onProgress(self.finished, len(self.plan.cases), case.name)
        self._reschedule()

    def _add(self, case, future):
        where = f"{self.plan.path} line {case.line}"
        try:
            image, mask = future.result()
            self.added.append(addCase(self.logic, self.table, case, image, mask))
        except (ValueError, OSError) as error:
            self.problems.append(f"{where}: {error}")

    def cancel(self):
        """Stop before the next case (the files being read are dropped); the cases added so far stay."""
        if not self.done:
            self.cancelled = True
            self._finish()

    def _finish(self):
        self.done = True
        for _, future in self._reads:
            future.cancel()
        self._reads = []
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        if self.onFinished:
            self.onFinished(self)

    def wait(self, timeout=None):
        """Poll until every case is in (scripts, tests, the self-test); False when ``timeout`` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if deadline is not None and time.monotonic() > deadline:
                return False
            self.poll()
            time.sleep(0.01)
        return True


def _maskNode(case, image, mask):
    """The mask as a labelmap volume node (not in the scene yet), checked against the image's grid."""
    import slicer

    imageNode = outputs.volumeNodeFromArray(image.voxels, image.ijkToRas, case.name)
    maskNode = outputs.volumeNodeFromArray(mask.voxels, mask.ijkToRas, f"{case.name} mask", slicer.vtkMRMLLabelMapVolumeNode())
    differs = trainingtable.maskGeometryProblem(imageNode, maskNode)
    if differs:
        raise ValueError(f"mask {case.mask} does not lie on the image's grid: {differs}")
    return maskNode


def addCase(logic, table, case, image, mask=None):
    """Add one case read by :func:`readCaseFiles`: its volume (named after the case), its mask as a labelmap on the
    volume's grid, and its table row; returns the row. All or nothing: on error the nodes added are removed."""
    scene = table.GetScene()
    maskNode = _maskNode(case, image, mask) if mask is not None else None
    volumeNode = None
    try:
        volumeNode = logic.loadInputFile(case.image, image)
        volumeNode.SetName(case.name)
        if maskNode is not None:
            scene.AddNode(maskNode)
            maskNode.CreateDefaultDisplayNodes()
        return trainingtable.addCase(table, volumeNode, case.labels, case.split, maskNode)
    except Exception:
        for node in (volumeNode, maskNode):
            if node is not None and node.GetScene() is not None:
                outputs.removeNode(scene, node)
        raise

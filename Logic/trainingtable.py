"""The training case table: the scene's volumes with their labels, optional segmentation and split, and the plugin's
settings, kept in one ``vtkMRMLTableNode`` (saved with the scene), checked, and written as the backend's manifest.

The table node holds:

- columns ``Case`` (the volume's name, shown); for a multi-label task ``Labelled`` and one column per finding, all
  bit columns (``vtkBitArray``: qMRMLTableView shows them as checkboxes), for a multi-class task one ``Class``
  column holding a class name or "" (text: qMRMLTableView has no choice editor); ``Segmentation`` (the mask's name,
  shown) and ``Split`` ("auto", "train", "val" or "test"). A bit cannot be empty, so a finding's unticked box means
  0 only once the row's ``Labelled`` box is ticked; a row without it is a case without a label, refused by
  :func:`checkedCases`;
- per row a node reference to its volume (role ``AnyMC3DTrainingVolume<row>``) and optionally its mask
  (``AnyMC3DTrainingMask<row>``: a labelmap volume on the volume's grid, or a segmentation node, exported onto the
  volume's grid): references, not node IDs in cells, so that a scene imported with renamed IDs still works;
- the settings (:class:`TrainingSettings`) as node attributes ``AnyMC3D.Training.<field>``.

:func:`checkedCases` finds every problem before anything runs (one line each, naming the case); ``auto`` splits are
drawn by :func:`resolveSplits` (stratified, fixed seed); :func:`writeManifest` writes the volumes (NRRD) and the
CSV that ``anymc3d.data.load_manifest`` reads (``id``, ``image``, label column(s), ``mask``, ``split``).
"""

import csv
import dataclasses
import io
import json
import os

import numpy as np
from anymc3d.manifest_rules import RESERVED

from . import outputs

TABLE_ROLE = "training cases"
CASE_COLUMN, CLASS_COLUMN, MASK_COLUMN, SPLIT_COLUMN = "Case", "Class", "Segmentation", "Split"
LABELLED_COLUMN = "Labelled"
SPLIT_CHOICES = ("auto", "train", "val", "test")
VOLUME_REFERENCE = "AnyMC3DTrainingVolume"
MASK_REFERENCE = "AnyMC3DTrainingMask"
SETTINGS_PREFIX = "AnyMC3D.Training."
TASKS = ("multilabel", "multiclass")
#: column names the backend's manifest reader does not take as labels (anymc3d.manifest_rules: its reserved columns
#: and the image column)
MANIFEST_RESERVED = ("image", *sorted(RESERVED))


class TrainingInputError(ValueError):
    """The table cannot be trained on; ``problems`` lists every problem, one line each naming its case."""

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


@dataclasses.dataclass
class TrainingSettings:
    """What the plugin is and how it is trained. ``labels``: the findings (multi-label) or the class names in class
    number order (multi-class)."""

    name: str = "finding"
    description: str = ""
    modality: str = ""
    bodyPart: str = ""
    backbone: str = ""
    task: str = "multilabel"
    labels: tuple = ("finding",)
    seed: int = 0
    valFraction: float = 0.25
    testFraction: float = 0.25
    epochs: int = 30
    device: str = "auto"
    workFolder: str = ""

    def validate(self):
        if self.task not in TASKS:
            raise ValueError(f"task: one of {TASKS}, got {self.task!r}")
        if not self.labels or len(set(self.labels)) != len(self.labels) or not all(str(x).strip() for x in self.labels):
            raise ValueError("findings: at least one, each named once")
        if self.task == "multiclass" and len(self.labels) < 2:
            raise ValueError("a multi-class task needs at least two classes")
        reserved = [label for label in self.labels if label in (CASE_COLUMN, CLASS_COLUMN, MASK_COLUMN, SPLIT_COLUMN, LABELLED_COLUMN)
                    or label.lower() in MANIFEST_RESERVED or label.lower().startswith(("image_", "mask_"))]
        if reserved:
            raise ValueError(f"findings may not be named {reserved}: the table or the manifest uses these names")
        if not outputs_safe(self.name):
            raise ValueError(f"plugin name {self.name!r}: needs a letter or digit")
        return self


def outputs_safe(name):
    """The plugin's file-safe name (the contract's rule), "" when nothing is left."""
    from anymc3d.contract import safe_name

    return safe_name(str(name))


@dataclasses.dataclass
class TrainingCase:
    """One row of the table as read: ``labels`` maps each finding to "1", "0" or "" (multi-label; "" for every finding
    of a row whose Labelled box is unticked) or ``Class`` to a class name or "" (multi-class)."""

    row: int
    name: str
    volumeNode: object
    maskNode: object
    labels: dict
    split: str


# ---------------------------------------------------------------------------------------------------------------
# The table node


def createTrainingTable(scene, settings=None, name="AnyMC3D training cases"):
    """A new, empty case table with ``settings`` (default :class:`TrainingSettings`)."""
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table.SetAttribute(outputs.ROLE_ATTRIBUTE, TABLE_ROLE)
    table.SetUseColumnTitleAsColumnHeader(True)
    setTrainingSettings(table, settings or TrainingSettings())
    return table


def isTrainingTable(node):
    return outputs.nodeRole(node) == TABLE_ROLE


def labelColumns(settings):
    return list(settings.labels) if settings.task == "multilabel" else [CLASS_COLUMN]


def _columnNames(table):
    return [table.GetColumnName(index) for index in range(table.GetNumberOfColumns())]


def _wantedColumns(settings):
    """[(name, is a bit column)] of a table with ``settings``."""
    bits = [LABELLED_COLUMN, *settings.labels] if settings.task == "multilabel" else []
    names = [CASE_COLUMN, *bits, *([] if bits else [CLASS_COLUMN]), MASK_COLUMN, SPLIT_COLUMN]
    return [(name, name in bits) for name in names]


def _isBitColumn(table, index):
    return table.GetTable().GetColumn(index).IsA("vtkBitArray") == 1 if 0 <= index < table.GetNumberOfColumns() else False


def setTrainingSettings(table, settings):
    """Store ``settings`` on the table; the label columns follow its task and findings (values kept by name)."""
    settings.validate()
    old = readCases(table) if table.GetNumberOfColumns() else []
    wanted = _wantedColumns(settings)
    if [(name, _isBitColumn(table, index)) for index, name in enumerate(_columnNames(table))] != wanted:
        import vtk

        table.RemoveAllColumns()
        for column, bit in wanted:
            table.AddColumn(vtk.vtkBitArray() if bit else None).SetName(column)
        for case in old:
            table.AddEmptyRow()
            _writeRow(table, case.row, case.name, {k: v for k, v in case.labels.items() if (k, True) in wanted
                                                   or (k, False) in wanted},
                      case.maskNode, case.split)
    for field in dataclasses.fields(TrainingSettings):
        table.SetAttribute(SETTINGS_PREFIX + field.name, json.dumps(getattr(settings, field.name)))
    return table


def trainingSettings(table):
    """The settings stored on the table (defaults for any missing)."""
    values = {}
    for field in dataclasses.fields(TrainingSettings):
        text = table.GetAttribute(SETTINGS_PREFIX + field.name)
        if text is not None:
            value = json.loads(text)
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return TrainingSettings(**values)


def _writeRow(table, row, name, labels, maskNode, split):
    table.SetCellText(row, 0, str(name))
    for column, value in labels.items():
        _setLabel(table, row, column, value)
    if LABELLED_COLUMN in _columnNames(table):
        settings = trainingSettings(table)
        labelled = all(labels.get(label, "") in ("0", "1") for label in settings.labels)
        table.SetCellText(row, _columnNames(table).index(LABELLED_COLUMN), "1" if labelled else "0")
    table.SetCellText(row, _columnNames(table).index(MASK_COLUMN), maskNode.GetName() if maskNode is not None else "")
    table.SetCellText(row, _columnNames(table).index(SPLIT_COLUMN), split)
    table.SetNodeReferenceID(f"{MASK_REFERENCE}{row}", maskNode.GetID() if maskNode is not None else None)


def addCase(table, volumeNode, labels=None, split="auto", maskNode=None):
    """Add a row for ``volumeNode``: ``labels`` {finding: 0/1} (multi-label; the row is Labelled when every finding
    is given) or {"Class": name} (multi-class)."""
    if split not in SPLIT_CHOICES:
        raise ValueError(f"split: one of {SPLIT_CHOICES}, got {split!r}")
    columns = labelColumns(trainingSettings(table))
    unknown = {str(k) for k in (labels or {})} - set(columns)
    if unknown:
        raise ValueError(f"{volumeNode.GetName()}: no finding column {sorted(unknown)} (the findings are {columns})")
    cells = {column: "" for column in columns}
    cells.update({str(k): _labelText(table, str(k), v) for k, v in (labels or {}).items()})
    row = table.AddEmptyRow()
    table.SetNodeReferenceID(f"{VOLUME_REFERENCE}{row}", volumeNode.GetID())
    _writeRow(table, row, volumeNode.GetName(), cells, maskNode, split)
    return row


def removeCase(table, row):
    """Remove one row; the later rows' volume and mask references move up with them (roles are per row)."""
    count = table.GetNumberOfRows()
    for later in range(int(row), count - 1):
        for role in (VOLUME_REFERENCE, MASK_REFERENCE):
            table.SetNodeReferenceID(f"{role}{later}", table.GetNodeReferenceID(f"{role}{later + 1}"))
    for role in (VOLUME_REFERENCE, MASK_REFERENCE):
        table.SetNodeReferenceID(f"{role}{count - 1}", None)
    table.RemoveRow(int(row))


def _labelText(table, column, value):
    """A label's cell text: a bit column takes 0/1 (bool, int, "0", "1") or "" (unlabelled), nothing else."""
    text = str(int(value)) if isinstance(value, (bool, int, np.integer)) else str(value).strip()
    if _isBitColumn(table, _columnNames(table).index(column)) and text not in ("0", "1", ""):
        raise ValueError(f"{column}: a checkbox holds 1 or 0 (or \"\" for not labelled), got {value!r}")
    return text


def _setLabel(table, row, column, value):
    """One finding's (or Labelled's, or Class's) cell; "" in a finding's bit column unticks the row's Labelled."""
    text = _labelText(table, column, value)
    index = _columnNames(table).index(column)
    if text == "" and _isBitColumn(table, index):
        table.SetCellText(int(row), _columnNames(table).index(LABELLED_COLUMN), "0")
        text = "0"
    table.SetCellText(int(row), index, text)


def setCell(table, row, column, value):
    """Set a label (a finding: 1/0, "" for not labelled; ``Labelled``: True/False; ``Class``: a class name), split or
    mask (``column`` MASK_COLUMN with a node or None) of one row. Setting a finding does not tick ``Labelled``: the
    row counts as labelled once that box is ticked, as in the table view."""
    if column in labelColumns(trainingSettings(table)) or column == LABELLED_COLUMN:
        return _setLabel(table, row, column, value)
    if column == MASK_COLUMN:
        table.SetNodeReferenceID(f"{MASK_REFERENCE}{row}", value.GetID() if value is not None else None)
        value = value.GetName() if value is not None else ""
    elif column == SPLIT_COLUMN and value not in SPLIT_CHOICES:
        raise ValueError(f"split: one of {SPLIT_CHOICES}, got {value!r}")
    table.SetCellText(int(row), _columnNames(table).index(column), str(value))


def candidateVolumes(scene):
    """The scene's image volumes a case can be made of: scalar volumes that are not label maps and not AnyMC3D
    outputs (heatmaps, their 3D-view copies)."""
    return [node for node in outputs.nodesByClass(scene, "vtkMRMLScalarVolumeNode")
            if not node.IsA("vtkMRMLLabelMapVolumeNode") and outputs.nodeRole(node) is None]


def fillFromScene(table, scene):
    """Add a row (labels empty, split "auto") for each candidate volume not in the table yet; returns the rows
    added."""
    listed = {case.volumeNode.GetID() for case in readCases(table) if case.volumeNode is not None}
    return [addCase(table, node) for node in candidateVolumes(scene) if node.GetID() not in listed]


def readCases(table):
    """Every row as a :class:`TrainingCase` (``volumeNode`` None when its volume left the scene)."""
    columns = _columnNames(table)
    settings = trainingSettings(table)
    cases = []
    for row in range(table.GetNumberOfRows()):
        cells = {column: table.GetCellText(row, index).strip() for index, column in enumerate(columns)}
        if cells.get(LABELLED_COLUMN, "1") != "1":  # the boxes of a row not labelled yet say nothing
            cells.update({label: "" for label in settings.labels})
        cases.append(TrainingCase(row, cells.get(CASE_COLUMN, ""), table.GetNodeReference(f"{VOLUME_REFERENCE}{row}"),
                                  table.GetNodeReference(f"{MASK_REFERENCE}{row}"),
                                  {column: cells.get(column, "") for column in labelColumns(settings)},
                                  cells.get(SPLIT_COLUMN, "") or "auto"))
    return cases


# ---------------------------------------------------------------------------------------------------------------
# Checks and splits


def _target(case, settings):
    """The case's target: a 0/1 tuple (multi-label) or a class number (multi-class); None with the problem."""
    if settings.task == "multiclass":
        value = case.labels[CLASS_COLUMN]
        if value in settings.labels:
            return settings.labels.index(value), None
        where = f"case {case.name!r} (row {case.row + 1})"
        return None, f"{where}: class {value!r} is not one of {list(settings.labels)}" if value else f"{where}: no class"
    missing = [label for label, value in case.labels.items() if value not in ("0", "1")]
    if missing:
        return None, (f"case {case.name!r} (row {case.row + 1}): no label for {', '.join(missing)} (tick its "
                      f"{LABELLED_COLUMN} box once its findings are set)")
    return tuple(int(case.labels[label]) for label in settings.labels), None


def maskGeometryProblem(volumeNode, maskNode):
    """None when a labelmap mask lies on the volume's voxel grid (the backend's tolerances: spacing 1e-4, origin
    1e-3, directions 1e-4, relative), else what differs. A segmentation node is exported onto the grid: None."""
    if maskNode.IsA("vtkMRMLSegmentationNode"):
        return None
    if maskNode.GetImageData() is None:
        return "the mask has no voxels"
    size, maskSize = volumeNode.GetImageData().GetDimensions(), maskNode.GetImageData().GetDimensions()
    if size != maskSize:
        return f"size {maskSize} != volume size {size}"
    a, b = (outputs.matrixToArray(outputs.ijkToRasMatrix(node)) for node in (volumeNode, maskNode))
    for name, x, y, tolerance in (("spacing and directions", a[:3, :3], b[:3, :3], 1e-4), ("origin", a[:3, 3], b[:3, 3], 1e-3)):
        if not np.allclose(x, y, atol=tolerance * max(1.0, float(np.abs(x).max()))):
            return f"{name} differ from the volume's"
    return None


def _caseProblems(case, settings):
    where = f"case {case.name!r} (row {case.row + 1})"
    problems = []
    if case.volumeNode is None or case.volumeNode.GetImageData() is None:
        problems.append(f"{where}: its volume is not in the scene")
    _, problem = _target(case, settings)
    if problem:
        problems.append(problem)
    if case.split not in SPLIT_CHOICES:
        problems.append(f"{where}: split {case.split!r} is not one of {', '.join(SPLIT_CHOICES)}")
    if case.maskNode is not None and case.volumeNode is not None and case.volumeNode.GetImageData() is not None:
        differs = maskGeometryProblem(case.volumeNode, case.maskNode)
        if differs:
            problems.append(f"{where}: segmentation {case.maskNode.GetName()!r} does not lie on the volume's grid: {differs}")
    return problems


def _classKey(target):
    return str(target) if isinstance(target, int) else "".join(str(v) for v in target)


def resolveSplits(cases, settings):
    """{row: split}: the given splits, and the ``auto`` rows drawn stratified (by label combination) with the seed,
    the backend's way (``anymc3d.data.assign_split``: test first, then validation from the rest). Raises
    TrainingInputError when too few cases of a class are left to draw from."""
    from sklearn.model_selection import train_test_split

    splits = {case.row: case.split for case in cases if case.split != "auto"}
    auto = [case for case in cases if case.split == "auto"]
    if not auto:
        return splits
    keys = [_classKey(_target(case, settings)[0]) for case in auto]
    index = np.arange(len(auto))
    try:
        rest, test = train_test_split(index, test_size=settings.testFraction, random_state=settings.seed, stratify=keys) \
            if settings.testFraction > 0 else (index, index[:0])
        train, val = train_test_split(rest, test_size=settings.valFraction, random_state=settings.seed,
                                      stratify=[keys[i] for i in rest])
    except ValueError as error:
        counts = {key: keys.count(key) for key in sorted(set(keys))}
        message = (f"too few cases to draw the 'auto' splits (cases per label combination {counts}; each needs "
                   f"about one per split): {error}")
        raise TrainingInputError([message]) from None
    for name, rows in (("train", train), ("val", val), ("test", test)):
        splits.update({auto[i].row: name for i in rows})
    return splits


def _splitProblems(cases, settings, splits):
    problems = []
    for split in ("train", "val", "test"):
        members = [case for case in cases if splits[case.row] == split]
        names = ", ".join(repr(case.name) for case in members[:8]) + (" ..." if len(members) > 8 else "")
        if not members:
            problems.append(f"split {split!r} has no cases (too few cases for a split)")
            continue
        targets = [_target(case, settings)[0] for case in members]
        if settings.task == "multiclass":
            absent = [settings.labels[k] for k in range(len(settings.labels)) if k not in targets]
            if absent:
                problems.append(f"split {split!r} ({names}): no case of class(es) {', '.join(absent)}")
            continue
        for k, label in enumerate(settings.labels):
            values = {target[k] for target in targets}
            if len(values) == 1:
                problems.append(f"split {split!r} ({names}): {label} is {values.pop()} in every case; it needs both classes")
    return problems


def checkedCases(table):
    """``(cases, splits)`` of a table fit to train on, else TrainingInputError listing every problem, each naming
    its case: no label, a volume gone, a mask off the volume's grid, one class only in a split, a split too small."""
    settings = trainingSettings(table).validate()
    cases = readCases(table)
    if not cases:
        raise TrainingInputError(["the case table is empty: add the loaded volumes first"])
    problems = [problem for case in cases for problem in _caseProblems(case, settings)]
    names = [case.name for case in cases]
    problems += [f"case {name!r}: listed {names.count(name)} times" for name in sorted(set(names)) if names.count(name) > 1]
    if problems:
        raise TrainingInputError(problems)
    splits = resolveSplits(cases, settings)
    problems = _splitProblems(cases, settings, splits)
    if problems:
        raise TrainingInputError(problems)
    return cases, splits


# ---------------------------------------------------------------------------------------------------------------
# The manifest


def manifestColumns(settings):
    """The manifest's header: ``id``, ``image``, the label column(s), ``mask``, ``split`` (docs/cli-contract.md).
    A multi-class task has ONE integer column, named after the plugin (the backend names its classes
    ``<column>_<k>``)."""
    labels = list(settings.labels) if settings.task == "multilabel" else [outputs_safe(settings.name)]
    return ["id", "image", *labels, "mask", "split"]


def writeMask(maskNode, volumeNode, path, writeVolume):
    """Write a case's mask on its volume's grid: a labelmap as it is, a segmentation exported onto the volume
    (Slicer's segmentations logic: the visible segments as one label map)."""
    if not maskNode.IsA("vtkMRMLSegmentationNode"):
        return writeVolume(maskNode, path)
    import slicer

    scene = volumeNode.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{maskNode.GetName()} mask")
    try:
        logic = slicer.vtkSlicerSegmentationsModuleLogic()
        logic.SetMRMLScene(scene)
        if not logic.ExportVisibleSegmentsToLabelmapNode(maskNode, labelmap, volumeNode):
            raise ValueError(f"cannot export segmentation {maskNode.GetName()!r} onto {volumeNode.GetName()!r}")
        return writeVolume(labelmap, path)
    finally:
        outputs.removeNode(scene, labelmap)


def writeManifest(table, folder, writeVolume, cases=None, splits=None):
    """Write the checked table into ``folder``: ``images/<case>.nrrd``, ``masks/<case>.nrrd`` and ``manifest.csv``
    (paths relative to it); returns the manifest's path. ``writeVolume(node, path)``: the Logic's NRRD writer (the
    volume's IJK-to-RAS kept exactly). The CSV is written last, under a temporary name then renamed."""
    settings = trainingSettings(table)
    if cases is None:
        cases, splits = checkedCases(table)
    for sub in ("images", "masks"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    stems, rows = set(), []
    for case in cases:
        stem = outputs_safe(case.name) or "case"
        stem = next(candidate for candidate in (stem if k == 0 else f"{stem}_{k + 1}" for k in range(len(cases) + 1))
                    if candidate not in stems)
        stems.add(stem)
        image = f"images/{stem}.nrrd"
        writeVolume(case.volumeNode, os.path.join(folder, image))
        mask = ""
        if case.maskNode is not None:
            mask = f"masks/{stem}.nrrd"
            writeMask(case.maskNode, case.volumeNode, os.path.join(folder, mask), writeVolume)
        target = _target(case, settings)[0]
        labels = dict(zip(settings.labels, target)) if settings.task == "multilabel" else {outputs_safe(settings.name): target}
        rows.append({"id": case.name, "image": image, **labels, "mask": mask, "split": splits[case.row]})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=manifestColumns(settings), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = os.path.join(folder, "manifest.csv")
    with open(path + ".partial", "w", encoding="utf-8", newline="") as file:
        file.write(buffer.getvalue())
    os.replace(path + ".partial", path)
    return path

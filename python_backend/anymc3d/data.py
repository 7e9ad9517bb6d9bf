"""The dataset manifest (the one reader every command uses), its up-front check, splits, and cases as model
slices.

A manifest is a CSV file (UTF-8, optional BOM). Columns:
  ``image`` (one view) or ``image_<view>`` (several views, in column order): image paths (a file or a DICOM
  series folder; one path per cell);
  label columns: 0/1 per finding (binary or multi-label), or ONE integer column 0..C-1 (multi-class);
  ``split`` (optional): train / val / test; otherwise a seeded stratified split is drawn;
  ``mask`` (optional, may be empty per row): a lesion mask on the first view's grid (auxiliary supervision);
  ``id`` / ``case`` (optional): ignored for labels.
Paths are relative to the manifest's folder. ``predict`` reads only the image columns; ``train``, ``eval`` and
``fit-lifted`` read and check every row and every image before any work, and raise one :class:`ManifestError`
listing all problems. Every message names a row by its line in the file (the header is line 1).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from anymc3d.errors import AnyMC3DError, InputError
from anymc3d.image_reading import absolute, link_problem, read_image
from anymc3d.manifest_rules import (  # noqa: F401 (SPLITS, RESERVED: used by callers as data.*)
    RESERVED, SPLITS, check_task, class_names, guess_task, label_candidates, read_rows, row_split, row_target,
    view_columns)
from anymc3d.preprocess_config import PreprocessConfig
from anymc3d.preprocessing import prepare

logger = logging.getLogger(__name__)

#: cases whose images together stay under this many voxels are kept in memory after the check
CACHE_VOXELS = 400 * 1024 ** 2


class ManifestError(AnyMC3DError):
    """A manifest with problems; ``problems`` lists them, one line each, naming the row's line."""

    def __init__(self, path: Path, problems: Sequence[str]):
        self.problems = list(problems)
        head = f"{path}: {len(self.problems)} problem(s) in the manifest"
        super().__init__(head + ":\n  " + "\n  ".join(self.problems))


@dataclass
class ManifestRow:
    """One manifest row: a case with one image per view, its target and optional mask."""

    row: int                      # 1-based data row: the case's stable key (seeds, splits, checkpoints)
    images: list[Path]
    target: np.ndarray            # (K,) float 0/1 (multilabel) or () int class (multiclass); (0,) unlabelled
    split: Optional[str] = None
    mask: Optional[Path] = None
    line: int = 0                 # the row's line in the file (the header is line 1): every message names it
    problems: list[str] = field(default_factory=list)   # kept only by ``load_manifest(strict=False)``


@dataclass
class Manifest:
    """A checked manifest."""

    path: Path
    views: list[str]
    labels: list[str]
    task: str
    cases: list[ManifestRow]
    sha256: str
    label_columns: list[str] = field(default_factory=list)
    images: dict = field(default_factory=dict, repr=False)   # cache: path -> sitk.Image

    def subset(self, split: str) -> list[ManifestRow]:
        return [c for c in self.cases if c.split == split]

    def targets(self, cases: Sequence[ManifestRow]) -> np.ndarray:
        return np.stack([c.target for c in cases])

    def image(self, path: Path) -> sitk.Image:
        image = self.images.get(path)
        return image if image is not None else read_image(path)

    def summary(self) -> dict:
        """Case counts per split and label (positives per finding, or per class), and the manifest hash."""
        out = {"manifest": str(self.path), "manifest_sha256": self.sha256, "task": self.task, "splits": {}}
        for split in SPLITS:
            cases = self.subset(split)
            if not cases:
                continue
            y = self.targets(cases)
            counts = ({label: int(y[:, k].sum()) for k, label in enumerate(self.labels)} if self.task == "multilabel"
                      else {label: int((y == k).sum()) for k, label in enumerate(self.labels)})
            out["splits"][split] = {"cases": len(cases), "positives" if self.task == "multilabel" else "per_class": counts,
                                    "with_mask": sum(c.mask is not None for c in cases)}
        return out


def _same_geometry(a: sitk.Image, b: sitk.Image) -> Optional[str]:
    """None when b lies on a's voxel grid, else what differs."""
    if a.GetSize() != b.GetSize():
        return f"size {b.GetSize()} != image size {a.GetSize()}"
    for name, x, y, tol in (("spacing", a.GetSpacing(), b.GetSpacing(), 1e-4), ("origin", a.GetOrigin(), b.GetOrigin(), 1e-3),
                            ("direction", a.GetDirection(), b.GetDirection(), 1e-4)):
        if not np.allclose(x, y, atol=tol * max(1.0, float(np.abs(x).max()))):
            return f"{name} {tuple(round(v, 4) for v in y)} != image {name} {tuple(round(v, 4) for v in x)}"
    return None


@dataclass
class _Columns:
    """What the header says: image columns (and view names), label columns, task, whether a split is given."""

    images: list[str]
    views: list[str]
    labels: list[str]
    task: str
    split: bool


def _read_rows(path: Path) -> tuple[bytes, list[str], list[tuple[int, dict]]]:
    """The file's bytes, its header and its data rows, each with the line it starts on (the header is line 1)."""
    try:
        return read_rows(path)
    except OSError as exc:
        raise InputError(path, f"cannot read the manifest ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, csv.Error, ValueError) as exc:
        raise InputError(path, f"cannot read the manifest ({exc})") from None


def _columns(path: Path, header: list[str], rows: list[tuple[int, dict]], labels: Optional[Sequence[str]],
             task: Optional[str], labelled: bool) -> _Columns:
    """Check the header (raising :class:`ManifestError`) and settle the label columns and the task."""
    image_cols, views = view_columns(header)
    if not image_cols:
        raise ManifestError(path, ["no 'image' (or 'image_<view>') column in the header"])
    if not rows:
        raise ManifestError(path, ["no data rows"])
    if not labelled:
        return _Columns(image_cols, views, [], "multilabel", False)
    label_cols = _label_columns(path, header, image_cols, labels)
    return _Columns(image_cols, views, label_cols, _task(path, rows, label_cols, task), "split" in header)


def _label_columns(path: Path, header: list[str], image_cols: list[str], labels: Optional[Sequence[str]]) -> list[str]:
    candidates = label_candidates(header, image_cols)
    label_cols = list(labels) if labels else candidates
    missing_cols = [c for c in label_cols if c not in header]
    if missing_cols:
        raise ManifestError(path, [f"label column(s) {missing_cols} not in the header {header}"])
    if not label_cols:
        raise ManifestError(path, ["no label column (every column other than image, mask, split, id is a label)"])
    return label_cols


def _task(path: Path, rows: list[tuple[int, dict]], label_cols: list[str], task: Optional[str]) -> str:
    if task is None:
        task = guess_task([r.get(label_cols[0]) or "" for _, r in rows] if len(label_cols) == 1 else [], label_cols)
    check_task(task)
    if task == "multiclass" and len(label_cols) != 1:
        raise ManifestError(path, [f"a multi-class task needs ONE integer label column, got {label_cols}"])
    return task


def _path(base: Path, value: str, where: str, column: str, problems: list[str]) -> Path:
    """The absolute path a cell names (relative to the manifest); a problem when it cannot be opened."""
    given = Path(value) if Path(value).is_absolute() else base / value
    problem = link_problem(given)
    if problem is not None:
        problems.append(f"{where}: {column} {given}: {problem}")
        return given
    return Path(absolute(given))


def _row_images(base: Path, r: dict, where: str, cols: _Columns, problems: list[str]) -> list[Path]:
    images = []
    for col in cols.images:
        value = (r.get(col) or "").strip()
        if not value:
            problems.append(f"{where}: column {col} is empty")
            continue
        images.append(_path(base, value, where, col, problems))
    return images


def _row_target(r: dict, where: str, cols: _Columns, problems: list[str]) -> np.ndarray:
    if not cols.labels:
        return np.zeros(0, dtype=np.float32)
    values = row_target(r, cols.labels, cols.task, where, problems)
    if cols.task == "multiclass":
        return np.asarray(values[0], dtype=np.int64)
    return np.asarray(values, dtype=np.float32)


def _row_split(r: dict, where: str, cols: _Columns, problems: list[str]) -> Optional[str]:
    return row_split(r, where, problems) if cols.split else None


def _row(base: Path, index: int, line: int, r: dict, cols: _Columns) -> ManifestRow:
    """One data row read and checked; its problems are kept on it."""
    where, problems = f"line {line}", []
    images = _row_images(base, r, where, cols, problems)
    target = _row_target(r, where, cols, problems)
    if not cols.labels:  # predict: the image columns only
        return ManifestRow(row=index, images=images, target=target, line=line, problems=problems)
    split = _row_split(r, where, cols, problems)
    mask_value = (r.get("mask") or "").strip()
    mask = _path(base, mask_value, where, "mask", problems) if mask_value else None
    return ManifestRow(row=index, images=images, target=target, split=split, mask=mask, line=line, problems=problems)


def load_manifest(path: Path | str, labels: Optional[Sequence[str]] = None, task: Optional[str] = None,
                  check_images: bool = True, cache: bool = True, labelled: bool = True,
                  strict: bool = True) -> Manifest:
    """Read and check a manifest; raise :class:`ManifestError` with every problem found.

    Args:
        labels: the label columns to use (default: every column that is not an image, mask, split or id).
        task: 'multilabel' or 'multiclass'; default: multiclass when there is one label column holding an
            integer above 1, else multilabel.
        check_images: read every image and mask (the only way to find truncated or corrupt files).
        cache: keep the images read by the check in memory when they are small enough.
        labelled: False reads the image columns only (``predict``): no labels, split or mask.
        strict: False keeps each bad row's problems on the row instead of raising (``predict`` goes on with
            the good rows); problems of the file or its header still raise.
    Raises:
        InputError: the file cannot be read as CSV. ManifestError: its problems, each naming its line.
    """
    path = Path(path)
    raw, header, rows = _read_rows(path)
    cols = _columns(path, header, rows, labels, task, labelled)
    cases = [_row(path.parent, index, line, r, cols) for index, (line, r) in enumerate(rows, start=1)]
    if cols.task == "multiclass":
        label_names = class_names(cols.labels[0], int(max(int(c.target) for c in cases)) + 1)
    else:
        label_names = list(cols.labels)
    manifest = Manifest(path=path, views=cols.views, labels=label_names, task=cols.task, cases=cases,
                        sha256=hashlib.sha256(raw).hexdigest(), label_columns=cols.labels)
    problems = [p for c in cases for p in c.problems]
    if not strict:
        return manifest
    if check_images and not problems:
        problems.extend(_check_images(manifest, cache))
    if not problems and cols.split:
        problems.extend(_check_splits(manifest))
    if problems:
        raise ManifestError(path, problems)
    return manifest


def _check_images(manifest: Manifest, cache: bool) -> list[str]:
    """Read every image and mask once: unreadable files and mask geometry are reported with row numbers."""
    problems, voxels = [], 0
    for case in manifest.cases:
        where = f"line {case.line}"
        first = None
        for k, p in enumerate(case.images):
            try:
                image = read_image(p)
            except InputError as exc:
                problems.append(f"{where}: {exc}")
                continue
            first = image if k == 0 else first
            voxels += int(np.prod(image.GetSize()))
            if cache and voxels <= CACHE_VOXELS:
                manifest.images[p] = image
        if case.mask is not None:
            try:
                mask = read_image(case.mask)
            except InputError as exc:
                problems.append(f"{where}: mask {exc}")
                continue
            if first is not None:
                differs = _same_geometry(first, mask)
                if differs:
                    problems.append(f"{where}: mask {case.mask} does not lie on the image grid: {differs}")
            if cache and voxels <= CACHE_VOXELS:
                manifest.images[case.mask] = mask
    return problems


def _class_key(manifest: Manifest, target: np.ndarray) -> str:
    return str(int(target)) if manifest.task == "multiclass" else "".join(str(int(v)) for v in target)


def _check_splits(manifest: Manifest) -> list[str]:
    """Training and validation must hold both classes of every finding (every class, multi-class)."""
    problems = []
    for split in ("train", "val"):
        cases = manifest.subset(split)
        if not cases:
            if split == "train":
                problems.append("split 'train' has no cases")
            continue  # no val rows: --folds draws them; a single run says so when it starts
        y = manifest.targets(cases)
        lines = ", ".join(str(c.line) for c in cases[:10]) + (" ..." if len(cases) > 10 else "")
        if manifest.task == "multilabel":
            for k, label in enumerate(manifest.labels):
                if y[:, k].min() == y[:, k].max():
                    problems.append(f"split {split!r} (lines {lines}): label {label} is {int(y[0, k])} in every case; "
                                    "it needs positives and negatives")
        else:
            absent = [label for k, label in enumerate(manifest.labels) if not (y == k).any()]
            if absent:
                problems.append(f"split {split!r} (lines {lines}): no case of class(es) {absent}")
    return problems


def assign_split(manifest: Manifest, val_fraction: float = 0.25, test_fraction: float = 0.0, seed: int = 0) -> None:
    """Draw a seeded stratified split where the manifest has no ``split`` column; check it like a given one."""
    from sklearn.model_selection import train_test_split

    if any(c.split is not None for c in manifest.cases):
        return
    index = np.arange(len(manifest.cases))
    keys = [_class_key(manifest, c.target) for c in manifest.cases]
    try:
        rest, test = (train_test_split(index, test_size=test_fraction, random_state=seed, stratify=keys)
                      if test_fraction > 0 else (index, index[:0]))
        train, val = train_test_split(rest, test_size=val_fraction, random_state=seed, stratify=[keys[i] for i in rest])
    except ValueError as exc:
        raise ManifestError(manifest.path, [f"cannot draw a stratified split ({exc}); add a 'split' column"]) from None
    for name, idx in (("train", train), ("val", val), ("test", test)):
        for i in idx:
            manifest.cases[i].split = name
    problems = _check_splits(manifest)
    if problems:
        raise ManifestError(manifest.path, problems)


def fold_splits(manifest: Manifest, folds: int, seed: int = 0) -> list[dict[int, str]]:
    """K stratified folds over the non-test cases: fold k validates on its part and trains on the rest.

    Returns one {row: split} per fold (test rows stay test)."""
    from sklearn.model_selection import StratifiedKFold

    pool = [c for c in manifest.cases if c.split != "test"]
    keys = [_class_key(manifest, c.target) for c in pool]
    try:
        folds_iter = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(pool)), keys))
    except ValueError as exc:
        raise ManifestError(manifest.path, [f"cannot draw {folds} stratified folds ({exc})"]) from None
    out = []
    for _, val_idx in folds_iter:
        assignment = {c.row: "test" for c in manifest.cases if c.split == "test"}
        val_rows = {pool[i].row for i in val_idx}
        assignment.update({c.row: ("val" if c.row in val_rows else "train") for c in pool})
        out.append(assignment)
    return out


def with_splits(manifest: Manifest, assignment: dict[int, str]) -> Manifest:
    """A copy of the manifest with the splits of ``assignment`` (shares the image cache), checked."""
    cases = [dataclasses.replace(c, split=assignment[c.row]) for c in manifest.cases]
    copy = dataclasses.replace(manifest, cases=cases)
    problems = _check_splits(copy)
    if problems:
        raise ManifestError(manifest.path, problems)
    return copy


@dataclass
class PreparedCase:
    """A case as model input: per view (S, M, M) slices in [0, 1]; the first view's mask in slice space."""

    views: list[torch.Tensor]
    mask: Optional[torch.Tensor]
    target: torch.Tensor


def prepare_case(manifest: Manifest, case: ManifestRow, recipes: Sequence[PreprocessConfig]) -> PreparedCase:
    """Read (or take from the cache) and slice every view of ``case``; the mask follows the first view."""
    views = []
    for p, recipe in zip(case.images, recipes):
        slices, _ = prepare(manifest.image(p), recipe, source=p)
        views.append(slices)
    mask = None
    if case.mask is not None:
        recipe = dataclasses.replace(recipes[0], intensity="none")
        m, _ = prepare(manifest.image(case.mask), recipe, source=case.mask)
        mask = (m > 0.5).float()
    return PreparedCase(views=views, mask=mask, target=torch.from_numpy(np.asarray(case.target)))

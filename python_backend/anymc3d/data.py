"""Training data: the dataset manifest, its up-front check, splits, and cases as model slices.

A manifest is a CSV file. Columns:
  ``image`` (one view) or ``image_<view>`` (several views, in column order): image paths;
  label columns: 0/1 per finding (binary or multi-label), or ONE integer column 0..C-1 (multi-class);
  ``split`` (optional): train / val / test; otherwise a seeded stratified split is drawn;
  ``mask`` (optional, may be empty per row): a lesion mask on the first view's grid (auxiliary supervision);
  ``id`` / ``case`` (optional): ignored for labels.
Paths are relative to the manifest's folder. :func:`load_manifest` reads and checks every row and every
image before training, and raises one :class:`ManifestError` listing all problems with their row numbers.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from anymc3d.errors import AnyMC3DError, InputError
from anymc3d.image_reading import read_image
from anymc3d.preprocess_config import PreprocessConfig
from anymc3d.preprocessing import prepare

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test"}
RESERVED = {"split", "mask", "id", "case"}
#: cases whose images together stay under this many voxels are kept in memory after the check
CACHE_VOXELS = 400 * 1024 ** 2


class ManifestError(AnyMC3DError):
    """A manifest with problems; ``problems`` lists them, one line each, with row numbers."""

    def __init__(self, path: Path, problems: Sequence[str]):
        self.problems = list(problems)
        head = f"{path}: {len(self.problems)} problem(s) in the manifest"
        super().__init__(head + ":\n  " + "\n  ".join(self.problems))


@dataclass
class Case:
    """One manifest row: a case with one image per view, its target and optional mask."""

    row: int                      # 1-based data row (the header is line 1, so row r is line r + 1)
    images: list[Path]
    target: np.ndarray            # (K,) float 0/1 (multilabel) or () int class (multiclass)
    split: Optional[str] = None
    mask: Optional[Path] = None


@dataclass
class Manifest:
    """A checked manifest."""

    path: Path
    views: list[str]
    labels: list[str]
    task: str
    cases: list[Case]
    sha256: str
    label_columns: list[str] = field(default_factory=list)
    images: dict = field(default_factory=dict, repr=False)   # cache: path -> sitk.Image

    def subset(self, split: str) -> list[Case]:
        return [c for c in self.cases if c.split == split]

    def targets(self, cases: Sequence[Case]) -> np.ndarray:
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


def _view_columns(header: Sequence[str]) -> tuple[list[str], list[str]]:
    if "image" in header:
        return ["image"], ["image"]
    cols = [h for h in header if h.startswith("image_") and len(h) > len("image_")]
    return cols, [c.removeprefix("image_") for c in cols]


def _parse_binary(value: str) -> Optional[float]:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number in (0.0, 1.0) else None


def _parse_class(value: str) -> Optional[int]:
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if math.isfinite(number) and number == int(number) and number >= 0 else None


def _same_geometry(a: sitk.Image, b: sitk.Image) -> Optional[str]:
    """None when b lies on a's voxel grid, else what differs."""
    if a.GetSize() != b.GetSize():
        return f"size {b.GetSize()} != image size {a.GetSize()}"
    for name, x, y, tol in (("spacing", a.GetSpacing(), b.GetSpacing(), 1e-4), ("origin", a.GetOrigin(), b.GetOrigin(), 1e-3),
                            ("direction", a.GetDirection(), b.GetDirection(), 1e-4)):
        if not np.allclose(x, y, atol=tol * max(1.0, float(np.abs(x).max()))):
            return f"{name} {tuple(round(v, 4) for v in y)} != image {name} {tuple(round(v, 4) for v in x)}"
    return None


def load_manifest(path: Path | str, labels: Optional[Sequence[str]] = None, task: Optional[str] = None,
                  check_images: bool = True, cache: bool = True) -> Manifest:
    """Read and check a manifest; raise :class:`ManifestError` with every problem found.

    Args:
        labels: the label columns to use (default: every column that is not an image, mask, split or id).
        task: 'multilabel' or 'multiclass'; default: multiclass when there is one label column holding an
            integer above 1, else multilabel.
        check_images: read every image and mask (the only way to find truncated or corrupt files).
        cache: keep the images read by the check in memory when they are small enough.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(path, f"cannot read the manifest ({exc.strerror or exc})") from None
    rows = list(csv.DictReader(raw.decode("utf-8-sig").splitlines()))
    header = list(rows[0].keys()) if rows else next(csv.reader(raw.decode("utf-8-sig").splitlines()), [])
    problems: list[str] = []
    image_cols, views = _view_columns(header)
    if not image_cols:
        raise ManifestError(path, ["no 'image' (or 'image_<view>') column in the header"])
    if not rows:
        raise ManifestError(path, ["no data rows"])
    candidates = [h for h in header if h not in image_cols and h.lower() not in RESERVED and not h.startswith("mask_")]
    label_cols = list(labels) if labels else candidates
    missing_cols = [c for c in label_cols if c not in header]
    if missing_cols:
        raise ManifestError(path, [f"label column(s) {missing_cols} not in the header {header}"])
    if not label_cols:
        raise ManifestError(path, ["no label column (every column other than image, mask, split, id is a label)"])
    if task is None:
        values = [_parse_class(r.get(label_cols[0]) or "") for r in rows] if len(label_cols) == 1 else []
        task = "multiclass" if values and max((v or 0) for v in values) > 1 else "multilabel"
    if task not in ("multilabel", "multiclass"):
        raise ValueError(f"task: must be 'multilabel' or 'multiclass', got {task!r}")
    if task == "multiclass" and len(label_cols) != 1:
        raise ManifestError(path, [f"a multi-class task needs ONE integer label column, got {label_cols}"])
    base = path.parent
    cases: list[Case] = []
    for index, r in enumerate(rows, start=1):
        where = f"row {index} (line {index + 1})"
        row_problems = []
        images = []
        for col in image_cols:
            value = (r.get(col) or "").strip()
            if not value:
                row_problems.append(f"{where}: column {col} is empty")
                continue
            p = (base / value).resolve() if not Path(value).is_absolute() else Path(value)
            if not p.exists():
                row_problems.append(f"{where}: {col} file not found: {p}")
            images.append(p)
        if task == "multilabel":
            target = []
            for col in label_cols:
                v = _parse_binary((r.get(col) or "").strip())
                if v is None:
                    row_problems.append(f"{where}: label {col} must be 0 or 1, got {r.get(col)!r}")
                target.append(v or 0.0)
            target = np.asarray(target, dtype=np.float32)
        else:
            v = _parse_class((r.get(label_cols[0]) or "").strip())
            if v is None:
                row_problems.append(f"{where}: label {label_cols[0]} must be a class number 0, 1, 2, ..., "
                                    f"got {r.get(label_cols[0])!r}")
            target = np.asarray(v or 0, dtype=np.int64)
        split = None
        if "split" in header:
            s = (r.get("split") or "").strip().lower()
            split = _SPLIT_ALIASES.get(s)
            if split is None:
                row_problems.append(f"{where}: split must be train, val or test, got {r.get('split')!r}")
        mask = None
        mask_value = (r.get("mask") or "").strip()
        if mask_value:
            mask = (base / mask_value).resolve() if not Path(mask_value).is_absolute() else Path(mask_value)
            if not mask.exists():
                row_problems.append(f"{where}: mask file not found: {mask}")
        problems.extend(row_problems)
        cases.append(Case(row=index, images=images, target=target, split=split, mask=mask))
    if task == "multiclass":
        n_classes = int(max(int(c.target) for c in cases)) + 1
        label_names = [f"{label_cols[0]}_{k}" for k in range(n_classes)]
    else:
        label_names = list(label_cols)
    manifest = Manifest(path=path, views=views, labels=label_names, task=task, cases=cases,
                        sha256=hashlib.sha256(raw).hexdigest(), label_columns=label_cols)
    if check_images and not problems:
        problems.extend(_check_images(manifest, cache))
    if not problems and "split" in header:
        problems.extend(_check_splits(manifest))
    if problems:
        raise ManifestError(path, problems)
    return manifest


def _check_images(manifest: Manifest, cache: bool) -> list[str]:
    """Read every image and mask once: unreadable files and mask geometry are reported with row numbers."""
    problems, voxels = [], 0
    for case in manifest.cases:
        where = f"row {case.row} (line {case.row + 1})"
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
        rows = ", ".join(str(c.row) for c in cases[:10]) + (" ..." if len(cases) > 10 else "")
        if manifest.task == "multilabel":
            for k, label in enumerate(manifest.labels):
                if y[:, k].min() == y[:, k].max():
                    problems.append(f"split {split!r} (rows {rows}): label {label} is {int(y[0, k])} in every case; "
                                    "it needs positives and negatives")
        else:
            absent = [label for k, label in enumerate(manifest.labels) if not (y == k).any()]
            if absent:
                problems.append(f"split {split!r} (rows {rows}): no case of class(es) {absent}")
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


def prepare_case(manifest: Manifest, case: Case, recipes: Sequence[PreprocessConfig]) -> PreparedCase:
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

"""The manifest's column rules, written once: which columns hold images, labels, the split and the mask, how a label
cell is read (0/1 per finding, or one class number), which task a manifest is, how its classes are named, and the
limits the CSV is read with.

Standard library only (and the torch-free :mod:`anymc3d.safeio` / :mod:`anymc3d.contract`): ``anymc3d.data`` reads
manifests with these rules for ``train`` / ``eval`` / ``predict``, and the Slicer module's Logic reads the same CSV in
Slicer's process, where torch is never imported.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence

from anymc3d.contract import TASKS
from anymc3d.safeio import read_limited

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
#: columns (lower-cased) that are never labels, besides the image columns and ``mask_*``
RESERVED = {"split", "mask", "id", "case"}
#: the largest manifest read (a CSV of a million cases stays far below it)
MAX_MANIFEST_BYTES = 64 * 1024 ** 2
#: the most data rows read
MAX_MANIFEST_ROWS = 1_000_000


def view_columns(header: Sequence[str]) -> tuple[list[str], list[str]]:
    """(image columns, view names): ``image`` alone, else every ``image_<view>`` column in column order."""
    if "image" in header:
        return ["image"], ["image"]
    cols = [h for h in header if h.startswith("image_") and len(h) > len("image_")]
    return cols, [c.removeprefix("image_") for c in cols]


def label_candidates(header: Sequence[str], image_cols: Sequence[str]) -> list[str]:
    """The columns taken as labels when none are named: every column not an image, reserved or ``mask_*``."""
    return [h for h in header if h not in image_cols and h.lower() not in RESERVED and not h.startswith("mask_")]


def parse_binary(value: str) -> float | None:
    """0.0 or 1.0 from a label cell ("1", "0", "1.0"), else None."""
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number in (0.0, 1.0) else None


def parse_class(value: str) -> int | None:
    """A class number 0, 1, 2, ... from a label cell ("2", "2.0"), else None."""
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if math.isfinite(number) and number == int(number) and number >= 0 else None


def parse_split(value: str | None) -> str | None:
    """train / val / test from a split cell (case-insensitive aliases such as "Validation"), else None."""
    return SPLIT_ALIASES.get((value or "").strip().lower())


def row_target(r: dict, label_cols: Sequence[str], task: str, where: str, problems: list[str]) -> list:
    """A row's label values: [class number] (multi-class) or one 0.0/1.0 per label column (multi-label). A bad cell
    adds its problem (``where``: the row's place, e.g. "line 3") and counts as 0."""
    if task == "multiclass":
        cell = r.get(label_cols[0])
        number = parse_class((cell or "").strip())
        if number is None:
            problems.append(f"{where}: label {label_cols[0]} must be a class number 0, 1, 2, ..., got {cell!r}")
        return [number or 0]
    values = []
    for col in label_cols:
        number = parse_binary((r.get(col) or "").strip())
        if number is None:
            problems.append(f"{where}: label {col} must be 0 or 1, got {r.get(col)!r}")
        values.append(number or 0.0)
    return values


def row_split(r: dict, where: str, problems: list[str]) -> str | None:
    """A row's split (train / val / test, aliases allowed); None with the problem when its cell is not one."""
    split = parse_split(r.get("split"))
    if split is None:
        problems.append(f"{where}: split must be train, val or test, got {r.get('split')!r}")
    return split


def guess_task(class_cells: Sequence[str], label_cols: Sequence[str]) -> str:
    """The task of a manifest whose task is not given: multi-class when it has ONE label column holding an integer
    above 1 (``class_cells``: that column's cells), else multi-label."""
    values = [parse_class(cell or "") for cell in class_cells] if len(label_cols) == 1 else []
    return "multiclass" if values and max((v or 0) for v in values) > 1 else "multilabel"


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task: must be one of {TASKS}, got {task!r}")
    return task


def class_names(column: str, count: int) -> list[str]:
    """The names of a multi-class manifest's classes: ``<column>_<k>`` for k = 0 .. count-1."""
    return [f"{column}_{k}" for k in range(count)]


def read_rows(path, max_bytes: int = MAX_MANIFEST_BYTES,
              max_rows: int = MAX_MANIFEST_ROWS) -> tuple[bytes, list[str], list[tuple[int, dict]]]:
    """The file's bytes, its header and its data rows, each with the line it starts on (the header is line 1).

    UTF-8 with an optional BOM; at most ``max_bytes`` bytes and ``max_rows`` rows (csv's own field size limit,
    128 KiB, bounds a cell). Raises OSError, UnicodeDecodeError, csv.Error, or ValueError for a file over a limit."""
    raw = read_limited(path, max_bytes)
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8-sig"), newline=""))
    header = list(reader.fieldnames or [])
    rows = []
    for r in reader:
        if len(rows) >= max_rows:
            raise ValueError(f"more than {max_rows} rows")
        inner = sum(v.count("\n") for v in r.values() if isinstance(v, str))  # quoted line breaks
        rows.append((reader.line_num - inner, r))
    return raw, header, rows

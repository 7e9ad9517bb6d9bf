"""The cases of a run: command-line inputs (files, folders, DICOM series, multi-view ``a+b``, manifest CSVs)
expanded into cases, each either views to read or a one-line reason why it cannot be read.

Expansion never raises for a bad path: an empty folder, a symbolic-link loop, a dangling link inside a
folder, an unreadable manifest all become cases carrying an error, so the run writes an error record
naming the path and goes on with the others. A folder holding several DICOM series gives one case per
series (never merged, never one dropped). The local CLI and the Ray job expand inputs with this module, so
both see the same cases with the same heatmap stems.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import SimpleITK as sitk

from anymc3d.contract import IMAGE_SUFFIXES, image_stem
from anymc3d.errors import InputError
from anymc3d.image_reading import dicom_series_ids, link_problem, read_image, scan_folder

#: the column of a manifest CSV that names the image (the training manifest's format)
MANIFEST_COLUMN = "image"
MANIFEST_SUFFIX = ".csv"


@dataclass
class Case:
    """One case of a run.

    Attributes:
        image: the record's ``image``: absolute view paths joined with ``+``.
        views: the view paths to read, in the plugin's view order.
        stem: file stem of this case's heatmaps, unique within the run.
        series: the DICOM series instance UID, when the (single) view is a folder holding several series.
        error: why the case cannot be read (one line naming the path); None for a readable case.
    """

    image: str
    views: list[Path]
    stem: str = ""
    series: Optional[str] = None
    error: Optional[str] = None

    @property
    def key(self) -> str:
        """Identifies the case across runs (``--resume``): the image, and the series when there is one."""
        return self.image if self.series is None else f"{self.image}#{self.series}"


def absolute(path: os.PathLike | str) -> str:
    """The absolute, symlink-resolved path; the plain absolute path where resolving fails (a loop)."""
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):  # Python < 3.13 raises RuntimeError on a symlink loop
        return os.path.abspath(path)


def _error(path: os.PathLike | str, problem: str) -> Case:
    """A case that cannot be read; its image is the path as given (made absolute, links not followed)."""
    return Case(image=os.path.abspath(path), views=[Path(path)], error=str(InputError(path, problem)))


def _folder_cases(folder: Path) -> list[Case]:
    """A DICOM series folder: one case per series; any other folder: every image (and broken link) in it."""
    series = dicom_series_ids(folder)
    if series:
        if len(series) == 1:
            return [Case(image=absolute(folder), views=[folder])]
        return [Case(image=absolute(folder), views=[folder], series=uid) for uid in series]
    images, problems = scan_folder(folder)
    if not images and not problems:
        return [_error(folder, f"folder holds no images ({', '.join(IMAGE_SUFFIXES)} files or DICOM series)")]
    entries = sorted([(path, None) for path in images] + problems, key=lambda entry: entry[0])
    cases = []
    for path, problem in entries:
        if problem is not None:
            cases.append(_error(path, problem))
        else:
            cases.extend(_folder_cases(path) if path.is_dir() else [Case(image=absolute(path), views=[path])])
    return cases


def read_manifest(path: os.PathLike | str) -> list[str]:
    """The ``image`` column of a manifest CSV, each path relative to the CSV's folder (``+`` joins views)."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or MANIFEST_COLUMN not in reader.fieldnames:
                raise InputError(path, f"manifest has no '{MANIFEST_COLUMN}' column (columns: {reader.fieldnames})")
            rows = [row[MANIFEST_COLUMN] for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(path, f"manifest could not be read ({error})") from None
    items = []
    for number, value in enumerate(rows, start=2):
        if not value or not value.strip():
            raise InputError(path, f"line {number}: empty '{MANIFEST_COLUMN}'")
        items.append("+".join(str(path.parent / v.strip()) for v in value.split("+")))
    return items


def _item_cases(item: str) -> list[Case]:
    views = [Path(p) for p in item.split("+")]
    for view in views:
        problem = link_problem(view)
        if problem is not None:
            return [_error(view, problem)]
    if len(views) == 1 and views[0].is_file() and views[0].name.lower().endswith(MANIFEST_SUFFIX):
        try:
            items = read_manifest(views[0])
        except InputError as error:
            return [Case(image=os.path.abspath(views[0]), views=views, error=str(error))]
        return [case for sub in items for case in _item_cases(sub)]
    if len(views) == 1 and views[0].is_dir():
        return _folder_cases(views[0])
    return [Case(image="+".join(absolute(v) for v in views), views=views)]


def _assign_stems(cases: list[Case]) -> None:
    """Heatmap stems: the first view's stem (plus ``_s<k>`` per DICOM series), numbered when repeated."""
    used: set[str] = set()
    order: dict[str, list[str]] = {}
    for case in cases:
        if case.series is not None:
            order.setdefault(case.image, []).append(case.series)
    for case in cases:
        base = image_stem(case.views[0])
        if case.series is not None:
            base += f"_s{order[case.image].index(case.series) + 1}"
        stem, n = base, 1
        while stem in used:
            n += 1
            stem = f"{base}_{n}"
        used.add(stem)
        case.stem = stem


def expand_inputs(items: Sequence[str]) -> list[Case]:
    """The cases of a run, in input order (a folder's images sorted by path). Never raises for a bad path."""
    cases = [case for item in items for case in _item_cases(item)]
    _assign_stems(cases)
    return cases


def read_case(case: Case) -> list[sitk.Image]:
    """Read and check a case's images (one per view). Raises InputError naming the path."""
    if case.error is not None:
        raise InputError(None, case.error)
    return [read_image(view, series=case.series) for view in case.views]

"""The cases of a run: command-line inputs (files, folders, DICOM series, multi-view ``a+b``, manifest CSVs read
by :func:`anymc3d.data.load_manifest`) expanded into cases, each either views to read or a one-line reason why
it cannot be read.

Expansion never raises for a bad path: an empty folder, a symbolic-link loop, a dangling link inside a
folder, an unreadable manifest all become cases carrying an error, so the run writes an error record
naming the path and goes on with the others. A folder holding several DICOM series gives one case per
series (never merged, never one dropped). The local CLI and the Ray job expand inputs with this module, so
both see the same cases with the same heatmap stems.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import SimpleITK as sitk

from anymc3d.contract import IMAGE_SUFFIXES, image_stem
from anymc3d.data import load_manifest
from anymc3d.errors import AnyMC3DError, InputError, one_line
from anymc3d.image_reading import absolute, dicom_series_ids, link_problem, read_image, scan_folder

MANIFEST_SUFFIX = ".csv"


@dataclass
class InputCase:
    """One case of a run, as the command line gives it (files, folders, DICOM series, manifest rows).

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


def _error(path: os.PathLike | str, problem: str) -> InputCase:
    """A case that cannot be read; its image is the path as given (made absolute, links not followed)."""
    return InputCase(image=os.path.abspath(path), views=[Path(path)], error=str(InputError(path, problem)))


def _folder_cases(folder: Path) -> list[InputCase]:
    """A DICOM series folder: one case per series; any other folder: every image (and broken link) in it."""
    series = dicom_series_ids(folder)
    if series:
        if len(series) == 1:
            return [InputCase(image=absolute(folder), views=[folder])]
        return [InputCase(image=absolute(folder), views=[folder], series=uid) for uid in series]
    images, problems = scan_folder(folder)
    if not images and not problems:
        return [_error(folder, f"folder holds no images ({', '.join(IMAGE_SUFFIXES)} files or DICOM series)")]
    entries = sorted([(path, None) for path in images] + problems, key=lambda entry: entry[0])
    cases = []
    for path, problem in entries:
        if problem is not None:
            cases.append(_error(path, problem))
        else:
            cases.extend(_folder_cases(path) if path.is_dir() else [InputCase(image=absolute(path), views=[path])])
    return cases


def _manifest_cases(path: Path) -> list[InputCase]:
    """The cases a manifest CSV lists (its image columns; the manifest's one format and row numbering): a row that
    cannot be used is an error case naming the manifest and the row's line, the others go on."""
    try:
        manifest = load_manifest(path, check_images=False, labelled=False, strict=False)
    except AnyMC3DError as error:
        return [InputCase(image=os.path.abspath(path), views=[path], error=one_line(error))]
    cases = []
    for row in manifest.cases:
        if row.problems:
            cases.append(InputCase(image="+".join(str(v) for v in row.images) or os.path.abspath(path),
                              views=row.images or [path], error=str(InputError(path, "; ".join(row.problems)))))
        else:
            cases.extend(_view_cases(row.images, manifests=False))  # a row names images, never a manifest
    return cases


def _item_cases(item: str) -> list[InputCase]:
    return _view_cases([Path(p) for p in item.split("+")])


def _view_cases(views: list[Path], manifests: bool = True) -> list[InputCase]:
    for view in views:
        problem = link_problem(view)
        if problem is not None:
            return [_error(view, problem)]
    if manifests and len(views) == 1 and views[0].is_file() and views[0].name.lower().endswith(MANIFEST_SUFFIX):
        return _manifest_cases(views[0])
    if len(views) == 1 and views[0].is_dir():
        return _folder_cases(views[0])
    return [InputCase(image="+".join(absolute(v) for v in views), views=views)]


def _assign_stems(cases: list[InputCase]) -> None:
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


def expand_inputs(items: Sequence[str]) -> list[InputCase]:
    """The cases of a run, in input order (a folder's images sorted by path). Never raises for a bad path."""
    cases = [case for item in items for case in _item_cases(item)]
    _assign_stems(cases)
    return cases


def read_case(case: InputCase) -> list[sitk.Image]:
    """Read and check a case's images (one per view). Raises InputError naming the path."""
    if case.error is not None:
        raise InputError(None, case.error)
    return [read_image(view, series=case.series) for view in case.views]

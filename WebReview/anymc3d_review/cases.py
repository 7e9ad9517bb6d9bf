"""The cases of a review folder and where their results are (docs/review.md).

The cases are what ``anymc3d predict FOLDER`` would run: the backend's own expansion (``anymc3d.cases``): image files
directly in FOLDER (``*.nii``, ``*.nii.gz``, ``*.nrrd``, ``*.nhdr``, ``*.mha``, ``*.mhd``), sub-folders holding a
DICOM series (one case per series), and broken links (listed with their one-line error). A link inside the folder to
a file in it is listed once; a link out of it is not a case. A file whose header cannot be read is listed with its
error. Its results are the record of ``anymc3d predict --json`` output found in ``FOLDER/results/*.json`` whose
``"image"`` (and ``"series"``, for a folder of several series) is that case; when several files hold a record for
the same case, the newest file wins. Results files that cannot be read, records that are not records, and records of
images that are not cases of the folder are listed as problems (never dropped without a word). Running a case from the page writes ``FOLDER/results/<stem>.json`` and the heatmaps into
``FOLDER/results/heatmaps/``.

Security: the page refers to a case by its index in this listing only. Every path read from a results file (the
image and the heatmaps) must resolve inside FOLDER, or the record is refused; nothing else is ever opened.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from anymc3d.contract import RecordError as ContractError
from anymc3d.contract import image_stem, is_temporary, validate_record
from anymc3d.safeio import read_json

RESULTS_DIR = "results"
HEATMAPS_DIR = "heatmaps"
MAX_RESULTS_FILE_BYTES = 64 * 1024 * 1024
#: the last ``_``-separated word of an image stem that makes it a label map or a heatmap of a case, not a case
DERIVED_WORDS = ("mask", "masks", "seg", "segmentation", "label", "labels", "labelmap", "lesion", "heatmap", "attention")


def is_derived_name(name: str) -> bool:
    """True for a file named as a heatmap or a label map of a case: the backend's heatmap names
    (``<stem>__<plugin>[__<label>]``) or a stem whose last ``_`` word is one of DERIVED_WORDS."""
    stem = image_stem(name)
    return "__" in stem or ("_" in stem and stem.rsplit("_", 1)[-1].lower() in DERIVED_WORDS)


class RecordError(ValueError):
    """A results record that cannot be shown (refused path, bad JSON, failed case)."""


@dataclasses.dataclass
class Case:
    index: int
    path: Path            # resolved, inside the folder
    name: str             # file name, as listed on the page
    stem: str
    record: dict | None = None   # the backend's record, when results exist
    results_file: Path | None = None
    error: str = ""       # why the results cannot be shown, or the backend's error for the case
    series: str | None = None    # DICOM series instance UID, for a folder holding several series
    unreadable: str = ""  # why the image itself cannot be read (header checked when listed), "" when it can

    @property
    def is_dicom(self) -> bool:
        return self.path.is_dir()

    @property
    def status(self) -> str:
        if self.record is not None and self.record.get("status") == "ok" and not self.error:
            return "results"
        if self.error or self.unreadable or self.record is not None:
            return "error"
        return "none"


class CaseFolder:
    def __init__(self, folder: os.PathLike | str):
        self.root = Path(folder).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"Not a folder: {folder}")
        self.results_dir = self.root / RESULTS_DIR
        self.heatmap_dir = self.results_dir / HEATMAPS_DIR
        self.cases: list[Case] = []
        self.problems: list[str] = []  # results files that were ignored, and why (shown on the page)
        self.refresh()

    # Listing -----------------------------------------------------------------------------------------------

    def refresh(self) -> list[Case]:
        self.problems = []  # results files and records that were ignored, and why (shown on the page)
        self.cases = [Case(i, path, name, stem, series=series, unreadable=unreadable)
                      for i, (path, name, stem, series, unreadable) in enumerate(self._expand())]
        by_key = {(case.path, case.series): case for case in self.cases}
        series_of = {}
        for case in self.cases:
            series_of.setdefault(case.path, []).append(case.series)
        for results_file in self._results_files():
            try:
                records = self._read_json(results_file)
            except RecordError as error:
                self.problems.append(str(error))  # a broken file says nothing about which case it belongs to
                continue
            for number, record in enumerate(records):
                image = record.get("image") if isinstance(record, dict) else None
                if not isinstance(image, str) or not os.path.isabs(image):
                    self.problems.append(f"{results_file.name}: record {number} is not a result record "
                                         "(no absolute 'image')")
                    continue
                path = Path(image).resolve()
                series = record.get("series") if len(series_of.get(path, ())) > 1 else None
                case = by_key.get((path, series))
                if case is None:
                    self.problems.append(f"{results_file.name}: results for {image}"
                                         + (f" (series {record.get('series')})" if record.get("series") else "")
                                         + ", which is not a case of this folder")
                    continue
                self._attach(case, record, results_file)
        return self.cases

    def derived_files(self) -> set[Path]:
        """Heatmaps the records of ``results/*.json`` name (resolved): outputs of a case, never a case."""
        found = set()
        for results_file in self._results_files():
            try:
                records = self._read_json(results_file)
            except RecordError:
                continue
            for record in records:
                for result in (record.get("results") or []) if isinstance(record, dict) else []:
                    if not isinstance(result, dict):
                        continue
                    maps = [result.get("heatmap"), *(result.get("finding_heatmaps") or {}).values()] \
                        if isinstance(result.get("finding_heatmaps") or {}, dict) else [result.get("heatmap")]
                    found.update(Path(p).resolve() for p in maps if isinstance(p, str) and os.path.isabs(p))
        return found

    def _expand(self) -> list[tuple]:
        """(path, name, stem, series, unreadable) of each case, from the backend's expansion of FOLDER."""
        from anymc3d.cases import expand_inputs  # the backend's rule (torch is imported with it)
        from anymc3d.errors import InputError
        from anymc3d.image_reading import check_image_header

        found, seen, derived, skipped = [], set(), self.derived_files(), []
        for case in expand_inputs([str(self.root)]):
            if case.error is not None and Path(case.image) == self.root:
                self.problems.append(f"{self.root.name}: no images ({case.error.split(': ', 1)[-1]})")
                continue
            path = Path(case.image) if case.error is not None else Path(case.image).resolve()
            if not self.contains(path) or (path, case.series) in seen or path == self.results_dir or \
                    self.results_dir in path.parents:
                continue  # a link out of the folder; a second link to the same image; the results themselves
            seen.add((path, case.series))
            if case.series is None and (path in derived or is_derived_name(path.name)):
                skipped.append(path.name)
                continue
            name = path.name if case.series is None else f"{path.name} [{case.stem}]"
            unreadable = case.error or ""
            if not unreadable:
                try:
                    check_image_header(path, series=case.series)
                except InputError as error:
                    unreadable = str(error)
            found.append((path, name, case.stem, case.series, unreadable))
        if skipped:
            shown = ", ".join(sorted(skipped)[:4]) + (f" and {len(skipped) - 4} more" if len(skipped) > 4 else "")
            self.problems.append(f"{len(skipped)} heatmap or mask file{'s' if len(skipped) > 1 else ''} ({shown}): "
                                 "not cases")
        return found

    def _results_files(self) -> list[Path]:
        if not self.results_dir.is_dir():
            return []
        files = [p for p in self.results_dir.glob("*.json")
                 if p.is_file() and not is_temporary(p.name) and self.contains(p.resolve())]
        return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))  # oldest first: the newest record wins

    @staticmethod
    def _read_json(path: Path) -> list:
        try:  # size and nesting limited (anymc3d.safeio): a hostile file is one line here, never a RecursionError
            data = read_json(path, MAX_RESULTS_FILE_BYTES)
        except ValueError as error:
            raise RecordError(f"Cannot read {str(error).replace(str(path), path.name, 1)}") from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise RecordError(f"{path.name} does not hold a list of records")
        return data

    def _attach(self, case: Case, record: dict, results_file: Path) -> None:
        case.record, case.results_file, case.error = record, results_file, ""
        try:  # the backend's own schema and rules: NaN or out-of-range probabilities, decisions that do not follow
            validate_record(record)
        except ContractError as error:
            case.error = f"{results_file.name}: not a valid result record ({error})"
            return
        if record.get("status") != "ok":
            case.error = str(record.get("error") or "The case failed")
            return
        try:
            self.check_record_paths(record)
        except RecordError as error:
            case.error = str(error)

    def results_on_disk(self, case: Case) -> bool:
        """Whether any results file (read now, not at listing time) has a record for ``case``."""
        for results_file in self._results_files():
            try:
                records = self._read_json(results_file)
            except RecordError:
                continue
            if any(isinstance(r, dict) and isinstance(r.get("image"), str) and os.path.isabs(r["image"])
                   and Path(r["image"]).resolve() == case.path and r.get("series") in (None, case.series)
                   for r in records):
                return True
        return False

    def case(self, index) -> Case:
        """The case at ``index`` of the listing; anything else (a name, a path, out of range) is refused."""
        if isinstance(index, bool) or not isinstance(index, int):
            raise RecordError(f"A case is chosen by its index, not {type(index).__name__}")
        if not 0 <= index < len(self.cases):
            raise RecordError(f"No case {index}")
        return self.cases[index]

    def index_of(self, name: str) -> int:
        """Index of the case listed under ``name`` (a file name of the listing, nothing else)."""
        for case in self.cases:
            if case.name == name:
                return case.index
        raise RecordError(f"No case named {name!r}")

    # Paths -------------------------------------------------------------------------------------------------

    def contains(self, path: Path) -> bool:
        path = Path(path).resolve()
        return path == self.root or self.root in path.parents

    def check_record_paths(self, record: dict) -> None:
        """Every file the record names must resolve inside the folder and exist."""
        image = record.get("image")
        paths = [image] if isinstance(image, str) else []
        for result in record.get("results") or []:
            if not isinstance(result, dict):
                raise RecordError("Malformed results record")
            if result.get("heatmap"):
                paths.append(result["heatmap"])
            paths += list((result.get("finding_heatmaps") or {}).values())
        for path in paths:
            if isinstance(path, str) and os.path.isdir(path) and path == image:
                continue  # a DICOM series folder: a case of the listing, checked there
            if not isinstance(path, str) or not os.path.isabs(path):
                raise RecordError(f"The results name a file by a relative or invalid path: {path!r}")
            if not self.contains(Path(path)):
                raise RecordError(f"The results name a file outside the review folder: {path}")
            if not Path(path).is_file():
                raise RecordError(f"A results file is missing (moved folder? run the case again): {path}")

    def results_paths(self, case: Case) -> tuple[Path, Path]:
        """Where a run from the page writes: ``results/<stem>.json`` and ``results/heatmaps/``."""
        return self.results_dir / f"{case.stem}.json", self.heatmap_dir

"""Result records and heatmap files: the one way every runner writes its outputs.

The CLI, evaluation and the distributed (Ray) job build each case's record with :func:`result_record` or
:func:`error_record`, write heatmaps with :func:`write_heatmaps` (names from ``contract.heatmap_name``) and
write records with :func:`write_records` / :func:`write_record`. Every record is checked with
``contract.validate_record`` before it is written, and every file is written under a temporary name and
renamed (``fileio``), so a reader never sees a half-written or off-contract output.

Formats: a ``.jsonl`` path gets JSON Lines (one record per line, for large runs); any other path a JSON list
(docs/cli-contract.md).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

from anymc3d.cases import Case, read_case
from anymc3d.contract import STATUS_ERROR, STATUS_OK, RecordError, heatmap_name, validate_record, validate_records
from anymc3d.engine import CaseResult, Engine, ensemble
from anymc3d.errors import AnyMC3DError, one_line
from anymc3d.fileio import write_text_atomic
from anymc3d.modality import add_record_warnings
from anymc3d.preprocessing import write_image_atomic

logger = logging.getLogger(__name__)

#: progress(stage, done, total), as the engine reports it
Progress = Callable[[str, int, int], None]
JSONL_SUFFIX = ".jsonl"


def error_message(image: str, error: BaseException) -> str:
    """Our own errors already name the path; anything else gets the image and the error's type."""
    if isinstance(error, AnyMC3DError):
        return one_line(str(error))
    return one_line(f"{image}: {type(error).__name__}: {error}")


def error_record(image: str, message: str, series: Optional[str] = None) -> dict:
    """The record of a case that could not be predicted."""
    record = {"image": image, "status": STATUS_ERROR, "error": one_line(message), "slicing_axis": None,
              "num_slices": None, "results": []}
    if series is not None:
        record["series"] = series
    return validate_record(record)


def result_record(result: CaseResult, image: str, heatmaps: Optional[dict] = None, embedding: bool = False,
                  series: Optional[str] = None) -> dict:
    """The record of a predicted case (docs/cli-contract.md).

    Args:
        result: the engine's predictions for the case.
        image: the record's ``image`` (absolute view paths joined with ``+``).
        heatmaps: ``{plugin: {label or None: path}}`` as :func:`write_heatmaps` returns it.
        embedding: add each result's case embedding v.
        series: the DICOM series UID when the input folder held several series.
    """
    heatmaps = heatmaps or {}
    geometry = result.predictions[0].geometry
    record = {"image": image, "status": STATUS_OK, "error": None, "slicing_axis": geometry.slice_axis,
              "num_slices": geometry.num_input_slices, "results": []}
    if series is not None:
        record["series"] = series
    for pred in result.predictions:
        labels, files = pred.labels, heatmaps.get(pred.plugin, {})
        record["results"].append({
            "plugin": pred.plugin,
            "plugin_path": pred.plugin_paths[0] if len(pred.plugin_paths) == 1 else list(pred.plugin_paths),
            "kind": pred.kind, "task": pred.task, "labels": list(labels),
            "probabilities": dict(zip(labels, map(float, pred.probabilities))),
            "probabilities_raw": dict(zip(labels, map(float, pred.probabilities_raw))),
            "thresholds": dict(zip(labels, map(float, pred.thresholds))),
            "decisions": dict(zip(labels, map(bool, pred.decisions))),
            "slicing_axis": pred.geometry.slice_axis,
            "slice_importance": [float(x) for x in pred.importance_per_input_slice()],
            "heatmap_method": pred.heatmap_method if files else None,
            "heatmap": files.get(None),
            "finding_heatmaps": {k: v for k, v in files.items() if k is not None},
            **({"embedding": [float(x) for x in pred.embedding]} if embedding else {}),
        })
    return validate_record(record)


def write_heatmaps(result: CaseResult, folder: os.PathLike | str, stem: str, fmt: str,
                   progress: Optional[Progress] = None) -> dict:
    """Write each prediction's heatmap(s) into ``folder``; returns ``{plugin: {label or None: abs path}}``.

    Per-finding maps (gradient methods) get one file per label; the case's map (``None``) is then the file of
    the most probable finding. On any failure the files this case wrote are removed and the error re-raised.
    """
    folder = Path(folder)
    written: dict[str, dict] = {}
    done: list[Path] = []
    total = sum(len(p.finding_heatmaps) or int(p.heatmap is not None) for p in result.predictions)
    progress = progress or (lambda stage, k, n: None)
    try:
        for pred in result.predictions:
            files: dict = {}
            for label in pred.finding_heatmaps:
                progress("heatmap", len(done), total)
                path = write_image_atomic(pred.heatmap_image(label), folder / heatmap_name(stem, pred.plugin, label, fmt))
                done.append(path)
                files[label] = str(path.resolve())
            if pred.heatmap is not None:
                top = max(pred.finding_heatmaps, key=lambda k: pred.probabilities[pred.labels.index(k)], default=None)
                if top is not None:
                    files[None] = files[top]
                else:
                    progress("heatmap", len(done), total)
                    path = write_image_atomic(pred.heatmap_image(), folder / heatmap_name(stem, pred.plugin, None, fmt))
                    done.append(path)
                    files[None] = str(path.resolve())
            written[pred.plugin] = files
    except BaseException:
        for path in done:
            path.unlink(missing_ok=True)
        raise
    return written


@dataclass
class PluginUnit:
    """One ``--plugin`` argument as attached to an engine: a plugin, or a ``--folds`` ensemble folder whose
    members are attached one by one and averaged into one prediction (``name``) for every case."""

    name: str
    members: list[str]   # the members' names in the engine
    path: str

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1 or self.members[0] != self.name


def attach_plugins(engine: Engine, paths: Sequence[os.PathLike | str]) -> list[PluginUnit]:
    """Load and attach every plugin of ``paths`` (a ``--folds`` folder: each of its members); names are made
    unique with ``#i`` (the second plugin or ensemble of the same name is ``NAME#1``)."""
    from anymc3d.plugin import ensemble_members, is_ensemble_path, load_plugin

    units, taken = [], set()

    def unique(name: str, i: int) -> str:
        out = name if name not in taken else f"{name}#{i}"
        taken.add(out)
        return out

    for i, path in enumerate(paths):
        path = Path(path)
        if not is_ensemble_path(path):
            plugin = load_plugin(path)
            name = engine.add_plugin(plugin, name=unique(plugin.config.name, i))
            units.append(PluginUnit(name, [name], str(path)))
            continue
        members = [load_plugin(m) for m in ensemble_members(path)]
        first = members[0].config
        for m in members[1:]:
            if m.config.labels != first.labels or m.config.task != first.task:
                raise AnyMC3DError(f"{path}: ensemble members {members[0].path} and {m.path} differ in labels or task")
        names = {m.config.name for m in members}
        name = unique(first.name if len(names) == 1 else path.name, i)
        attached = [engine.add_plugin(m, name=unique(f"{name}.fold{k}", i)) for k, m in enumerate(members)]
        units.append(PluginUnit(name, attached, str(path)))
    return units


def combine_units(result: CaseResult, units: Optional[Sequence[PluginUnit]], ensemble_all: bool) -> None:
    """Replace each ensemble folder's member predictions by their ensemble (mean calibrated logit) named after
    the unit; with ``ensemble_all`` (``--ensemble``), then average the units into one ``ensemble``: an
    ensemble folder counts as one member there, as a single plugin does."""
    if units:
        by_name = {p.plugin: p for p in result.predictions}
        result.predictions = [ensemble([by_name[m] for m in u.members], name=u.name) if u.is_ensemble
                              else by_name[u.members[0]] for u in units]
    if ensemble_all:
        result.predictions = [ensemble(result.predictions)]


def predict_case(engine: Engine, case: Case, plugins: Sequence[str], *, images=None, heatmap_method: Optional[str] = None,
                 heatmap_dir: Optional[os.PathLike | str] = None, heatmap_format: str = "nii.gz",
                 ensemble_plugins: bool = False, embedding: bool = False, progress: Optional[Progress] = None,
                 units: Optional[Sequence[PluginUnit]] = None) -> dict:
    """One case from images to its record: read (unless ``images`` are given), predict, heatmaps, record.

    ``units`` (from :func:`attach_plugins`): each ``--folds`` ensemble folder gives one prediction, the mean of
    its members; ``ensemble_plugins`` (``--ensemble``) then averages everything into one.
    Never raises for a bad case: any error becomes the case's error record (one line naming the path), so one
    bad case never costs the others their results. Interrupts (KeyboardInterrupt, SystemExit) still stop the run.
    """
    progress = progress or (lambda stage, k, n: None)
    try:
        if images is None:
            progress("reading", 0, 1)
            images = read_case(case)
        result = engine.predict_image(images, list(plugins), heatmap=heatmap_method if heatmap_dir else None,
                                      sources=[str(v) for v in case.views], progress=progress)
        combine_units(result, units, ensemble_plugins)
        files = write_heatmaps(result, heatmap_dir, case.stem, heatmap_format, progress) if heatmap_dir else {}
        progress("writing", 0, 1)
        record = result_record(result, case.image, files, embedding, case.series)
        for warning in add_record_warnings(record, images[0], case.image):  # the review page's rule
            logger.warning("%s: %s", case.image, warning)
        return record
    except Exception as error:  # the contract: a bad case is an error record, the batch goes on
        logger.debug("case %s failed", case.image, exc_info=True)
        return error_record(case.image, error_message(case.image, error), case.series)


# ------------------------------------------------------------------------------------------ files
def dumps_record(record: dict) -> str:
    """One record as compact JSON (strict: NaN or infinity is refused, never written as ``NaN``)."""
    return json.dumps(validate_record(record), allow_nan=False)


def write_record(path: os.PathLike | str, record: dict) -> Path:
    """Write one record file atomically (a per-case commit of a distributed run)."""
    return write_text_atomic(path, json.dumps(validate_record(record), indent=2, allow_nan=False))


def write_records(path: os.PathLike | str, records: Iterable[dict]) -> Path:
    """Write a run's records atomically: JSON Lines for a ``.jsonl`` path, else a JSON list. Every record is
    validated first; an invalid one raises :class:`contract.RecordError` and nothing is written."""
    records = validate_records(list(records))
    if str(path).endswith(JSONL_SUFFIX):
        text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
    else:
        text = json.dumps(records, indent=2, allow_nan=False)
    return write_text_atomic(path, text)


def read_records(path: os.PathLike | str) -> list[dict]:
    """Read and validate records written by :func:`write_records` (JSON list or JSON Lines) or
    :func:`write_record` (one record)."""
    text = Path(path).read_text()
    try:
        if str(path).endswith(JSONL_SUFFIX):
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecordError(f"{path}: not valid JSON ({error})") from None
    return [validate_record(data)] if isinstance(data, dict) else validate_records(data)

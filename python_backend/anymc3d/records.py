"""Result records and heatmap files: the one way every runner writes its outputs.

The runner (:mod:`anymc3d.runner`, used by the CLI and the distributed Ray job) builds each case's record with
:func:`result_record` or :func:`error_record`, writes heatmaps with :func:`write_heatmaps` (names from
``contract.heatmap_name``) and records with :func:`write_records` / :func:`write_record`. Every record is checked with
``contract.validate_record`` before it is written, and every file is written under a temporary name and
renamed (``fileio``), so a reader never sees a half-written or off-contract output.

Formats: a ``.jsonl`` path gets JSON Lines (one record per line, for large runs); any other path a JSON list
(docs/cli-contract.md).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional

from anymc3d.contract import STATUS_ERROR, STATUS_OK, RecordError, heatmap_name, validate_record, validate_records
from anymc3d.errors import AnyMC3DError, one_line
from anymc3d.fileio import write_text_atomic
from anymc3d.image_writing import write_image_atomic
from anymc3d.safeio import loads, read_json, read_limited

if TYPE_CHECKING:  # the engine's result type, for annotations only: writing records runs no model
    from anymc3d.engine import CasePredictions

#: progress(stage, done, total), as the engine reports it
Progress = Callable[[str, int, int], None]
JSONL_SUFFIX = ".jsonl"
MAX_RECORDS_BYTES = 256 * 1024 ** 2  # a results file of a large batch (about 2 kB per record)


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


def result_record(result: CasePredictions, image: str, heatmaps: Optional[dict] = None, embedding: bool = False,
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
            "heatmap_localisation": pred.heatmap_localisation if files else None,
            "precision": pred.precision,
            **({"embedding": [float(x) for x in pred.embedding]} if embedding else {}),
        })
    return validate_record(record)


def write_heatmaps(result: CasePredictions, folder: os.PathLike | str, stem: str, fmt: str,
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
    try:
        if str(path).endswith(JSONL_SUFFIX):
            text = read_limited(path, MAX_RECORDS_BYTES).decode("utf-8")
            data = [loads(line, path) for line in text.splitlines() if line.strip()]
        else:
            data = read_json(path, MAX_RECORDS_BYTES)
    except (ValueError, OSError) as error:
        raise RecordError(str(error) if isinstance(error, ValueError) else f"{path}: {error}") from None
    return [validate_record(data)] if isinstance(data, dict) else validate_records(data)

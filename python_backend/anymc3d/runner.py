"""Running the model over a run's cases: plugins attached to one engine (a ``--folds`` folder as one unit), each
case read, predicted and written (heatmaps, record) through :mod:`anymc3d.records`. The local CLI and the Ray
job's model workers run cases with :func:`predict_case`, so both give the same records.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from anymc3d.cases import InputCase, read_case
from anymc3d.engine import CasePredictions, Engine, ensemble
from anymc3d.errors import AnyMC3DError
from anymc3d.modality import add_record_warnings
from anymc3d.records import Progress, error_message, error_record, result_record, write_heatmaps

logger = logging.getLogger(__name__)


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


def combine_units(result: CasePredictions, units: Optional[Sequence[PluginUnit]], ensemble_all: bool) -> None:
    """Replace each ensemble folder's member predictions by their ensemble (mean calibrated logit) named after
    the unit; with ``ensemble_all`` (``--ensemble``), then average the units into one ``ensemble``: an
    ensemble folder counts as one member there, as a single plugin does."""
    if units:
        by_name = {p.plugin: p for p in result.predictions}
        result.predictions = [ensemble([by_name[m] for m in u.members], name=u.name) if u.is_ensemble
                              else by_name[u.members[0]] for u in units]
    if ensemble_all:
        result.predictions = [ensemble(result.predictions)]


def predict_case(engine: Engine, case: InputCase, plugins: Sequence[str], *, images=None, heatmap_method: Optional[str] = None,
                 heatmap_dir: Optional[os.PathLike | str] = None, heatmap_format: str = "nii.gz",
                 ensemble_plugins: bool = False, embedding: bool = False, progress: Optional[Progress] = None,
                 units: Optional[Sequence[PluginUnit]] = None, dicom_dir: Optional[os.PathLike | str] = None) -> dict:
    """One case from images to its record: read (unless ``images`` are given), predict, heatmaps, record.

    ``units`` (from :func:`attach_plugins`): each ``--folds`` ensemble folder gives one prediction, the mean of
    its members; ``ensemble_plugins`` (``--ensemble``) then averages everything into one. ``dicom_dir``: also
    write the case's DICOM SR and Parametric Maps there (``anymc3d.dicom_out``; the record lists them in ``dicom``).
    Never raises for a bad case: any error becomes the case's error record (one line naming the path), so one
    bad case never costs the others their results. Interrupts (KeyboardInterrupt, SystemExit) still stop the run.
    """
    progress = progress or (lambda stage, k, n: None)
    try:
        if images is None:
            progress("reading", 0, 1)
            images = read_case(case)
        if dicom_dir:  # checked before predicting: a case that cannot be exported costs no compute
            from anymc3d.dicom_out import export_record
            from anymc3d.dicom_source import case_source
            source = case_source(case, images[0], heatmaps=bool(heatmap_dir))
        result = engine.predict_image(images, list(plugins), heatmap=heatmap_method if heatmap_dir else None,
                                      sources=[str(v) for v in case.views], progress=progress)
        combine_units(result, units, ensemble_plugins)
        files = write_heatmaps(result, heatmap_dir, case.stem, heatmap_format, progress) if heatmap_dir else {}
        progress("writing", 0, 1)
        record = result_record(result, case.image, files, embedding, case.series)
        for warning in add_record_warnings(record, images[0], case.image):  # the review page's rule
            logger.warning("%s: %s", case.image, warning)
        if dicom_dir:
            record["dicom"] = export_record(record, dicom_dir, stem=case.stem, source=source)
        return record
    except Exception as error:  # the contract: a bad case is an error record, the batch goes on
        logger.debug("case %s failed", case.image, exc_info=True)
        return error_record(case.image, error_message(case.image, error), case.series)

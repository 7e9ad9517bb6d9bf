"""What the page says about the model behind a case's findings: plugin name, version, backbone, training summary,
intended modality and body part, and the warnings a reader must not miss (untrained plugin, image modality that
does not fit the plugin).

Everything here becomes plain text for the page (Vue escapes it): plugin metadata and training summaries are files
from elsewhere, never markup. Plugins are read torch-free (``anymc3d.plugin_file``), header only for the summary.

Which plugin files are opened: a record names its plugins by path (``plugin_path``); a path is opened only when it
is inside the review folder or is one of the plugins given on the command line (``--plugin``). Anything else is
reported as not opened (the review folder's confinement, cases.py).

Whether the image fits a plugin's intended modality is the backend's rule (``anymc3d.modality``), the one
``anymc3d predict`` warns with.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from anymc3d.contract import backbone_description
from anymc3d.errors import PluginError
from anymc3d.modality import (  # noqa: F401 (the page's names for the backend's rule)
    image_modality,
    intended_modality,
    modality_mismatch,
    modality_name,
)
from anymc3d.plugin_file import (
    evaluation_lines,
    read_plugin_json,
    read_training_summary,
    training_lines,
)

logger = logging.getLogger("anymc3d.review")

UNTRAINED = "untrained: probabilities mean nothing"


@dataclasses.dataclass
class PluginInfo:
    """The text the page shows for one plugin of a case."""

    name: str                      # the record's plugin name (or the file's)
    path: str = ""
    opened: bool = False           # the plugin file was read
    problem: str = ""              # why it was not read / could not be read
    version: str = ""              # anymc3d version that wrote it, plugin format version
    kind: str = ""
    backbone: str = ""
    labels: str = ""
    description: str = ""
    modality: str = ""             # intended modality code (CT, MR, ...), '' = unknown
    modality_source: str = ""      # where it comes from ("stated in the plugin", "from its preprocessing")
    body_part: str = ""
    trained: bool | None = None    # None: unknown (file not read)
    training: list = dataclasses.field(default_factory=list)  # lines of the training summary
    card: list = dataclasses.field(default_factory=list)  # the model card: operating points, measured localisation

    def as_state(self) -> dict:
        return dataclasses.asdict(self)


def _short(value, limit=300) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"




class PluginInfoReader:
    """Reads plugins for the page, once per file version (path, size, modification time).

    Args:
        folder_root: the review folder (plugins inside it may be read).
        trusted: plugin paths given on the command line (read wherever they are).
    """

    def __init__(self, folder_root, trusted=()):
        self.root = Path(folder_root).resolve()
        self.trusted = {Path(p).resolve() for p in trusted}
        self._cache: dict[tuple, PluginInfo] = {}

    def allowed(self, path: Path) -> bool:
        return path in self.trusted or path == self.root or self.root in path.parents

    def read(self, path, name="") -> PluginInfo:
        if not isinstance(path, str) or not path or not os.path.isabs(path):
            return PluginInfo(name=_short(name or "?"), problem="the results name no plugin file")
        resolved = Path(path).resolve()
        info = PluginInfo(name=_short(name or resolved.name), path=_short(path))
        if not self.allowed(resolved):
            info.problem = ("plugin file not opened: it is outside the review folder (to show it, start the review "
                            f"with --backbone BACKBONE --plugin {_short(path, 200)}, which also runs cases from the page)")
            return info
        try:
            stat = resolved.stat()
        except OSError:
            info.problem = "plugin file not found (moved or deleted since the prediction)"
            return info
        key = (resolved, stat.st_size, stat.st_mtime_ns)
        if key not in self._cache:
            self._cache[key] = self._read(resolved, info)
        return dataclasses.replace(self._cache[key], name=info.name, path=info.path)

    @staticmethod
    def _read(path: Path, info: PluginInfo) -> PluginInfo:
        try:
            meta = read_plugin_json(path)
            summary = read_training_summary(path)
        except (PluginError, OSError) as error:
            info.problem = _short(f"plugin file cannot be read: {error}")
            return info
        backbone = meta.get("backbone") or {}
        info.opened = True
        info.name = _short(meta.get("name") or info.name)
        info.version = _short(f"anymc3d {meta.get('anymc3d_version', '?')}, plugin format {meta.get('format_version', '?')}")
        info.kind = _short(meta.get("kind", ""))
        info.backbone = _short(f"{backbone_description(backbone)} at {backbone.get('img_size', '?')} px")
        info.labels = _short(", ".join(str(label) for label in meta.get("labels") or []))
        info.description = _short(meta.get("description", ""))
        info.modality, info.modality_source = intended_modality(meta)
        info.body_part = _short(meta.get("body_part", ""), 200)
        info.trained = summary is not None
        info.training = training_lines(summary) if summary is not None else []
        info.card = model_card_lines(meta, summary)
        return info


def _number(value, digits=2) -> str:
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return "?"


#: what the page says of a plugin whose heatmaps were never measured against lesion masks
NOT_MEASURED = ("heatmap localisation: never measured for this plugin (`anymc3d eval` with a mask column and "
                "--record-localisation measures it)")


def model_card_lines(meta: dict, summary: dict | None) -> list[str]:
    """What a plugin file holds about how far its outputs can be trusted, beyond its training summary, as lines:
    the operating point of each finding (the threshold its decisions use; the validation's Youden threshold when
    training stored one) and, when ``anymc3d eval --record-localisation`` measured it, where its heatmaps point
    (per method: hit rate, the lesion's share of the map's mass against its share of the volume, median distance) and, when
    ``anymc3d eval --record-evaluation`` stored it, the held-out evaluation of each finding."""
    labels = [str(label) for label in meta.get("labels") or []]
    lines = []
    thresholds = meta.get("thresholds") or []
    if meta.get("task") == "multilabel" and len(thresholds) == len(labels):
        lines.append("operating point: " + ", ".join(f"{_short(label, 40)} >= {_number(t)}"
                                                     for label, t in zip(labels, thresholds)))
    youden = (summary or {}).get("youden_thresholds_validation")
    if isinstance(youden, list) and len(youden) == len(labels):
        lines.append("Youden threshold (validation): " + ", ".join(f"{_short(label, 40)} {_number(t)}"
                                                                  for label, t in zip(labels, youden)))
    card = meta.get("localisation") or {}
    measured = card.get("measured") or {}
    if measured:
        task = f" on {_short(card['task'], 120)}" if card.get("task") else ""
        lines.append(f"heatmap localisation{task}: best {_short(card.get('best', '?'), 40)}")
    else:
        lines.append(NOT_MEASURED)
    for method, m in measured.items():
        distance = f", median distance {_number(m['median_distance_mm'], 1)} mm" if "median_distance_mm" in m else ""
        lines.append(f"  {_short(method, 40)}: hit rate {_number(m.get('hit_rate'))} of {_short(m.get('cases', '?'), 20)} "
                     f"cases, mass {_number(m.get('mass_over_volume_share'), 1)}x its volume share{distance}")
    return lines + evaluation_lines(meta.get("evaluation"))


def record_plugins(record) -> list[tuple[str, str]]:
    """(plugin path, plugin name) of each plugin a record's results name (an ensemble lists each member)."""
    found = []
    for result in (record or {}).get("results") or []:
        if not isinstance(result, dict):
            continue
        paths = result.get("plugin_path")
        for path in paths if isinstance(paths, list) else [paths]:
            found.append((path, str(result.get("plugin") or "")))
    return list(dict.fromkeys(found))


def modality_warnings(plugins: list[PluginInfo], image_code: str, image_source: str,
                      scalar_range: tuple[float, float] | None) -> list[str]:
    """Warnings for plugins whose intended modality does not fit the image: by the image's stated modality, or,
    when it states none, by its intensities (the backend's rule, anymc3d.modality.modality_mismatch)."""
    warnings = []
    minimum = float(scalar_range[0]) if scalar_range is not None else None
    for info in plugins:
        warning = modality_mismatch(info.name, info.modality, image_code, image_source, minimum)
        if warning:
            warnings.append(warning)
    return warnings


def model_summary(info: PluginInfo) -> dict:
    """One line for a plugin (name, backbone, how it was trained), for the line under the findings; the rest of
    :class:`PluginInfo` is shown on demand."""
    if not info.opened:
        trained = info.problem or "not opened"
    elif info.trained is False:
        trained = UNTRAINED
    else:
        auroc = next((line.split(": ", 1)[1].split(" (")[0] for line in info.training
                      if line.startswith("validation AUROC")), "")
        trained = f"trained, validation AUROC {auroc}" if auroc else "trained"
    parts = [info.backbone.split(" at ")[0]] if info.backbone else []
    return {"name": info.name, "text": " · ".join([*parts, trained]), "trained": info.trained}

"""What the page says about the model behind a case's findings: plugin name, version, backbone, training summary,
intended modality and body part, and the warnings a reader must not miss (untrained plugin, image modality that
does not fit the plugin).

Everything here becomes plain text for the page (Vue escapes it): plugin metadata and training summaries are files
from elsewhere, never markup. Plugins are read torch-free (``anymc3d.plugin_file``), header only for the summary.

Which plugin files are opened: a record names its plugins by path (``plugin_path``); a path is opened only when it
is inside the review folder or is one of the plugins given on the command line (``--plugin``). Anything else is
reported as not opened (the review folder's confinement, cases.py).

The image's modality: the DICOM Modality tag (0008,0060) of a DICOM series case, or a MetaImage's ``Modality``
field; other formats (NIfTI, NRRD) carry none. When the plugin expects CT or MR and the image states no modality,
the intensities say whether the image can be a CT in Hounsfield units: a CT has air near -1000 HU around the body,
so an image whose lowest value is above ``CT_MINIMUM_HU`` is no CT in HU, and one with values at or below
``MR_SUSPICIOUS_MINIMUM`` is no MR magnitude image. Both are checks of the preprocessing's assumption, said so.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from anymc3d.errors import PluginError
from anymc3d.plugin_file import read_plugin_json, read_training_summary

logger = logging.getLogger("anymc3d.review")

#: the modality a plugin's intensity mapping assumes (anymc3d.preprocessing.PreprocessConfig.intensity)
INTENSITY_MODALITY = {"ct": "CT", "mri_zscore": "MR", "mri_percentile": "MR"}
#: MetaImage Modality field -> DICOM Modality code
METAIMAGE_MODALITY = {"MET_MOD_CT": "CT", "MET_MOD_MR": "MR", "MET_MOD_NM": "NM", "MET_MOD_US": "US"}
MODALITY_NAMES = {"CT": "CT", "MR": "MRI", "PT": "PET", "NM": "nuclear medicine", "US": "ultrasound", "CR": "radiograph",
                  "DX": "radiograph"}
CT_MINIMUM_HU = -200.0         # a CT in HU has air (about -1000) or at least fat (about -100) in view
MR_SUSPICIOUS_MINIMUM = -500.0  # magnitude MR images are not negative; HU air is
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

    def as_state(self) -> dict:
        return dataclasses.asdict(self)


def _short(value, limit=300) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _number(value, digits=3) -> str:
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return "?"


def training_lines(summary: dict) -> list[str]:
    """The training summary (``anymc3d train``'s, see anymc3d/train.py) as short lines: epochs, case counts per split,
    validation AUROC (best and per finding), calibration and how long it took. Unknown keys are left out."""
    lines = []
    if "epochs_run" in summary:
        best = f", best epoch {summary['best_epoch']}" if "best_epoch" in summary else ""
        limit = f" of at most {summary['epochs_max']}" if "epochs_max" in summary else ""
        lines.append(f"epochs: {summary['epochs_run']}{limit}{best}")
    splits = summary.get("splits")
    if isinstance(splits, dict) and splits:
        parts = []
        for split, info in splits.items():
            if not isinstance(info, dict):
                continue
            counts = info.get("positives") or info.get("per_class") or {}
            detail = ", ".join(f"{_short(k, 40)} {v}" for k, v in counts.items()) if isinstance(counts, dict) else ""
            word = "positive" if "positives" in info else "per class"
            parts.append(f"{_short(split, 20)} {info.get('cases', '?')}" + (f" ({word}: {detail})" if detail else ""))
        lines.append("cases: " + "; ".join(parts))
    if "best_val_auroc" in summary:
        line = f"validation AUROC: {_number(summary['best_val_auroc'])}"
        per_label = summary.get("val_auroc_per_label")
        if isinstance(per_label, dict) and per_label:
            line += " (" + ", ".join(f"{_short(k, 40)} {_number(v)}" for k, v in per_label.items()) + ")"
        lines.append(line)
    if "raw_f1_thresholds" in summary or "youden_thresholds_validation" in summary:
        lines.append("calibration: Platt scaling on the validation split; thresholds at the F1 point")
    if "seconds" in summary:
        processes = summary.get("processes")
        lines.append(f"training time: {_number(summary['seconds'], 0)} s"
                     + (f" on {processes} process{'es' if processes != 1 else ''}" if processes else ""))
    if "manifest" in summary:
        lines.append(f"manifest: {_short(os.path.basename(str(summary['manifest'])), 120)}")
    return lines


def intended_modality(meta: dict) -> tuple[str, str]:
    """(modality code, where it comes from) of a plugin's metadata; ('', '') when neither states one."""
    if meta.get("modality"):
        return str(meta["modality"]), "stated in the plugin"
    found = {INTENSITY_MODALITY.get(str(p.get("intensity", "ct"))) for p in meta.get("preprocessing") or []
             if isinstance(p, dict)}
    found.discard(None)
    if len(found) == 1:
        return found.pop(), "from its preprocessing (intensity mapping)"
    return "", ""


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
        info.backbone = _short(f"{backbone.get('name', '?')} at {backbone.get('img_size', '?')} px")
        info.labels = _short(", ".join(str(label) for label in meta.get("labels") or []))
        info.description = _short(meta.get("description", ""))
        info.modality, info.modality_source = intended_modality(meta)
        info.body_part = _short(meta.get("body_part", ""), 200)
        info.trained = summary is not None
        info.training = training_lines(summary) if summary is not None else []
        return info


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


def image_modality(path) -> tuple[str, str]:
    """(modality code, source) stated by the image itself: the DICOM Modality tag of a series folder's first file, or
    a MetaImage's Modality field; ('', '') when the format states none (NIfTI, NRRD) or it cannot be read."""
    import SimpleITK as sitk

    path = Path(path)
    try:
        if path.is_dir():
            files = next((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), uid)
                          for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)) or ()), ())
            if not files:
                return "", ""
            reader = sitk.ImageFileReader()
            reader.SetFileName(files[0])
            reader.ReadImageInformation()
            code = reader.GetMetaData("0008|0060").strip() if reader.HasMetaDataKey("0008|0060") else ""
            return (code.upper(), "DICOM tag (0008,0060)") if code else ("", "")
        if path.name.lower().endswith((".mha", ".mhd")):
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            code = METAIMAGE_MODALITY.get(reader.GetMetaData("Modality")) if reader.HasMetaDataKey("Modality") else None
            return (code, "MetaImage Modality field") if code else ("", "")
    except RuntimeError as error:  # SimpleITK: unreadable header
        logger.warning("cannot read the modality of %s: %s", path, error)
    return "", ""


def modality_name(code: str) -> str:
    return MODALITY_NAMES.get(code, code)


def modality_warnings(plugins: list[PluginInfo], image_code: str, image_source: str,
                      scalar_range: tuple[float, float] | None) -> list[str]:
    """Warnings for plugins whose intended modality does not fit the image: by the image's stated modality, or,
    when it states none, by its intensities (see the module's docstring)."""
    warnings = []
    for info in plugins:
        if not info.modality:
            continue
        wanted = modality_name(info.modality)
        if image_code:
            if image_code != info.modality:
                warnings.append(f"{info.name} is meant for {wanted} images; this image is {modality_name(image_code)} "
                                f"({image_source}): its findings do not apply")
            continue
        if scalar_range is None:
            continue
        low = float(scalar_range[0])
        if info.modality == "CT" and low > CT_MINIMUM_HU:
            warnings.append(f"{info.name} is meant for CT in Hounsfield units; this image states no modality and its "
                            f"lowest value is {low:.0f} (a CT has air near -1000 HU): probably not a CT, its findings "
                            "may not apply")
        elif info.modality == "MR" and low <= MR_SUSPICIOUS_MINIMUM:
            warnings.append(f"{info.name} is meant for MRI; this image states no modality and has values down to "
                            f"{low:.0f}, like a CT in Hounsfield units: its findings may not apply")
    return warnings

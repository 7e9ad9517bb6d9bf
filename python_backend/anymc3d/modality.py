"""Does an image fit a plugin's intended modality? One rule for ``anymc3d predict`` (stderr and the record's
``warnings``) and the review page (its warning above the findings).

The plugin's intended modality is its ``modality`` field (a DICOM Modality code, optional), else its
preprocessing's intensity mapping (``ct`` -> CT, ``mri_*`` -> MR). The image's is its DICOM Modality tag
(0008,0060) or a MetaImage's ``Modality`` field; NIfTI and NRRD state none, and then the intensities are checked
against the preprocessing's assumption with the rule ``intensity="auto"`` uses
(:func:`anymc3d.intensity.modality_from_intensities`: HU air in view is a CT, no value near CT's lowest is no CT).
Torch-free.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from anymc3d.intensity import modality_from_intensities

logger = logging.getLogger("anymc3d")

#: the modality a plugin's intensity mapping assumes (anymc3d.preprocessing.PreprocessConfig.intensity)
INTENSITY_MODALITY = {"ct": "CT", "mri_zscore": "MR", "mri_percentile": "MR"}
#: MetaImage Modality field -> DICOM Modality code
METAIMAGE_MODALITY = {"MET_MOD_CT": "CT", "MET_MOD_MR": "MR", "MET_MOD_NM": "NM", "MET_MOD_US": "US"}
MODALITY_NAMES = {"CT": "CT", "MR": "MRI", "PT": "PET", "NM": "nuclear medicine", "US": "ultrasound", "CR": "radiograph",
                  "DX": "radiograph"}


def modality_name(code: str) -> str:
    return MODALITY_NAMES.get(code, code)


def intended_modality(meta: dict) -> tuple[str, str]:
    """(modality code, where it comes from) of a plugin's metadata (plugin.json); ('', '') when neither states one."""
    if meta.get("modality"):
        return str(meta["modality"]), "stated in the plugin"
    found = {INTENSITY_MODALITY.get(str(p.get("intensity", "ct"))) for p in meta.get("preprocessing") or []
             if isinstance(p, dict)}
    found.discard(None)
    if len(found) == 1:
        return found.pop(), "from its preprocessing (intensity mapping)"
    return "", ""


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


def modality_mismatch(plugin: str, wanted: str, image_code: str, image_source: str,
                      minimum: Optional[float]) -> str:
    """The warning for plugin ``plugin`` (intended modality ``wanted``, a code or '') on an image of modality
    ``image_code`` (stated by ``image_source``; '' when the file states none) whose lowest value is ``minimum``
    (None: unknown); '' when the image fits or nothing can be said."""
    if not wanted:
        return ""
    name = modality_name(wanted)
    if image_code:
        if image_code == wanted:
            return ""
        return (f"{plugin} is meant for {name} images; this image is {modality_name(image_code)} ({image_source}): "
                "its findings do not apply")
    if minimum is None:
        return ""
    low = float(minimum)
    if wanted == "CT" and modality_from_intensities(low) == "MR":
        return (f"{plugin} is meant for CT in Hounsfield units; this image states no modality and its lowest value is "
                f"{low:.0f} (a CT has air near -1000 HU): probably not a CT, its findings may not apply")
    if wanted == "MR" and modality_from_intensities(low) == "CT":
        return (f"{plugin} is meant for MRI; this image states no modality and has values down to {low:.0f}, like a CT "
                "in Hounsfield units: its findings may not apply")
    return ""


def add_record_warnings(record: dict, image, image_path) -> list[str]:
    """Check every result of a record against its plugin's intended modality (the first member's, for an
    ensemble); a mismatch goes into that result's ``warnings`` (a list of one-line texts). ``image``: the case's
    (first view's) SimpleITK image, for the intensity check. Returns the warnings added."""
    import SimpleITK as sitk

    from anymc3d.errors import PluginError
    from anymc3d.plugin_file import read_plugin_json

    code, source = image_modality(image_path)
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    added = []
    for result in record.get("results") or []:
        paths = result.get("plugin_path")
        path = paths[0] if isinstance(paths, list) and paths else paths
        try:
            wanted, _ = intended_modality(read_plugin_json(path))
        except (PluginError, OSError, TypeError):
            continue  # no plugin file to read (an in-memory plugin): nothing can be said
        warning = modality_mismatch(result["plugin"], wanted, code, source, stats.GetMinimum())
        if warning:
            result.setdefault("warnings", []).append(warning)
            added.append(warning)
    return added

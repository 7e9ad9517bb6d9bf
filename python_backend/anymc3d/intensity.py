"""Voxel values mapped to [0, 1]: a CT window in HU, or an MRI normalisation (z-score or percentiles).

``intensity="auto"`` chooses from the image: a CT in Hounsfield units gets the CT window, anything else the z-score.
Whether an image is a CT in HU comes from its modality tag (DICOM Modality, MetaImage ``Modality``) when it states
one, else from its intensities: a CT in HU has air near -1000 HU around the body, so an image whose lowest value is
at or below ``HU_AIR_MAXIMUM`` is read as CT, and one whose lowest value is above ``CT_MINIMUM_HU`` is no CT in HU
(magnitude MR images are not negative). This is the one place of that rule; the review page's modality warning
uses it too.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from anymc3d.preprocess_config import PreprocessConfig

logger = logging.getLogger(__name__)

CT_MINIMUM_HU = -200.0    # a CT in HU has air (about -1000) or at least fat (about -100) in view
HU_AIR_MAXIMUM = -500.0   # values this low are HU air: magnitude MR images are not negative
DEFAULT_CT_WINDOW = "soft_tissue"  # the CT window 'auto' uses when none is given
BLANK_STD = 0.01          # a mapped volume (in [0, 1]) whose std is below this shows nothing
#: modality tags as SimpleITK keeps them: DICOM (0008,0060), MetaImage Modality
MODALITY_KEYS = {"0008|0060": {"CT": "CT", "MR": "MR"}, "Modality": {"MET_MOD_CT": "CT", "MET_MOD_MR": "MR"}}


def modality_from_intensities(minimum: float) -> str | None:
    """'CT' (HU-like: air in view), 'MR' (no CT in HU) or None (cannot tell) from the image's lowest value."""
    if minimum <= HU_AIR_MAXIMUM:
        return "CT"
    if minimum > CT_MINIMUM_HU:
        return "MR"
    return None


def image_modality(metadata: dict[str, str]) -> str | None:
    """'CT' or 'MR' from the image's modality tag, or None when it states no such modality."""
    for key, codes in MODALITY_KEYS.items():
        value = str(metadata.get(key, "")).strip()
        if value in codes:
            return codes[value]
    return None


def auto_intensity(minimum: float, modality: str | None = None) -> str:
    """The intensity mapping for an image: 'ct' for a CT in HU (stated, or by its intensities), else 'mri_zscore'."""
    return "ct" if (modality or modality_from_intensities(minimum)) == "CT" else "mri_zscore"


def resolve_intensity(config: PreprocessConfig, minimum: float, modality: str | None = None) -> PreprocessConfig:
    """``config`` with ``intensity="auto"`` replaced by the image's mapping (others unchanged)."""
    if config.intensity != "auto":
        return config
    chosen = auto_intensity(minimum, modality)
    if chosen != "ct":
        return dataclasses.replace(config, intensity=chosen, window=None)
    preset = config.window or (None if config.window_center is not None else DEFAULT_CT_WINDOW)
    return dataclasses.replace(config, intensity=chosen, window=preset)


def warn_if_blank(mapped: np.ndarray, config: PreprocessConfig, source: object = None) -> bool:
    """Log a warning when the mapped volume is nearly uniform (std below ``BLANK_STD``): a forced mapping that does
    not fit the image (a CT window on an MRI) blanks it, and the model then sees nothing. True when warned."""
    std = float(np.std(mapped))
    if std >= BLANK_STD:
        return False
    logger.warning("%s: after the '%s' intensity mapping the volume is nearly blank (std %.4f of [0, 1]); the "
                   "setting does not fit this image: use intensity 'auto' (CT window for CT in HU, else z-score)",
                   source or "image", config.intensity, std)
    return True


def normalize_intensity(voxels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Map voxel values to [0, 1] as ``config.intensity`` says.

    Args:
        voxels: array of any shape (finite values).
        config: uses ``intensity`` ('auto': chosen from the values, see :func:`auto_intensity`), the CT window,
            ``percentiles`` and ``zscore_clip``.

    Returns:
        float32 array of the same shape in [0, 1]; a constant volume gives 0 (0.5 for mri_zscore), never NaN.
    """
    x = np.asarray(voxels, dtype=np.float32)
    config = resolve_intensity(config, float(x.min()) if x.size else 0.0)
    if config.intensity == "ct":
        center, width = config.ct_window()
        lo, hi = center - width / 2, center + width / 2
    elif config.intensity == "mri_zscore":
        foreground = x[x > np.percentile(x, 1)]
        if foreground.size == 0:
            foreground = x
        mean, std = float(foreground.mean()), max(float(foreground.std()), 1e-8)
        lo, hi = mean - config.zscore_clip * std, mean + config.zscore_clip * std  # z in [-c, c] -> [0, 1]
    elif config.intensity == "mri_percentile":
        lo, hi = (float(p) for p in np.percentile(x, config.percentiles))
    else:  # "none": min-max
        lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        return np.zeros(x.shape, dtype=np.float32)
    out = np.clip(x, lo, hi)  # a new array: the input is never changed
    out -= lo
    out /= hi - lo
    return np.clip(out, 0.0, 1.0, out=out)

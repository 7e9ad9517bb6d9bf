"""Voxel values mapped to [0, 1]: a CT window in HU, or an MRI normalisation (z-score or percentiles)."""

from __future__ import annotations

import numpy as np

from anymc3d.preprocess_config import PreprocessConfig


def normalize_intensity(voxels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Map voxel values to [0, 1] as ``config.intensity`` says.

    Args:
        voxels: array of any shape (finite values).
        config: uses ``intensity``, the CT window, ``percentiles`` and ``zscore_clip``.

    Returns:
        float32 array of the same shape in [0, 1]; a constant volume gives 0 (0.5 for mri_zscore), never NaN.
    """
    x = np.asarray(voxels, dtype=np.float32)
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

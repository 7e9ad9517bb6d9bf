"""How a volume becomes a stack of model slices: the preprocessing settings stored in each plugin."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "abdomen": (60.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "mediastinum": (50.0, 350.0),
}
"""CT window presets: name -> (center, width) in HU."""

INTENSITY_MODES = ("auto", "ct", "mri_zscore", "mri_percentile", "none")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _valid_orientation(code: str) -> bool:
    letters = set(code)
    return (
        len(code) == 3
        and len(letters) == 3
        and all(len(letters & pair) == 1 for pair in ({"R", "L"}, {"A", "P"}, {"S", "I"}))
    )


@dataclass
class PreprocessConfig:
    """How a volume becomes a stack of model slices. Stored in each plugin, so JSON round-trips.

    Raises:
        ValueError: naming the field, when a value is invalid.
    """

    input_size: int = field(
        default=224, metadata={"help": "Square in-plane size (pixels) the slices are resized to; >= 1."}
    )
    slice_axis: str | int = field(
        default="auto",
        metadata={"help": "'auto' (IJK axis of largest spacing) or 0/1/2: the IJK axis of the input image to slice."},
    )
    num_slices: int | None = field(
        default=None,
        metadata={"help": "Resample the number of slices to this (linear); None keeps the input's; >= 2."},
    )
    orientation: str = field(
        default="LPS",
        metadata={
            "help": "Orientation code for sitk.DICOMOrient applied before slicing (e.g. 'LPS', 'RAS'), or 'none'."
        },
    )
    intensity: str = field(
        default="auto",
        metadata={
            "help": "Intensity mapping to [0, 1]: 'auto' (chosen from the image: the CT window for a CT in HU, else "
            "'mri_zscore'), 'ct' (HU window), 'mri_zscore', 'mri_percentile', 'none' (min-max)."
        },
    )
    window: str | None = field(
        default="soft_tissue",
        metadata={
            "help": f"CT window preset ({', '.join(CT_WINDOWS)}); used when intensity is 'ct' "
            "and no explicit window is given."
        },
    )
    window_center: float | None = field(
        default=None,
        metadata={"help": "Explicit CT window center in HU (overrides the preset; give window_width too)."},
    )
    window_width: float | None = field(
        default=None,
        metadata={"help": "Explicit CT window width in HU, > 0 (overrides the preset; give window_center too)."},
    )
    percentiles: tuple[float, float] = field(
        default=(0.5, 99.5),
        metadata={"help": "mri_percentile: (lo, hi) percentiles clipped to and mapped to [0, 1]; 0 <= lo < hi <= 100."},
    )
    zscore_clip: float = field(
        default=3.0,
        metadata={
            "help": "mri_zscore: z-scores (foreground statistics) are clipped to [-c, c], then mapped to [0, 1]; > 0."
        },
    )

    def __post_init__(self) -> None:
        self._check_slicing()
        self._check_window()
        self._check_normalisation()

    def _check_slicing(self) -> None:
        if not _is_int(self.input_size) or self.input_size < 1:
            raise ValueError(f"input_size must be an integer >= 1, got {self.input_size!r}")
        if self.slice_axis != "auto" and not (_is_int(self.slice_axis) and 0 <= self.slice_axis <= 2):
            raise ValueError(f"slice_axis must be 'auto', 0, 1 or 2, got {self.slice_axis!r}")
        if self.num_slices is not None and not (_is_int(self.num_slices) and self.num_slices >= 2):
            raise ValueError(f"num_slices must be None or an integer >= 2, got {self.num_slices!r}")
        if not isinstance(self.orientation, str) or not (
            self.orientation == "none" or _valid_orientation(self.orientation)
        ):
            raise ValueError(
                "orientation must be 'none' or a 3-letter code with one of R/L, A/P, S/I (e.g. 'LPS'), "
                f"got {self.orientation!r}"
            )

    def _check_window(self) -> None:
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}")
        if self.window is not None and self.window not in CT_WINDOWS:
            raise ValueError(f"window must be None or one of {tuple(CT_WINDOWS)}, got {self.window!r}")
        if self.window_center is not None and not (_is_real(self.window_center) and math.isfinite(self.window_center)):
            raise ValueError(f"window_center must be a finite number or None, got {self.window_center!r}")
        if self.window_width is not None and not (
            _is_real(self.window_width) and math.isfinite(self.window_width) and self.window_width > 0
        ):
            raise ValueError(f"window_width must be a finite number > 0 or None, got {self.window_width!r}")
        if (self.window_center is None) != (self.window_width is None):
            given, missing = (
                ("window_center", "window_width") if self.window_width is None else ("window_width", "window_center")
            )
            raise ValueError(f"{missing} must be given together with {given}")
        if self.intensity == "ct" and self.window is None and self.window_center is None:
            raise ValueError(
                "window must name a preset when intensity is 'ct' and no window_center/window_width is given"
            )

    def _check_normalisation(self) -> None:
        if not (
            isinstance(self.percentiles, (tuple, list))
            and len(self.percentiles) == 2
            and all(_is_real(p) for p in self.percentiles)
            and 0 <= self.percentiles[0] < self.percentiles[1] <= 100
        ):
            raise ValueError(f"percentiles must be (lo, hi) with 0 <= lo < hi <= 100, got {self.percentiles!r}")
        self.percentiles = (float(self.percentiles[0]), float(self.percentiles[1]))
        if not (_is_real(self.zscore_clip) and math.isfinite(self.zscore_clip) and self.zscore_clip > 0):
            raise ValueError(f"zscore_clip must be a finite number > 0, got {self.zscore_clip!r}")

    def ct_window(self) -> tuple[float, float]:
        """The CT (center, width) in HU: the explicit one, else the preset."""
        if self.window_center is not None:
            return float(self.window_center), float(self.window_width)
        return CT_WINDOWS[self.window]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["percentiles"] = list(self.percentiles)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """Build from :meth:`to_dict` output (lists accepted for tuples); unknown keys are a ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown PreprocessConfig keys: {', '.join(unknown)}")
        return cls(**d)

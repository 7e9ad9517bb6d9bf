"""The DICOM source of a case: the headers of the series a prediction was made on, in the predicted volume's slice
order, and the check that the volume lies on its slices. :mod:`anymc3d.dicom_out` builds the SR and Parametric
Maps on it; a case whose series cannot carry them fails here, before it is predicted.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anymc3d.errors import InputError

logger = logging.getLogger(__name__)

NO_FRAME_OF_REFERENCE = ("has no Frame of Reference UID (0020,0052): a Parametric Map must share its source's "
                         "frame of reference; no DICOM objects written")
#: how far the SimpleITK grid the heatmap was computed on may lie from the headers' slice positions (mm)
GEOMETRY_TOLERANCE_MM = 1e-3


@dataclass
class SourceSeries:
    """The headers of a case's DICOM source in the order of the predicted volume's slices.

    ``datasets`` are the single-frame files (one per slice) or one multi-frame object; ``positions`` (N, 3) the
    ImagePositionPatient of each slice, ``orientation`` the 6 direction cosines, ``pixel_spacing`` (row, column).
    """

    name: str
    datasets: list
    positions: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_thickness: float | None

    @property
    def multiframe(self) -> bool:
        return len(self.datasets) == 1 and int(getattr(self.datasets[0], "NumberOfFrames", 1) or 1) > 1

    @property
    def frame_of_reference(self) -> str | None:
        return getattr(self.datasets[0], "FrameOfReferenceUID", None) or None

    @property
    def even_spacing(self) -> float | None:
        """The slice spacing when the slices are evenly spaced (within the tolerance), else None."""
        steps = np.linalg.norm(np.diff(self.positions, axis=0), axis=1)
        if len(steps) and np.ptp(steps) <= GEOMETRY_TOLERANCE_MM and steps[0] > 0:
            return float(steps.mean())
        return None


def _first(item, sequence: str):
    value = getattr(item, sequence, None)
    return value[0] if value else None


def _frame_geometry(ds) -> tuple[np.ndarray, np.ndarray, tuple[float, float], float | None]:
    """Positions, orientation, pixel spacing, thickness of a multi-frame object's frames (functional groups)."""
    shared = _first(ds, "SharedFunctionalGroupsSequence")

    def group(frame, name):
        return _first(frame, name) or (_first(shared, name) if shared is not None else None)

    frames = list(getattr(ds, "PerFrameFunctionalGroupsSequence", []) or [])
    if len(frames) != int(ds.NumberOfFrames):
        raise ValueError(f"{len(frames)} per-frame functional groups for {ds.NumberOfFrames} frames")
    positions = np.array([[float(v) for v in group(f, "PlanePositionSequence").ImagePositionPatient] for f in frames])
    orientation = group(frames[0], "PlaneOrientationSequence").ImageOrientationPatient
    measures = group(frames[0], "PixelMeasuresSequence")
    thickness = getattr(measures, "SliceThickness", None)
    return (positions, np.array([float(v) for v in orientation]), tuple(float(v) for v in measures.PixelSpacing),
            None if thickness in (None, "") else float(thickness))


def read_source(folder: os.PathLike | str, series: str | None = None) -> SourceSeries:
    """The headers (no pixel data) of the DICOM series that ``read_image(folder, series=series)`` reads, in the
    same slice order. Raises InputError naming the folder and series when it is not a usable DICOM series."""
    import pydicom

    from anymc3d.image_reading import dicom_series_files

    folder = Path(folder)
    files = dicom_series_files(folder, series) if folder.is_dir() else []
    if not files:
        raise InputError(folder, "--dicom needs a DICOM series folder as input (nothing to reference)")
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    name = f"{folder} (series {datasets[0].get('SeriesInstanceUID', '?')})"
    try:
        if len(datasets) == 1 and int(getattr(datasets[0], "NumberOfFrames", 1) or 1) > 1:
            positions, orientation, spacing, thickness = _frame_geometry(datasets[0])
        else:
            positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets])
            orientation = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
            spacing = tuple(float(v) for v in datasets[0].PixelSpacing)
            thickness = getattr(datasets[0], "SliceThickness", None)
            thickness = None if thickness in (None, "") else float(thickness)
            if any(not np.allclose([float(v) for v in d.ImageOrientationPatient], orientation, atol=1e-4)
                   for d in datasets):
                raise ValueError("its slices differ in ImageOrientationPatient")
    except (AttributeError, TypeError, ValueError, IndexError) as error:
        raise InputError(name, f"has no usable plane geometry for DICOM outputs ({error})") from None
    return SourceSeries(name, datasets, positions, orientation, spacing, thickness)


def case_source(case, image, heatmaps: bool) -> SourceSeries:
    """The DICOM source of a case, checked before it is predicted (a case that cannot be exported costs no
    compute): one view, a DICOM series on the grid of the volume read (``image``), with a Frame of Reference
    when ``heatmaps`` are to become Parametric Maps. Raises InputError naming the case or series."""
    try:
        import highdicom  # noqa: F401 - only whether the optional extra is installed
    except ImportError:
        raise InputError(case.image, "--dicom needs highdicom: pip install 'anymc3d[dicom]'") from None
    if len(case.views) != 1:
        raise InputError(case.image, "--dicom needs a single DICOM series per case (nothing to reference)")
    source = read_source(case.views[0], case.series)
    if heatmaps and not source.frame_of_reference:
        raise InputError(source.name, NO_FRAME_OF_REFERENCE)
    check_geometry(source, image)
    return source


def check_geometry(source: SourceSeries, image) -> None:
    """The predicted volume (a SimpleITK image of the series) lies on the source's slices: same size, in-plane
    orientation and spacing, and slice k at the header position of slice k (evenly spaced series), or the same
    first slice (unevenly spaced: its objects then carry each slice's own position). Raises InputError."""
    cols, rows, n = image.GetSize()
    first = source.datasets[0]
    if (int(first.Rows), int(first.Columns), len(source.positions)) != (rows, cols, n):
        raise InputError(source.name, f"has {len(source.positions)} slices of {first.Rows}x{first.Columns}, the "
                                      f"predicted volume {n} of {rows}x{cols}")
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if not np.allclose(source.orientation, [*direction[:, 0], *direction[:, 1]], atol=1e-4):
        raise InputError(source.name, "its ImageOrientationPatient differs from the predicted volume's direction")
    if not np.allclose(source.pixel_spacing, (image.GetSpacing()[1], image.GetSpacing()[0]), atol=1e-4):
        raise InputError(source.name, "its PixelSpacing differs from the predicted volume's spacing")
    grid = np.array([image.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(n)])
    error = np.abs(grid - source.positions).max(axis=1)
    if source.even_spacing is not None and error.max() > GEOMETRY_TOLERANCE_MM:
        raise InputError(source.name, f"slice {int(error.argmax())} lies {error.max():.4g} mm from where the "
                                      "predicted volume puts it (slices out of order?)")
    if source.even_spacing is None:
        if error[0] > GEOMETRY_TOLERANCE_MM:
            raise InputError(source.name, "its first slice is not where the predicted volume starts")
        logger.warning("%s: slices are unevenly spaced or missing; its DICOM objects use each slice's own position "
                       "(the heatmap file's grid is evenly spaced)", source.name)

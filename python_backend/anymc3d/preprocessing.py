"""Read, check and slice 3D CT/MRI volumes for a 2D ViT, and map slice-space results back.

AnyMC3D encodes a volume slice by slice with a 2D foundation model. This module turns an image
file (NIfTI, NRRD, MHA/MHD, a DICOM series folder) into a (S, M, M) tensor of slices in [0, 1]:

1. the image is read and checked (SimpleITK silently turns NIfTI NaN/Inf into 0 and zero-fills
   truncated NIfTI data, so NIfTI files get a second look with nibabel);
2. the slice axis is the input's IJK axis of largest spacing (or the configured one);
3. the volume is reoriented to a canonical orientation with ``sitk.DICOMOrient``, which only
   permutes and flips axes, so the mapping back is exact;
4. intensities are windowed (CT) or normalised (MRI) to [0, 1];
5. slices are resized in-plane (and optionally resampled in number) with torch.

:class:`SliceGeometry` records what was done, so a heatmap in slice space can be written with
exactly the input image's size, origin, spacing and direction, even for oblique anisotropic inputs.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from anymc3d.contract import IMAGE_SUFFIXES, image_stem, is_image_name, is_temporary, split_suffix  # noqa: F401 (re-exported)
from anymc3d.errors import InputError
from anymc3d.fileio import atomic_path

logger = logging.getLogger(__name__)

CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "abdomen": (60.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "mediastinum": (50.0, 350.0),
}
"""CT window presets: name -> (center, width) in HU."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTENSITY_MODES = ("ct", "mri_zscore", "mri_percentile", "none")

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


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
        default="ct",
        metadata={
            "help": "Intensity mapping to [0, 1]: 'ct' (HU window), 'mri_zscore', 'mri_percentile', 'none' (min-max)."
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


# --------------------------------------------------------------------------------------------
# Reading and checking images
# --------------------------------------------------------------------------------------------


def _has_image_suffix(name: str) -> bool:
    return is_image_name(name)


def _dicom_series(folder: Path) -> list[tuple[str, list[str]]]:
    """(series id, file names) of each DICOM series in ``folder``, largest first."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on every folder without a series
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ()
        series = [(sid, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid))) for sid in ids]
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    return sorted(series, key=lambda s: -len(s[1]))


def is_dicom_folder(folder: PathLike) -> bool:
    """True when ``folder`` itself holds a DICOM series (it is then one image, not a folder of images)."""
    return bool(_dicom_series(Path(folder)))


def dicom_series_ids(folder: PathLike) -> list[str]:
    """The series instance UIDs of the DICOM series directly in ``folder``, largest series first."""
    return [sid for sid, _ in _dicom_series(Path(folder))]


def link_problem(path: PathLike) -> str | None:
    """Why ``path`` cannot be opened as a file system entry: a symbolic-link loop, a dangling link, or
    missing; None when it can. (``Path.exists()`` says False for all three without telling which.)"""
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if os.path.islink(path):
            return f"is a dangling symbolic link (to {os.readlink(path)})"
        return "file or folder not found"
    except ValueError as error:  # embedded NUL and the like
        return f"is not a usable path ({error})"
    return None


def scan_folder(folder: PathLike) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Images directly in ``folder`` and the entries that look like images but cannot be opened.

    Images: files with :data:`IMAGE_SUFFIXES` and subfolders holding a DICOM series. Problems: symbolic
    links that loop or dangle (reported, never skipped silently). Hidden and partial files are skipped.

    Returns:
        (sorted image paths, sorted (path, problem) pairs).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "is not a folder")
    found, problems = [], []
    for entry in sorted(folder.iterdir()):
        if is_temporary(entry.name):
            continue
        problem = link_problem(entry) if entry.is_symlink() else None
        if problem is not None:
            problems.append((entry, problem))
        elif (entry.is_file() and _has_image_suffix(entry.name)) or (entry.is_dir() and _dicom_series(entry)):
            found.append(entry)
    return found, problems


def find_images(folder: PathLike) -> list[Path]:
    """Images directly in ``folder``: files with :data:`IMAGE_SUFFIXES` and subfolders holding a DICOM series.

    Hidden files (such as partial outputs ``.x.partial-123.nii.gz``) are skipped. Not recursive
    beyond one level. :func:`scan_folder` also reports broken links.

    Returns:
        Sorted list of paths.
    """
    return scan_folder(folder)[0]


def _itk_reason(error: Exception) -> str:
    """A short reason from a SimpleITK exception, without the ITK source locations."""
    text = str(error)
    match = re.search(r"ERROR:\s*(?:\w+\(0x[0-9a-fA-F]+\):\s*)?(.*)", text)
    reason = (match.group(1) if match else text.strip().splitlines()[-1]).strip()
    return reason[:200]


def _read_information(reader: sitk.ImageFileReader | str, path: Path) -> sitk.ImageFileReader:
    """Read the header only, turning ITK errors into an InputError."""
    if isinstance(reader, str):
        file_name, reader = reader, sitk.ImageFileReader()
        reader.SetFileName(file_name)
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        reason = _itk_reason(error)
        if "Unable to determine ImageIO" in reason or "Could not create IO object" in reason:
            raise InputError(path, "is not a readable image file (unknown format or corrupt header)") from None
        raise InputError(path, f"could not be read ({reason})") from None
    return reader


def _check_header(
    path: Path, dimension: int, size: Sequence[int], spacing: Sequence[float], components: int, max_voxels: int
) -> None:
    """Checks that need no voxels: dimension, voxel count, spacing, scalar pixels."""
    if dimension == 4 and size[3] == 1:
        size = size[:3]
        spacing = spacing[:3]
    elif dimension != 3:
        raise InputError(path, f"is a {dimension}D image of size {tuple(size)}; a 3D volume is required")
    voxels = math.prod(int(s) for s in size)
    if voxels > max_voxels:
        raise InputError(path, f"is too large: {tuple(size)} = {voxels} voxels (limit {max_voxels})")
    if components != 1:
        raise InputError(path, f"has {components} components per voxel; a scalar (grey-level) image is required")
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(path, f"has zero or negative spacing {tuple(float(s) for s in spacing)}")


def _check_nifti_voxels(path: Path) -> None:
    """Second look at NIfTI voxels with nibabel: truncated data and NaN/Inf (SimpleITK hides both).

    A plain .nii is checked against its size from the header; its voxels are read only if they are
    floating point. A .nii.gz is decompressed in full (nibabel raises on a truncated stream).
    Unscaled on-disk values are used: a finite scale keeps finite values finite.
    """
    try:
        proxy = nib.load(str(path)).dataobj
        dtype = np.dtype(proxy.dtype)
        if not path.name.lower().endswith(".gz"):
            expected = int(proxy.offset) + math.prod(proxy.shape) * dtype.itemsize
            actual = path.stat().st_size
            if actual < expected:
                raise InputError(
                    path, f"NIfTI data is truncated: the file has {actual} bytes, the header needs {expected}"
                )
            if dtype.kind not in "fc":
                return
        data = proxy.get_unscaled()
    except InputError:
        raise
    except (EOFError, OSError, ValueError) as error:
        raise InputError(path, f"NIfTI data is truncated or corrupt ({str(error).splitlines()[0][:200]})") from None
    except Exception as error:  # nibabel header errors: the file cannot be trusted
        raise InputError(path, f"NIfTI file could not be read ({type(error).__name__}: {str(error)[:200]})") from None
    if data.dtype.kind in "fc":
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise InputError(path, f"has {bad} NaN or infinite voxels")


def read_image(path: PathLike, *, series: str | None = None, max_voxels: int = 512 * 1024**2) -> sitk.Image:
    """Read a 3D image file or a DICOM series folder, check it, and return it as float32.

    The header is read first, so a file claiming a huge size is refused before any voxel is read.

    Args:
        path: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) file, or a folder
            holding a DICOM series (the largest series is used if there are several, with a warning).
        series: for a DICOM folder, the series instance UID to read (see :func:`dicom_series_ids`).
        max_voxels: refuse images with more voxels than this.

    Returns:
        A 3D float32 ``sitk.Image`` (a 4D image whose 4th size is 1 is squeezed to 3D).

    Raises:
        InputError: naming ``path`` and the problem.
    """
    path = Path(path)
    reader = _checked_reader(path, series, max_voxels, warn_several=True)
    if not path.is_dir() and path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_voxels(path)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(path, f"could not be read ({_itk_reason(error)})") from None
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            path, f"has {image.GetNumberOfComponentsPerPixel()} components per voxel; a scalar image is required"
        )
    image = sitk.Cast(image, sitk.sitkFloat32)
    validate_image(image, path)
    return image


def check_image_header(path: PathLike, *, series: str | None = None, max_voxels: int = 512 * 1024**2) -> None:
    """The checks of :func:`read_image` that need no voxels: readable header, 3D scalar, size, spacing (for a
    DICOM folder: the series' first file). For listings that must say at once which cases cannot be read (the
    review page); :func:`read_image` still checks everything when the case is read.

    Raises:
        InputError: naming ``path`` and the problem.
    """
    _checked_reader(Path(path), series, max_voxels)


def _checked_reader(path: Path, series: str | None, max_voxels: int, warn_several: bool = False):
    """The header step of :func:`read_image` and :func:`check_image_header`: link problems, the DICOM series to
    read (``series``, else the first; ``warn_several`` logs when others are left), header checks; returns the
    reader ready to ``Execute``."""
    problem = link_problem(path)
    if problem is not None:
        raise InputError(path, problem)
    if not path.is_dir():
        reader = _read_information(str(path), path)
        _check_header(path, reader.GetDimension(), reader.GetSize(), reader.GetSpacing(),
                      reader.GetNumberOfComponents(), max_voxels)
        return reader
    found = [s for s in _dicom_series(path) if series is None or s[0] == series]
    if not found:
        raise InputError(path, "folder holds no DICOM series" + (f" {series}" if series is not None else ""))
    if warn_several and series is None and len(found) > 1:
        logger.warning("%s: %d DICOM series found; using %s (%d files)", path, len(found), found[0][0], len(found[0][1]))
    files = found[0][1]
    info = _read_information(files[0], path)
    size = tuple(info.GetSize())[:2] + (len(files),)
    _check_header(path, 3, size, (1.0, 1.0, 1.0), info.GetNumberOfComponents(), max_voxels)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader


def dicom_series_files(folder: PathLike, series: str | None = None) -> list[str]:
    """The files of a DICOM series in ``folder`` in slice order (GDCM's), the largest series when ``series`` is
    None: what :func:`read_image` reads. Empty when there is no such series."""
    found = [s for s in _dicom_series(Path(folder)) if series is None or s[0] == series]
    return [str(f) for f in found[0][1]] if found else []


def validate_image(image: sitk.Image, source: PathLike | None = None) -> None:
    """Check that an image can be sliced: 3D scalar, sane geometry, >= 2 voxels per axis, finite voxels.

    Raises:
        InputError: naming ``source`` (or "image") and the problem.
    """
    source = source if source is not None else "image"
    if image.GetDimension() != 3:
        raise InputError(
            source, f"is a {image.GetDimension()}D image of size {image.GetSize()}; a 3D volume is required"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            source, f"has {image.GetNumberOfComponentsPerPixel()} components per voxel; a scalar image is required"
        )
    spacing = image.GetSpacing()
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(source, f"has zero or negative spacing {tuple(spacing)}")
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        raise InputError(source, f"has an invalid (singular or non-finite) direction matrix {tuple(direction.ravel())}")
    if not all(math.isfinite(o) for o in image.GetOrigin()):
        raise InputError(source, f"has a non-finite origin {image.GetOrigin()}")
    for axis, n in enumerate(image.GetSize()):
        if n < 2:
            raise InputError(
                source, f"has a single slice along axis {axis} (size {image.GetSize()}); a 3D volume is required"
            )
    voxels = sitk.GetArrayViewFromImage(image)
    if voxels.dtype.kind in "fc":
        bad = int(voxels.size - np.count_nonzero(np.isfinite(voxels)))
        if bad:
            raise InputError(source, f"has {bad} NaN or infinite voxels")


def choose_slice_axis(spacing: Sequence[float]) -> int:
    """The IJK axis of largest spacing; ties (1e-6 relative) go to the highest index (isotropic -> 2)."""
    spacing = np.asarray(spacing, dtype=float)
    if spacing.shape != (3,):
        raise ValueError(f"spacing must have 3 values, got {tuple(spacing)}")
    largest = spacing.max()
    return int(np.flatnonzero(spacing >= largest * (1 - 1e-6))[-1])


# --------------------------------------------------------------------------------------------
# Intensity, slicing, geometry
# --------------------------------------------------------------------------------------------


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


def _axis_map(input_direction: np.ndarray, oriented_direction: np.ndarray) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """For DICOMOrient's signed axis permutation: oriented axis k is input axis ``perm[k]``, flipped if ``flip[k]``."""
    signed = np.linalg.solve(input_direction, oriented_direction)  # column k: oriented axis k in input axes
    perm = tuple(int(np.argmax(np.abs(signed[:, k]))) for k in range(3))
    expected = np.zeros((3, 3))
    for k, i in enumerate(perm):
        expected[i, k] = np.sign(signed[i, k])
    if sorted(perm) != [0, 1, 2] or not np.allclose(signed, expected, atol=1e-4):
        raise RuntimeError(f"reorientation is not an axis permutation/flip: {signed.round(4).tolist()}")
    return perm, tuple(bool(signed[i, k] < 0) for k, i in enumerate(perm))


def _numpy_slice_axis(ijk_axis: int) -> int:
    """SimpleITK arrays are (K, J, I): IJK axis k is numpy axis 2 - k."""
    return 2 - ijk_axis


@dataclass
class SliceGeometry:
    """How slice space relates to the input image; maps slice-space results back exactly.

    Slice space is the reoriented volume with the slice axis first and the two other axes in numpy
    order: for oriented slice axis K it is (K, J, I); for J, (J, K, I); for I, (I, K, J).
    Only geometry numbers are stored, never the voxels.
    """

    slice_axis: int
    """IJK axis of the input image that was sliced."""
    num_input_slices: int
    """Input size along ``slice_axis``."""
    oriented_slice_axis: int
    """The same axis in the reoriented image."""
    axis_map: tuple[int, int, int]
    """Oriented IJK axis k is input IJK axis ``axis_map[k]``."""
    axis_flipped: tuple[bool, bool, bool]
    """Whether oriented axis k runs opposite to its input axis."""
    oriented_size: tuple[int, int, int]
    size: tuple[int, int, int]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]

    @property
    def slice_shape(self) -> tuple[int, int, int]:
        """(S, H, W): full-resolution slice space (the reoriented grid, slice axis first)."""
        shape = list(reversed(self.oriented_size))  # numpy (K, J, I)
        first = shape.pop(_numpy_slice_axis(self.oriented_slice_axis))
        return (first, *shape)

    def to_input(self, volume: np.ndarray | torch.Tensor) -> sitk.Image:
        """Map a slice-space volume onto the input image's voxel grid.

        Args:
            volume: (S', h, w) array or tensor in slice space, any resolution (e.g. per-patch maps).

        Returns:
            float32 ``sitk.Image`` with exactly the input's size, origin, spacing and direction.
        """
        if torch.is_tensor(volume):
            v = volume.detach().to("cpu", torch.float32)
        else:
            v = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
        if v.ndim != 3:
            raise ValueError(f"volume must be (S, h, w), got shape {tuple(v.shape)}")
        target = self.slice_shape
        if tuple(v.shape) != target:
            v = F.interpolate(v[None, None], size=target, mode="trilinear", align_corners=False)[0, 0]  # (S, H, W)
        oriented = np.moveaxis(v.numpy(), 0, _numpy_slice_axis(self.oriented_slice_axis))  # (K, J, I) oriented
        for k, flipped in enumerate(self.axis_flipped):
            if flipped:
                oriented = np.flip(oriented, axis=_numpy_slice_axis(k))
        axes = [0, 0, 0]
        for k, i in enumerate(self.axis_map):
            axes[_numpy_slice_axis(i)] = _numpy_slice_axis(k)
        voxels = np.ascontiguousarray(np.transpose(oriented, axes))  # (K, J, I) of the input
        image = sitk.GetImageFromArray(voxels)
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        if image.GetSize() != tuple(self.size):
            raise RuntimeError(f"mapped size {image.GetSize()} differs from the input size {self.size}")
        return image

    def importance_to_input(self, importance: np.ndarray | torch.Tensor | Sequence[float]) -> np.ndarray:
        """Map per-model-slice importance to input slice indices along :attr:`slice_axis`.

        Args:
            importance: (S',) non-negative weights, one per oriented model slice.

        Returns:
            float64 (num_input_slices,) weights summing to 1 (uniform if all are zero).
        """
        if torch.is_tensor(importance):
            a = importance.detach().to("cpu", torch.float64)
        else:
            a = torch.as_tensor(np.asarray(importance, dtype=np.float64))
        if a.ndim != 1 or a.numel() == 0:
            raise ValueError(f"importance must be a non-empty 1D sequence, got shape {tuple(a.shape)}")
        if not torch.isfinite(a).all() or (a < 0).any():
            raise ValueError("importance must be finite and non-negative")
        n = self.num_input_slices
        if a.numel() != n:
            a = F.interpolate(a[None, None], size=n, mode="linear", align_corners=False)[0, 0]
        out = a.numpy()
        if self.axis_flipped[self.oriented_slice_axis]:
            out = out[::-1]
        total = out.sum()
        return np.ascontiguousarray(out / total if total > 0 else np.full(n, 1.0 / n))


def prepare(
    image: sitk.Image, config: PreprocessConfig, source: PathLike | None = None
) -> tuple[torch.Tensor, SliceGeometry]:
    """Turn a 3D image into model slices.

    Args:
        image: 3D scalar image (checked with :func:`validate_image`).
        config: preprocessing settings.
        source: name used in error messages.

    Returns:
        ``(slices, geometry)``: slices is a contiguous float32 CPU tensor (S, M, M) in [0, 1] with
        M = ``config.input_size`` and S = ``config.num_slices`` or the input size along the slice axis;
        geometry maps slice-space results back to the input.
    """
    validate_image(image, source)
    axis = choose_slice_axis(image.GetSpacing()) if config.slice_axis == "auto" else int(config.slice_axis)
    oriented = image if config.orientation == "none" else sitk.DICOMOrient(image, config.orientation)
    perm, flips = _axis_map(
        np.asarray(image.GetDirection()).reshape(3, 3), np.asarray(oriented.GetDirection()).reshape(3, 3)
    )
    oriented_axis = perm.index(axis)
    geometry = SliceGeometry(
        slice_axis=axis,
        num_input_slices=int(image.GetSize()[axis]),
        oriented_slice_axis=oriented_axis,
        axis_map=perm,
        axis_flipped=flips,
        oriented_size=tuple(int(s) for s in oriented.GetSize()),
        size=tuple(int(s) for s in image.GetSize()),
        origin=tuple(image.GetOrigin()),
        spacing=tuple(image.GetSpacing()),
        direction=tuple(image.GetDirection()),
    )
    voxels = normalize_intensity(sitk.GetArrayViewFromImage(oriented), config)  # (K, J, I) oriented
    slices = np.moveaxis(voxels, _numpy_slice_axis(oriented_axis), 0)  # (S, H, W)
    slices = torch.from_numpy(np.ascontiguousarray(slices))
    m = config.input_size
    if slices.shape[1:] != (m, m):
        slices = F.interpolate(slices[:, None], size=(m, m), mode="bilinear", antialias=True, align_corners=False)[:, 0]
    if config.num_slices is not None and config.num_slices != slices.shape[0]:
        s = slices.shape[0]
        columns = slices.reshape(s, m * m).T[None]  # (1, M*M, S)
        columns = F.interpolate(columns, size=config.num_slices, mode="linear", align_corners=False)
        slices = columns[0].T.reshape(config.num_slices, m, m)  # (S', M, M)
    return slices.clamp_(0.0, 1.0).contiguous(), geometry


def to_model_input(slices: torch.Tensor) -> torch.Tensor:
    """Grey slices in [0, 1] to ImageNet-normalised 3-channel input, on the same device and dtype.

    Args:
        slices: (B, M, M) or (B, 1, M, M) floating tensor.

    Returns:
        (B, 3, M, M) tensor: ``(grey - mean[c]) / std[c]``.
    """
    if not torch.is_floating_point(slices):
        raise ValueError(f"slices must be a floating tensor, got {slices.dtype}")
    if slices.ndim == 3:
        slices = slices[:, None]  # (B, 1, M, M)
    if slices.ndim != 4 or slices.shape[1] != 1:
        raise ValueError(f"slices must be (B, M, M) or (B, 1, M, M), got {tuple(slices.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, device=slices.device, dtype=slices.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=slices.device, dtype=slices.dtype).view(1, 3, 1, 1)
    return (slices.expand(-1, 3, -1, -1) - mean) / std  # (B, 3, M, M)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_image_atomic(image: sitk.Image, path: PathLike) -> Path:
    """Write an image under a temporary name in the same folder, then rename it into place.

    The temporary name keeps the real suffix so SimpleITK picks the right writer
    (``.case1.nii.gz.<random>.partial.nii.gz``). Detached-header formats (.mhd, .nhdr) are refused: their
    separate data file could not be renamed with them.

    Returns:
        The written path.

    Raises:
        InputError: naming ``path``; no temporary file is left behind.
    """
    path = Path(path)
    _, suffix = split_suffix(path.name)
    if suffix.lower() in (".mhd", ".nhdr"):
        raise InputError(path, f"cannot be written atomically as {suffix} (detached data file); use .mha or .nrrd")
    try:
        with atomic_path(path, suffix) as temporary:
            sitk.WriteImage(image, str(temporary), useCompression=True)
    except Exception as error:
        reason = _itk_reason(error) if isinstance(error, RuntimeError) else str(error)
        raise InputError(path, f"could not be written ({reason})") from None
    return path

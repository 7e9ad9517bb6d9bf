"""Find, read and check 3D image files (NIfTI, NRRD, MHA/MHD, a DICOM series folder).

SimpleITK silently turns NIfTI NaN/Inf into 0 and zero-fills truncated NIfTI data, so NIfTI files get a second
look with nibabel. Headers are checked before any voxel is read, so a file claiming a huge size is refused early.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from anymc3d.contract import is_image_name, is_temporary
from anymc3d.safeio import MAX_VOXELS, link_problem
from anymc3d.errors import InputError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


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


def absolute(path: PathLike) -> str:
    """The absolute, symlink-resolved path; the plain absolute path where resolving fails (a loop)."""
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):  # Python < 3.13 raises RuntimeError on a symlink loop
        return os.path.abspath(path)


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
        elif (entry.is_file() and is_image_name(entry.name)) or (entry.is_dir() and _dicom_series(entry)):
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


def itk_reason(error: Exception) -> str:
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
        reason = itk_reason(error)
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


def read_image(path: PathLike, *, series: str | None = None, max_voxels: int = MAX_VOXELS) -> sitk.Image:
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
        raise InputError(path, f"could not be read ({itk_reason(error)})") from None
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


def check_image_header(path: PathLike, *, series: str | None = None, max_voxels: int = MAX_VOXELS) -> None:
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

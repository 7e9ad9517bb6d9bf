"""Images written atomically: under a temporary name in the target folder, renamed into place when complete."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from anymc3d.contract import split_suffix
from anymc3d.errors import InputError
from anymc3d.fileio import atomic_path
from anymc3d.image_reading import PathLike, itk_reason


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
        reason = itk_reason(error) if isinstance(error, RuntimeError) else str(error)
        raise InputError(path, f"could not be written ({reason})") from None
    return path

"""Synthetic CT-like volumes for the demo, the self-test and tests (no data download).

The phantom is drawn in the image's own IJK frame, in millimetres from the volume centre, so it
looks the same whatever the spacing, and any orthonormal direction simply rotates it in space:
air outside an elliptic body of soft tissue, two lungs, a spine, and optionally a bright lesion.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

AIR_HU, TISSUE_HU, LUNG_HU, BONE_HU = -1000.0, 40.0, -800.0, 700.0
LESION_HU = TISSUE_HU + 120.0
NOISE_SD_HU = 15.0


def _inside(coords: Sequence[np.ndarray], center: Sequence[float], radii: Sequence[float | None]) -> np.ndarray:
    """Boolean mask of an axis-aligned ellipsoid; a radius of None leaves that axis unbounded."""
    total = 0.0
    for x, c, r in zip(coords, center, radii):
        if r is not None:
            total = total + ((x - c) / r) ** 2
    return total <= 1.0


def make_ct_volume(
    size: Sequence[int] = (64, 64, 40),
    spacing: Sequence[float] = (0.8, 0.8, 2.5),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: Sequence[float] | None = None,
    lesion: bool = False,
    lesion_center: Sequence[float] | None = None,
    lesion_radius_mm: float = 8.0,
    seed: int = 0,
) -> sitk.Image:
    """A synthetic chest-CT-like float32 volume in HU.

    Args:
        size: (I, J, K) voxels, SimpleITK order; the body's cross-section lies in the I-J plane.
        spacing: (I, J, K) mm.
        origin: physical position of voxel (0, 0, 0).
        direction: orthonormal 3x3 direction matrix flattened row-major (9 values); identity if None.
        lesion: add a bright ellipsoid lesion (~120 HU above soft tissue).
        lesion_center: lesion centre as a continuous (i, j, k) voxel index; default: in the body,
            anterior to the spine between the lungs, at mid-height.
        lesion_radius_mm: lesion radius along I and K (0.8 of it along J).
        seed: seed of the noise (numpy Generator); equal seeds give equal volumes.

    Returns:
        float32 ``sitk.Image`` of the given size and geometry.
    """
    size = tuple(int(n) for n in size)
    spacing = np.asarray(spacing, dtype=float)
    extent = np.asarray(size) * spacing  # mm
    # coords[a]: mm from the volume centre along IJK axis a, arrays broadcast to numpy (K, J, I)
    coords = [
        ((np.arange(n) - (n - 1) / 2) * s).reshape([-1 if axis == a else 1 for axis in (2, 1, 0)])
        for a, (n, s) in enumerate(zip(size, spacing))
    ]
    ex, ey, ez = extent
    volume = np.full(tuple(reversed(size)), AIR_HU, dtype=np.float32)
    volume[np.broadcast_to(_inside(coords, (0, 0, 0), (0.42 * ex, 0.32 * ey, None)), volume.shape)] = TISSUE_HU
    for side in (-1, 1):
        lung = _inside(coords, (side * 0.2 * ex, -0.03 * ey, 0), (0.12 * ex, 0.2 * ey, 0.4 * ez))
        volume[np.broadcast_to(lung, volume.shape)] = LUNG_HU
    spine = _inside(coords, (0, 0.2 * ey, 0), (0.06 * min(ex, ey), 0.06 * min(ex, ey), None))
    volume[np.broadcast_to(spine, volume.shape)] = BONE_HU
    if lesion:
        if lesion_center is None:
            center_mm = (0.0, -0.12 * ey, 0.0)
        else:
            center_mm = tuple((c - (n - 1) / 2) * s for c, n, s in zip(lesion_center, size, spacing))
        r = float(lesion_radius_mm)
        volume[np.broadcast_to(_inside(coords, center_mm, (r, 0.8 * r, r)), volume.shape)] = LESION_HU
    volume += np.random.default_rng(seed).normal(0.0, NOISE_SD_HU, volume.shape).astype(np.float32)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        image.SetDirection(tuple(float(d) for d in direction))
    return image


def random_oblique_direction(seed: int) -> tuple[float, ...]:
    """A random proper rotation (det +1) that is not axis-aligned, flattened row-major (9 floats).

    Drawn uniformly (QR of a Gaussian matrix) and redrawn while any entry is within 0.1 of +-1,
    i.e. while some image axis is nearly parallel to a physical axis.
    """
    rng = np.random.default_rng(seed)
    while True:
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        if np.abs(q).max() < 0.9:
            return tuple(float(v) for v in q.ravel())


# ------------------------------------------------------------------------------------------ lesions in real anatomy
def _ellipsoid_mask(shape: Sequence[int], center: np.ndarray, radii_vox: np.ndarray) -> np.ndarray:
    """Boolean (shape) ellipsoid of ``radii_vox`` around ``center`` (voxel indices, same axis order)."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii_vox)) <= 1.0


def anatomy_lesion_case(
    template: np.ndarray,
    white_matter: np.ndarray,
    rng: np.random.Generator,
    lesion: bool,
    spacing_mm: float = 2.0,
    radius_mm: tuple[float, float] = (12.0, 16.0),
    contrast: float = 0.8,
    max_rotation_deg: float = 15.0,
    scale: tuple[float, float] = (0.9, 1.1),
    max_shift_mm: float = 8.0,
    max_crop: int = 8,
    gain: tuple[float, float] = (0.8, 1.25),
    bias: float = 0.2,
    noise: tuple[float, float] = (0.01, 0.03),
) -> tuple[sitk.Image, sitk.Image]:
    """A real-anatomy case for training and measuring localisation: a template volume (e.g. nilearn's MNI152 T1 at
    2 mm) randomly rotated, scaled, shifted and cropped, with a random gain, a smooth multiplicative bias field and
    Gaussian noise; with ``lesion``, an ellipsoid (radii ``radius_mm``) brightened by ``contrast`` times the mean
    white-matter intensity is placed in the white matter first, so it is deformed with the anatomy.

    Args:
        template: (X, Y, Z) intensities, isotropic ``spacing_mm``.
        white_matter: (X, Y, Z) white-matter probability of the template (lesion centres are drawn where > 0.9).

    Returns:
        (image, mask): int16 image (the template's range times 1000) and its uint8 lesion mask, same geometry.
    """
    vol = np.asarray(template, dtype=np.float32)
    mask = np.zeros(vol.shape, np.uint8)
    if lesion:
        wm = np.asarray(white_matter) > 0.9
        radii = rng.uniform(*radius_mm, 3) / spacing_mm
        margin = int(np.ceil(radii.max())) + max_crop + 4
        centres = np.argwhere(wm)
        centres = centres[(centres >= margin).all(1) & (centres < np.array(vol.shape) - margin).all(1)]
        mask = _ellipsoid_mask(vol.shape, centres[rng.integers(len(centres))], radii).astype(np.uint8)
        vol = vol + mask * contrast * float(vol[wm].mean())
    image = sitk.GetImageFromArray(np.ascontiguousarray(vol.transpose(2, 1, 0)))  # numpy (x, y, z) -> sitk (i, j, k)
    image.SetSpacing((spacing_mm,) * 3)
    lesion_image = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0)))
    lesion_image.CopyInformation(image)
    size = np.array(image.GetSize())
    centre = image.TransformContinuousIndexToPhysicalPoint([float(c) for c in (size - 1) / 2])
    transform = sitk.Similarity3DTransform()
    transform.SetCenter(centre)
    axis = rng.normal(size=3)
    transform.SetRotation(tuple(float(a) for a in axis / np.linalg.norm(axis)),
                          float(np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg))))
    transform.SetScale(float(rng.uniform(*scale)))
    transform.SetTranslation(tuple(float(t) for t in rng.uniform(-max_shift_mm, max_shift_mm, 3)))
    lo = rng.integers(0, max_crop + 1, 3)
    out_size = size - lo - rng.integers(0, max_crop + 1, 3)
    reference = sitk.Image([int(s) for s in out_size], sitk.sitkFloat32)
    reference.SetSpacing(image.GetSpacing())
    reference.SetOrigin(image.TransformIndexToPhysicalPoint([int(v) for v in lo]))
    moved = sitk.Resample(image, reference, transform, sitk.sitkLinear, 0.0)
    moved_mask = sitk.Resample(lesion_image, reference, transform, sitk.sitkNearestNeighbor, 0)
    x = sitk.GetArrayFromImage(moved)  # (k, j, i)
    coords = np.meshgrid(*[np.linspace(-1, 1, n) for n in x.shape], indexing="ij")
    field = sum(c * g for c, g in zip(rng.uniform(-bias, bias, 3), coords))
    field = field + sum(c * g * g for c, g in zip(rng.uniform(-bias, bias, 3) / 2, coords))
    x = x * np.exp(field) * rng.uniform(*gain)
    x = x + rng.normal(0.0, rng.uniform(*noise) * float(template.max()), x.shape)
    out = sitk.GetImageFromArray(np.clip(x * 1000.0, -32000, 32000).astype(np.int16))
    out.CopyInformation(moved)
    moved_mask = sitk.Cast(moved_mask, sitk.sitkUInt8)
    moved_mask.CopyInformation(moved)
    return out, moved_mask

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

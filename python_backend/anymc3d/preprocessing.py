"""Slice 3D CT/MRI volumes for a 2D ViT, and map slice-space results back.

AnyMC3D encodes a volume slice by slice with a 2D foundation model. :func:`prepare` turns a checked 3D image
(:mod:`anymc3d.image_reading`) into a (S, M, M) tensor of slices in [0, 1]:

1. the slice axis is the input's IJK axis of largest spacing (or the configured one);
2. the volume is reoriented to a canonical orientation with ``sitk.DICOMOrient``, which only
   permutes and flips axes, so the mapping back is exact;
3. intensities are windowed (CT) or normalised (MRI) to [0, 1] (:mod:`anymc3d.intensity`);
4. slices are resized in-plane (and optionally resampled in number) with torch.

:class:`SliceGeometry` records what was done, so a heatmap in slice space can be written with
exactly the input image's size, origin, spacing and direction, even for oblique anisotropic inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from anymc3d.image_reading import PathLike, validate_image
from anymc3d.intensity import image_modality, normalize_intensity, resolve_intensity, warn_if_blank
from anymc3d.preprocess_config import PreprocessConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def choose_slice_axis(spacing: Sequence[float]) -> int:
    """The IJK axis of largest spacing; ties (1e-6 relative) go to the highest index (isotropic -> 2)."""
    spacing = np.asarray(spacing, dtype=float)
    if spacing.shape != (3,):
        raise ValueError(f"spacing must have 3 values, got {tuple(spacing)}")
    largest = spacing.max()
    return int(np.flatnonzero(spacing >= largest * (1 - 1e-6))[-1])


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
    raw = sitk.GetArrayViewFromImage(oriented)  # (K, J, I) oriented
    modality = image_modality({k: image.GetMetaData(k) for k in image.GetMetaDataKeys()})
    config = resolve_intensity(config, float(raw.min()), modality)
    voxels = normalize_intensity(raw, config)
    warn_if_blank(voxels, config, source)
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

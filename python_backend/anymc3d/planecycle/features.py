"""Volume features from a lifted (PlaneCycle) or slice-wise 2D backbone, written as .npy files, and
seed-point similarity maps in the input image's geometry.

This is the contract behind ``anymc3d features`` and ``anymc3d similarity`` (see docs/planecycle.md):
every array is float32 and taken after the model's final norm; patch tokens are (D, h, w, C), global tokens
(D, g, C) with CLS first, then registers; the volume embedding is the mean over slices of the CLS tokens.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anymc3d.backbone import load_backbone
from anymc3d.engine import Engine
from anymc3d.errors import InputError
from anymc3d.fileio import atomic_path, write_text_atomic
from anymc3d.planecycle.config import PlaneCycleConfig
from anymc3d.planecycle.converter import VolumeFeatures
from anymc3d.image_reading import read_image
from anymc3d.preprocess_config import PreprocessConfig
from anymc3d.preprocessing import SliceGeometry, prepare, to_model_input

logger = logging.getLogger(__name__)

MODES = ("planecycle", "slicewise")


# ------------------------------------------------------------------------------------------------
# Backbone and input
# ------------------------------------------------------------------------------------------------


def load_model(path: Path, arch: str | None = None) -> tuple[nn.Module, str]:
    """The backbone for features: ``(model, fingerprint)``, through the one loader of every command.

    Args:
        path: a backbone file (ours, an official checkpoint, a plain timm state dict), a transformers checkpoint
            folder or a cached catalog name.
        arch: None (the architecture from the file or its tensors), a short name (e.g. 'dinov2_vits14_reg') or a
            timm model name (e.g. 'vit_small_patch14_reg4_dinov2') that the file must hold.
    """
    loaded = load_backbone(path, arch=arch)
    return loaded.model, loaded.fingerprint


def read_npy_volume(path: Path) -> Tensor:
    """A (D, 3, H, W) float32 array of normalised slices, used as is; InputError naming the file otherwise."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # missing, truncated, pickled or not a .npy file
        raise InputError(path, f"cannot be read as a .npy array ({type(exc).__name__}: {exc})") from None
    if array.dtype != np.float32 or array.ndim != 4 or array.shape[1] != 3 or min(array.shape) < 1:
        raise InputError(path, f"must be a float32 (D, 3, H, W) array, got {array.dtype} {array.shape}")
    if not np.isfinite(array).all():
        raise InputError(path, "holds NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(array))


def read_volume(path: Path, config: PreprocessConfig) -> tuple[Tensor, SliceGeometry | None]:
    """INPUT of the CLI: ``(slices (D, 3, H, W), geometry)``; a .npy file has no geometry."""
    path = Path(path)
    if path.suffix == ".npy":
        return read_npy_volume(path), None
    image = read_image(path)
    slices, geometry = prepare(image, config, source=path)  # (D, M, M) in [0, 1]
    return to_model_input(slices), geometry  # (D, 3, M, M)


# ------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------


#: ``--mode`` -> the engine's encoder kind that computes it
KINDS = {"planecycle": "planecycle", "slicewise": "slice_lora"}


def compute_features(model: nn.Module, volume: Tensor, mode: str = "planecycle",
                     config: PlaneCycleConfig | None = None, layers: Sequence[int] = (),
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> VolumeFeatures:
    """Features of one volume, on ``device`` with the backbone in ``dtype``, returned on the CPU in float32.

    The backbone runs in an :class:`~anymc3d.engine.Engine` (its device and precision handling) through the
    encoder kind of ``mode`` (:meth:`Engine.features`), as plugins' slices do.

    Args:
        model: timm DINOv2/DINOv3 backbone (moved to ``device`` and cast to ``dtype`` in place).
        volume: (D, 3, H, W) normalised slices.
        mode: 'planecycle' (lifted) or 'slicewise' (the 2D model on every slice).
        config: the lifting settings (planecycle mode only).
        layers: 0-based block indices whose outputs to return too.
        dtype: the backbone's precision (:func:`anymc3d.device.resolve_precision`).

    Returns:
        :class:`VolumeFeatures` with batch size 1.
    """
    if mode not in MODES:
        raise ValueError(f"mode: must be one of {MODES}, got {mode!r}")
    options = (config or PlaneCycleConfig()).to_dict() if mode == "planecycle" else {}
    return Engine(model, device=device, precision=dtype).features(volume, KINDS[mode], layers, **options)


def _save_npy(array: Tensor | np.ndarray, path: Path) -> Path:
    data = np.ascontiguousarray(array.numpy() if torch.is_tensor(array) else array, dtype=np.float32)
    with atomic_path(path, ".npy") as tmp:
        np.save(tmp, data)
    return path


def write_features(feats: VolumeFeatures, out: Path, meta: dict) -> list[Path]:
    """Write the arrays of one volume (batch size 1) and ``features.json`` into ``out``.

    Each file is written under a temporary name and renamed; if any write fails, the files this call
    already wrote are removed, so ``out`` never holds a partial set from this run.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"patch_tokens": feats.patch_tokens[0], "global_tokens": feats.global_tokens[0],
              "volume_embedding": feats.volume_embedding[0]}
    for i, (patch, glob) in sorted(feats.layers.items()):
        arrays[f"layer{i}_patch_tokens"] = patch[0]
        arrays[f"layer{i}_global_tokens"] = glob[0]
    written: list[Path] = []
    try:
        for name, array in arrays.items():
            written.append(_save_npy(array, out / f"{name}.npy"))
        shapes = {name: list(array.shape) for name, array in arrays.items()}
        written.append(write_text_atomic(out / "features.json", json.dumps({**meta, "arrays": shapes}, indent=2)))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


# ------------------------------------------------------------------------------------------------
# Seed-point similarity
# ------------------------------------------------------------------------------------------------


def seed_to_slice(geometry: SliceGeometry, ijk: Sequence[int]) -> tuple[int, int, int]:
    """The full-resolution slice-space index (s, y, x) of input voxel ``ijk`` (SimpleITK/Slicer IJK order).

    Inverts the index permutation and flips of :meth:`SliceGeometry.to_input` (no interpolation involved).
    """
    if len(ijk) != 3 or any(not 0 <= int(v) < n for v, n in zip(ijk, geometry.size)):
        raise ValueError(f"seed: voxel {tuple(ijk)} is outside the image of size {geometry.size} (i, j, k)")
    oriented = [0, 0, 0]  # oriented IJK index
    for k, axis in enumerate(geometry.axis_map):
        index = int(ijk[axis])
        oriented[k] = geometry.oriented_size[k] - 1 - index if geometry.axis_flipped[k] else index
    numpy_index = oriented[::-1]  # (K, J, I) of the oriented image
    first = 2 - geometry.oriented_slice_axis
    rest = [v for n, v in enumerate(numpy_index) if n != first]
    return numpy_index[first], rest[0], rest[1]


def seed_token(geometry: SliceGeometry, ijk: Sequence[int], grid: Sequence[int]) -> tuple[int, int, int]:
    """The (d, y, x) token whose cell holds input voxel ``ijk``, on the (D, h, w) token grid.

    Token (d, y, x) covers the slice-space box [d, d+1) * S/D x [y, y+1) * H/h x [x, x+1) * W/w, the cells that
    :meth:`SliceGeometry.to_input`'s interpolation (align_corners=False) puts token centres in.
    """
    index = seed_to_slice(geometry, ijk)
    return tuple(min(n - 1, (v * n) // full) for v, n, full in zip(index, grid, geometry.slice_shape))


def cosine_map(patch_tokens: Tensor, token: Sequence[int]) -> Tensor:
    """(D, h, w, C) features, seed token (d, y, x) -> (D, h, w) cosine similarity to the seed's feature."""
    seed = patch_tokens[tuple(token)]  # (C,)
    return F.cosine_similarity(patch_tokens, seed.expand_as(patch_tokens), dim=-1)  # (D, h, w)


@dataclass
class SimilarityResult:
    image: sitk.Image
    """cosine similarity in the input geometry (float32)."""
    token_map: Tensor
    """(D, h, w) cosine similarity on the token grid."""
    token: tuple[int, int, int]
    """seed token (d, y, x)."""


def similarity(model: nn.Module, image_path: Path, ijk: Sequence[int], mode: str = "planecycle",
               config: PlaneCycleConfig | None = None, preprocess: PreprocessConfig | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> SimilarityResult:
    """Seed-point similarity map of an image file, upsampled to the input geometry like heatmaps."""
    volume, geometry = read_volume(Path(image_path), preprocess or PreprocessConfig())
    if geometry is None:
        raise InputError(image_path, "similarity needs an image file (its geometry), not a .npy array")
    feats = compute_features(model, volume, mode, config, device=device, dtype=dtype)
    tokens = feats.patch_tokens[0]  # (D, h, w, C)
    try:
        token = seed_token(geometry, ijk, tokens.shape[:3])
    except ValueError as exc:
        raise InputError(image_path, str(exc)) from None
    token_map = cosine_map(tokens, token)
    return SimilarityResult(image=geometry.to_input(token_map), token_map=token_map, token=token)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * (a & b).sum() / total)


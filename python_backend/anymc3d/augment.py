"""nnU-Net-style 3D data augmentation (Isensee et al. 2021, its default "DA5"-like set), with MONAI.

MONAI was chosen over TorchIO because its dictionary transforms take torch tensors already in memory (no
Subject/ScalarImage wrapping of each case) and include nnU-Net's low-resolution simulation and
contrast-with-fixed-mean transforms as such.

The transforms act on the case's 3D volume on the model grid (slice axis first, (S, M, M)), before its slices
go through the backbone; the mask (if any) follows every spatial transform with nearest interpolation.
Rotation is mostly in-plane (slices are often far thicker than pixels). Each transform has its own
probability; every application is seeded from (seed, epoch, case), so training is reproducible and resumable.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch


@dataclass
class AugmentConfig:
    """Probabilities and ranges of the augmentations: nnU-Net's set, with milder ranges and probabilities than
    its 1000-epoch defaults (a plugin trains for tens of epochs; with nnU-Net's strengths a 5-8 mm lesion on a
    56-pixel slice grid was blurred away often enough that 12 epochs learned nothing (held-out AUROC 0.83
    against 1.0 without augmentation, same data))."""

    p_flip: float = 0.5              # per axis
    p_rotate: float = 0.2
    rotate_inplane_deg: float = 15.0
    rotate_outofplane_deg: float = 5.0
    p_zoom: float = 0.2
    zoom_range: tuple[float, float] = (0.9, 1.1)
    p_translate: float = 0.2
    translate_fraction: float = 0.05
    p_noise: float = 0.1
    noise_std: float = 0.02
    p_blur: float = 0.1
    blur_sigma: tuple[float, float] = (0.3, 0.6)
    p_brightness: float = 0.15
    brightness: float = 0.15          # multiplicative, v * (1 + U(-b, b))
    p_contrast: float = 0.15
    contrast: float = 0.15            # around the mean
    p_lowres: float = 0.1
    lowres_range: tuple[float, float] = (0.7, 1.0)
    p_gamma: float = 0.15
    gamma_range: tuple[float, float] = (0.8, 1.25)

    def __post_init__(self):
        for name, value in asdict(self).items():
            if name.startswith("p_") and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: a probability in [0, 1] is required, got {value!r}")
        if not 0 < self.zoom_range[0] <= self.zoom_range[1]:
            raise ValueError(f"zoom_range: need 0 < low <= high, got {self.zoom_range!r}")
        if not 0 < self.gamma_range[0] <= self.gamma_range[1]:
            raise ValueError(f"gamma_range: need 0 < low <= high, got {self.gamma_range!r}")
        if not 0 < self.lowres_range[0] <= self.lowres_range[1] <= 1:
            raise ValueError(f"lowres_range: need 0 < low <= high <= 1, got {self.lowres_range!r}")

    @classmethod
    def off(cls) -> "AugmentConfig":
        """Every probability 0: the identity."""
        return cls(**{k: (0.0 if k.startswith("p_") else v) for k, v in asdict(cls()).items()})


class Augmenter:
    """Applies :class:`AugmentConfig` to a (S, M, M) volume in [0, 1] and its optional (S, M, M) mask."""

    def __init__(self, config: AugmentConfig):
        from monai import transforms as T

        c = config
        self.config = c
        both, img = ["image", "mask"], ["image"]
        rad_in, rad_out = np.deg2rad(c.rotate_inplane_deg), np.deg2rad(c.rotate_outofplane_deg)
        # tensors are (1, S, M, M): MONAI's spatial axes 0 = slice axis, 1 and 2 in-plane
        self.spatial = T.Compose([
            *(T.RandFlipd(both, prob=c.p_flip, spatial_axis=axis, allow_missing_keys=True) for axis in (0, 1, 2)),
            T.RandRotated(both, range_x=rad_in, range_y=rad_out, range_z=rad_out, prob=c.p_rotate, keep_size=True,
                          mode=("bilinear", "nearest"), padding_mode="border", allow_missing_keys=True),
            T.RandZoomd(both, prob=c.p_zoom, min_zoom=c.zoom_range[0], max_zoom=c.zoom_range[1], keep_size=True,
                        mode=("trilinear", "nearest"), padding_mode="edge", allow_missing_keys=True),
            T.RandAffined(both, prob=c.p_translate, mode=("bilinear", "nearest"), padding_mode="border",
                          translate_range=None, allow_missing_keys=True),
        ])
        self._translate = self.spatial.transforms[-1]
        self.intensity = T.Compose([
            T.RandGaussianNoised(img, prob=c.p_noise, std=c.noise_std),
            T.RandGaussianSmoothd(img, prob=c.p_blur, sigma_x=c.blur_sigma, sigma_y=c.blur_sigma, sigma_z=c.blur_sigma),
            T.RandScaleIntensityd(img, prob=c.p_brightness, factors=c.brightness),
            T.RandScaleIntensityFixedMeand(img, prob=c.p_contrast, factors=c.contrast, preserve_range=True),
            T.RandSimulateLowResolutiond(img, prob=c.p_lowres, zoom_range=c.lowres_range),
            T.RandAdjustContrastd(img, prob=c.p_gamma, gamma=c.gamma_range),
        ])

    def __call__(self, volume: torch.Tensor, mask: Optional[torch.Tensor], seed: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Augment one case with the randomness of ``seed``.

        Args:
            volume: (S, M, M) float in [0, 1]; mask: (S, M, M) 0/1 or None.

        Returns:
            (S, M, M) volume clamped to [0, 1], and the mask (0/1) or None.
        """
        from monai.transforms.utils import convert_to_tensor

        shape = volume.shape
        self._translate.rand_affine.rand_affine_grid.translate_range = [
            (-self.config.translate_fraction * n, self.config.translate_fraction * n) for n in shape]
        self.spatial.set_random_state(seed=seed % 2 ** 32)
        self.intensity.set_random_state(seed=(seed * 7919 + 1) % 2 ** 32)
        data = {"image": volume[None].float()}
        if mask is not None:
            data["mask"] = mask[None].float()
        data = self.intensity(self.spatial(data))
        out = convert_to_tensor(data["image"], track_meta=False)[0].clamp(0.0, 1.0).contiguous()
        out_mask = None if mask is None else (convert_to_tensor(data["mask"], track_meta=False)[0] > 0.5).float()
        return out, out_mask

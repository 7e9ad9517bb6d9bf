"""Auxiliary pixel supervision: a light nnU-Net-style 3D decoder on the backbone's last-block patch tokens.

The patch tokens of a volume's slices, stacked, form a pseudo-3D token volume (C, S, h, w); two conv blocks
(conv, instance norm, leaky ReLU 0.01, as in nnU-Net), one in-plane transposed-conv upsampling and a 1x1x1
conv give voxel logits, resized to the slice grid (S, M, M). Used only while training, on cases with masks;
not part of the inference plugin unless asked for.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _block(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, kernel, padding=kernel // 2), nn.InstanceNorm3d(cout, affine=True),
                         nn.LeakyReLU(0.01, inplace=True))


class SegDecoder(nn.Module):
    """Patch tokens (B, S, h, w, C) -> voxel logits (B, S, M, M) of one foreground class."""

    def __init__(self, embed_dim: int, *, width: int = 32):
        """
        Args:
            embed_dim: backbone width C.
            width: channels of the decoder's conv blocks.
        """
        super().__init__()
        self.reduce = _block(embed_dim, width, 1)
        self.context = _block(width, width, 3)
        self.up = nn.Sequential(nn.ConvTranspose3d(width, width // 2, kernel_size=(1, 2, 2), stride=(1, 2, 2)),
                                nn.InstanceNorm3d(width // 2, affine=True), nn.LeakyReLU(0.01, inplace=True))
        self.out = nn.Conv3d(width // 2, 1, 1)

    def forward(self, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = tokens.permute(0, 4, 1, 2, 3).float()               # (B, C, S, h, w)
        x = self.up(self.context(self.reduce(x)))              # (B, width/2, S, 2h, 2w)
        x = self.out(x)                                         # (B, 1, S, 2h, 2w)
        x = F.interpolate(x, size=(x.shape[2], *size), mode="trilinear", align_corners=False)
        return x[:, 0]                                          # (B, S, M, M)

"""The PlaneCycle operator: one pretrained 2D block applied to one plane of a token volume.

PlaneCycle (HINTLab, "Training-Free 2D-to-3D Lifting of Foundation Models Without Adapters") runs the
unchanged blocks of a 2D ViT on a (D, h, w) volume of patch tokens, each block on one plane:

- ``HW``: D sequences over (h, w) -- exactly the 2D model on every slice;
- ``DW``: h sequences over (D, w);
- ``DH``: w sequences over (D, h).

Each sequence is row-major in the order named: the plane's normal axis is moved to the front and the two
other axes are flattened in their original order. Every sequence starts with the global tokens
(CLS + registers). Between blocks those travel at slice resolution D; entering a block with P sequences
they become P sets:

- ``pcg`` (PCg, the default): adaptive average pooling along the slice axis from D to P, separately for every
  token and channel (identity when P = D);
- ``pcm`` (PCm): their mean over D, repeated P times, on every block, HW blocks included.

Leaving the block, the P output sets are adaptive-average-pooled back to D (both variants), so pooling always
goes through D, never from one plane's P straight to the next plane's.

This module is pure torch: it knows nothing about timm. Positions are the caller's business; for rotary
embeddings it takes ``rope``, a function from the active plane's grid (a, b) to the embedding, and calls
``block(tokens, rope=rope((a, b)))``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from anymc3d.planecycle.config import PLANES, VARIANTS

#: the axis of (B, D, H, W, C) normal to each plane: it indexes the plane's sequences
NORMAL_AXIS: dict[str, int] = {"HW": 1, "DW": 2, "DH": 3}


def _check_plane(plane: str) -> None:
    if plane not in NORMAL_AXIS:
        raise ValueError(f"plane: must be one of {PLANES}, got {plane!r}")


def plane_grid(plane: str, depth: int, height: int, width: int) -> tuple[int, int]:
    """The (a, b) token grid of one sequence of ``plane``: (h, w), (D, w) or (D, h)."""
    _check_plane(plane)
    return {"HW": (height, width), "DW": (depth, width), "DH": (depth, height)}[plane]


def num_sequences(plane: str, depth: int, height: int, width: int) -> int:
    """P, the number of sequences of ``plane``: D, h or w."""
    _check_plane(plane)
    return {"HW": depth, "DW": height, "DH": width}[plane]


def plane_at(cycle: tuple[str, ...], block_index: int) -> str:
    """The plane of block ``block_index``: ``cycle[i mod len(cycle)]``."""
    return cycle[block_index % len(cycle)]


def pool_slices(tokens: Tensor, size: int) -> Tensor:
    """Adaptive average pooling along axis 1, separately for every token and channel.

    Args:
        tokens: (B, N, G, C) global tokens of N slices or sequences.
        size: output length along axis 1.

    Returns:
        (B, size, G, C); ``tokens`` itself when N == size.
    """
    b, n, g, c = tokens.shape
    if n == size:
        return tokens
    rows = tokens.permute(0, 2, 3, 1).reshape(b * g * c, 1, n)  # (B*G*C, 1, N)
    pooled = F.adaptive_avg_pool1d(rows, size)  # (B*G*C, 1, size)
    return pooled.reshape(b, g, c, size).permute(0, 3, 1, 2)  # (B, size, G, C)


def enter_globals(global_tokens: Tensor, num_seq: int, variant: str) -> Tensor:
    """The global tokens that enter a block with ``num_seq`` sequences.

    Args:
        global_tokens: (B, D, G, C) per-slice global tokens.
        num_seq: P.
        variant: 'pcg' (adaptive average pooling D -> P) or 'pcm' (mean over D, repeated P times).

    Returns:
        (B, P, G, C)
    """
    if variant == "pcg":
        return pool_slices(global_tokens, num_seq)
    if variant == "pcm":
        b, _, g, c = global_tokens.shape
        return global_tokens.mean(dim=1, keepdim=True).expand(b, num_seq, g, c)  # (B, P, G, C)
    raise ValueError(f"variant: must be one of {VARIANTS}, got {variant!r}")


def plane_cycle(patch_tokens: Tensor, global_tokens: Tensor, block: Callable[..., Tensor], plane: str,
                variant: str = "pcg", rope: Callable[[tuple[int, int]], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Run one 2D block on every sequence of ``plane``.

    Args:
        patch_tokens: (B, D, H, W, C) patch-token volume.
        global_tokens: (B, D, G, C) global tokens per slice (CLS first, then registers).
        block: the unchanged 2D block; called as ``block(t)`` or ``block(t, rope=...)`` on t (B*P, G + a*b, C).
        plane: 'HW', 'DW' or 'DH'.
        variant: 'pcg' or 'pcm' (see the module docstring).
        rope: optional function from the plane's grid (a, b) to the rotary embedding the block expects.

    Returns:
        ``(patch_tokens, global_tokens)``: (B, D, H, W, C) and (B, D, G, C).
    """
    _check_plane(plane)
    b, d, c = patch_tokens.shape[0], patch_tokens.shape[1], patch_tokens.shape[-1]
    g = global_tokens.shape[2]
    axis = NORMAL_AXIS[plane]
    p = patch_tokens.shape[axis]
    planes = patch_tokens.movedim(axis, 1)  # (B, P, a, b, C), (a, b) in their original order
    grid = tuple(planes.shape[2:4])
    seq = planes.reshape(b * p, grid[0] * grid[1], c)  # (B*P, a*b, C) row-major over (a, b)
    glob = enter_globals(global_tokens, p, variant).reshape(b * p, g, c)  # (B*P, G, C)
    tokens = torch.cat([glob, seq], dim=1)  # (B*P, G + a*b, C)
    out = block(tokens) if rope is None else block(tokens, rope=rope(grid))  # (B*P, G + a*b, C)
    patches = out[:, g:].reshape(b, p, *grid, c).movedim(1, axis)  # (B, D, H, W, C)
    glob = pool_slices(out[:, :g].reshape(b, p, g, c), d)  # (B, D, G, C)
    return patches, glob

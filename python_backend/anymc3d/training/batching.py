"""Cases padded into batches, and the per-case seed every random draw derives from (so a resumed run draws
what an uninterrupted one draws)."""
from __future__ import annotations

from typing import Sequence

import torch

from anymc3d.data import PreparedCase


def case_seed(seed: int, epoch: int, row: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + row * 101) % (2 ** 31)


def collate(items: Sequence[PreparedCase], num_views: int):
    """Pad cases to a batch: per view (B, S_max, M, M) slices and (B, S_max) masks; targets; seg masks."""
    views, masks = [], []
    for v in range(num_views):
        s_max = max(item.views[v].shape[0] for item in items)
        m = items[0].views[v].shape[-1]
        x = torch.zeros(len(items), s_max, m, m)
        real = torch.zeros(len(items), s_max, dtype=torch.bool)
        for b, item in enumerate(items):
            s = item.views[v].shape[0]
            x[b, :s], real[b, :s] = item.views[v], True
        views.append(x), masks.append(real)
    targets = torch.stack([item.target for item in items])
    return views, masks, targets


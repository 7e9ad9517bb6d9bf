"""Task-query attention pooling: a learnable query weighs slices (or views) into one embedding.

a = softmax(H q / sqrt(d)), v = a^T H. The weights a are the slice importance that the heatmap uses.
Close to timm's ``AttentionPoolLatent`` but with a single head, no projections and exposed weights,
as the paper defines it, so it is written here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class TaskQueryPool(nn.Module):
    """Single learnable query attending over a set of embeddings."""

    def __init__(self, embed_dim: int, *, device=None, dtype=None):
        """
        Args:
            embed_dim: width C of the embeddings pooled.
            device, dtype: where the query is created.
        """
        super().__init__()
        self.embed_dim = embed_dim
        self.scale = embed_dim ** -0.5
        self.query = nn.Parameter(torch.empty(embed_dim, device=device, dtype=dtype))
        nn.init.trunc_normal_(self.query, std=0.02)

    def forward(self, h: torch.Tensor, mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool a set of embeddings.

        Args:
            h: (B, S, C) embeddings (slices of a volume, or views of a case).
            mask: optional (B, S) bool, True where an element is real (padding is False).

        Returns:
            v: (B, C) pooled embedding; a: (B, S) weights summing to 1 over S.
        """
        scores = (h @ self.query.to(h.dtype)) * self.scale  # (B, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        a = scores.float().softmax(dim=-1).to(h.dtype)  # (B, S)
        v = torch.einsum("bs,bsc->bc", a, h)  # (B, C)
        return v, a

"""Linear head on lifted features, with an exact additive heatmap (the core of a lifted-feature plugin kind).

The head sees the mean of the lifted patch tokens p_t over the T real tokens of a volume:

    logit_k = w_k · (1/T) Σ_t p_t + b_k = Σ_t (w_k · p_t) / T + b_k

so each token's contribution c_kt = (w_k · p_t) / T is additive and faithful: the contributions sum to the logit
minus the bias, exactly. The heatmap of finding k is c_k on the (D, h, w) token grid (signed, in logit units),
mapped to the input geometry with ``SliceGeometry.to_input`` like every heatmap. Fitting uses scikit-learn's
logistic regression (a maintained solver) on the mean tokens and copies its coefficients into the head.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class MeanTokenHead(nn.Module):
    """logits = Linear(mean of the patch tokens of the real slices)."""

    def __init__(self, embed_dim: int, num_classes: int, *, device=None, dtype=None):
        """
        Args:
            embed_dim: token width C.
            num_classes: number of findings K (one logistic output each).
            device, dtype: where the parameters are created.
        """
        super().__init__()
        self.embed_dim, self.num_classes = embed_dim, num_classes
        self.head = nn.Linear(embed_dim, num_classes, device=device, dtype=dtype)

    @staticmethod
    def _weights(patch_tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, D, h, w) token weights 1/T at real slices, 0 at padding."""
        b, d, h, w, _ = patch_tokens.shape
        real = torch.ones(b, d, dtype=patch_tokens.dtype, device=patch_tokens.device) if mask is None \
            else mask.to(patch_tokens.device, patch_tokens.dtype)  # (B, D)
        per_token = real / (real.sum(dim=1, keepdim=True) * h * w)  # (B, D)
        return per_token[:, :, None, None].expand(b, d, h, w)

    def pool(self, patch_tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D, h, w, C) tokens, (B, D) bool mask -> (B, C) mean over the real tokens."""
        weights = self._weights(patch_tokens, mask)
        return torch.einsum("bdhw,bdhwc->bc", weights, patch_tokens)

    def forward(self, patch_tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D, h, w, C) -> (B, K) logits."""
        return self.head(self.pool(patch_tokens, mask))

    def contributions(self, patch_tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D, h, w, C) -> (B, K, D, h, w) per-token contributions; they sum to logits - bias."""
        weights = self._weights(patch_tokens, mask)  # (B, D, h, w)
        return token_terms(self.head.weight, patch_tokens).movedim(0, 1) * weights[:, None]

    @torch.no_grad()
    def fit(self, pooled: np.ndarray, labels: np.ndarray, c: float = 1.0) -> MeanTokenHead:
        """Fit each finding's logistic regression on mean tokens (N, C) with 0/1 labels (N, K); returns self."""
        from sklearn.linear_model import LogisticRegression

        labels = np.asarray(labels).reshape(len(pooled), -1)
        if labels.shape[1] != self.num_classes:
            raise ValueError(f"labels: expected {self.num_classes} columns, got {labels.shape[1]}")
        for k in range(self.num_classes):
            model = LogisticRegression(C=c, max_iter=2000).fit(np.asarray(pooled, np.float64), labels[:, k])
            self.head.weight[k] = torch.as_tensor(model.coef_[0], dtype=self.head.weight.dtype)
            self.head.bias[k] = float(model.intercept_[0])
        return self


def token_terms(weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(K, C) head weights, (..., C) tokens -> (K, ...) terms w_k · p_t: the linear head's per-token share of the
    logit before the pooling's weights (the one formula of every contribution map)."""
    return torch.einsum("...c,kc->k...", tokens, weight)

"""Training losses: focal loss for the findings (multi-label or multi-class) and Dice + cross-entropy for the
auxiliary segmentation decoder.

Focal loss (Lin et al. 2017): FL = -alpha_t (1 - p_t)^gamma log p_t. The multi-label form is the one of
``torchvision.ops.sigmoid_focal_loss`` (tested against it); the multi-class form applies the same modulation
to the softmax probability of the true class. Written here because torchvision has no softmax form and the
two must share defaults (gamma 2, alpha 0.25).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from anymc3d.contract import TASKS


@dataclass
class FocalLossConfig:
    """Focal-loss settings (the paper: gamma 2, alpha 0.25)."""

    gamma: float = 2.0
    alpha: float = 0.25

    def __post_init__(self):
        if not self.gamma >= 0:
            raise ValueError(f"gamma: must be >= 0, got {self.gamma!r}")
        if not (self.alpha < 0 or 0 <= self.alpha <= 1):
            raise ValueError(f"alpha: must be in [0, 1] (or negative to disable), got {self.alpha!r}")


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0,
                       alpha: float = 0.25) -> torch.Tensor:
    """Multi-label focal loss, mean over cases and findings.

    Args:
        logits: (B, K) raw scores; targets: (B, K) in {0, 1} (float).
        alpha: weight of the positives (negatives get 1 - alpha); negative: no weighting.
    """
    targets = targets.to(logits.dtype)
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # (B, K)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.mean()


def softmax_focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0,
                       alpha: float = 0.25) -> torch.Tensor:
    """Multi-class focal loss, mean over cases.

    Args:
        logits: (B, K) raw scores; targets: (B,) class indices (long).
        alpha: a constant weight of every class here (a per-class alpha is a class-balance choice the
            manifest cannot express); negative: no weighting.
    """
    log_p = logits.float().log_softmax(dim=-1).gather(1, targets[:, None].long())[:, 0]  # (B,) log p_t
    loss = -((1 - log_p.exp()) ** gamma) * log_p
    if alpha >= 0:
        loss = alpha * loss
    return loss.mean()


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, task: str, config: FocalLossConfig) -> torch.Tensor:
    """Focal loss for ``task``: targets (B, K) 0/1 for 'multilabel', (B,) indices for 'multiclass'."""
    if task == "multilabel":
        return sigmoid_focal_loss(logits.float(), targets, config.gamma, config.alpha)
    if task == "multiclass":
        return softmax_focal_loss(logits, targets, config.gamma, config.alpha)
    raise ValueError(f"task: must be one of {TASKS}, got {task!r}")


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Binary soft Dice + BCE over a batch of voxel maps (nnU-Net's default segmentation loss, one class).

    Args:
        logits: (N, D, H, W) voxel logits; target: (N, D, H, W) in {0, 1}.
    """
    target = target.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = logits.sigmoid()
    dims = tuple(range(1, logits.ndim))
    inter = (p * target).sum(dims)
    dice = (2 * inter + eps) / (p.sum(dims) + target.sum(dims) + eps)
    return bce + (1 - dice).mean()

"""The standardised head used during training.

Slice embeddings of random (load-bearing) backbones, and to a lesser degree of pretrained ones, share a large
common part (cosine 0.9994 to their mean on synthetic CT): the information is in a varying part ~1/400 of the
norm, which AdamW's per-coordinate steps on a raw linear head cannot find. As MAE's linear probe puts a
BatchNorm before the head, the head and task queries train on embeddings standardised with the training set's
per-dimension mean and std (measured once, with the bare backbone), and are folded back into the plain head and
query of the plugin format when saved (exact, no format change): W = W'/sigma, b = b' - W mu, q = q'/sigma
(softmax ignores the shift).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from anymc3d.plugin import TaskPlugin


class _Scale(nn.Module):
    """Parametrisation q = q' * inv_std (the task queries see standardised embeddings)."""

    def __init__(self, inv_std: torch.Tensor):
        super().__init__()
        self.register_buffer("inv_std", inv_std)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return q * self.inv_std


class StandardizedLinear(nn.Module):
    """The head during training: ``W' ((v - mu) / sigma) + b'``; :meth:`fold` gives the equivalent nn.Linear."""

    def __init__(self, linear: nn.Linear, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        with torch.no_grad():
            self.weight = nn.Parameter(linear.weight * std)          # (K, C), same function as ``linear``
            self.bias = nn.Parameter(linear.bias + linear.weight @ mean)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear((v - self.mean.to(v.dtype)) / self.std.to(v.dtype), self.weight, self.bias)

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        out = nn.Linear(self.weight.shape[1], self.weight.shape[0])
        w = self.weight / self.std
        out.weight.copy_(w)
        out.bias.copy_(self.bias - w @ self.mean)
        return out


def standardize_head(head: TaskPlugin, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Reparametrise ``head`` in place to train on standardised embeddings (same function at the start)."""
    head.head = StandardizedLinear(head.head, mean, std)
    for pool in [head.task_pool, *(head.view_pools or [])]:
        with torch.no_grad():
            pool.query.mul_(std)  # q' = q * sigma, so q = q' / sigma is unchanged
        parametrize.register_parametrization(pool, "query", _Scale(1.0 / std))


def plain_head(head: TaskPlugin) -> TaskPlugin:
    """A plain :class:`TaskPlugin` computing exactly what the (possibly standardised) ``head`` computes."""
    out = TaskPlugin(head.embed_dim, head.num_classes, head.num_views)
    with torch.no_grad():
        pools = [(head.task_pool, out.task_pool)] + list(zip(head.view_pools or [], out.view_pools or []))
        for src, dst in pools:
            dst.query.copy_(src.query.detach())  # the parametrised value when standardised
        linear = head.head.fold() if isinstance(head.head, StandardizedLinear) else head.head
        out.head.load_state_dict(linear.state_dict())
    return out

"""Lift a timm DINOv2 (``VisionTransformer``) or DINOv3 (``Eva``) model to 3D with PlaneCycle, without editing it.

:class:`PlaneCycleEncoder` holds the timm model as its only child and adds no parameters, buffers or hooks:
it calls the model's own 2D stem on every slice (``patch_embed``, ``_pos_embed`` with the CLS/register tokens
and, for DINOv2, the 2D absolute position embedding, then ``norm_pre``), then the model's blocks one by one on
the plane schedule through :func:`anymc3d.planecycle.op.plane_cycle`, then the model's final ``norm``. DINOv3
blocks get ``model.rope.get_embed(shape=(a, b))`` rebuilt for the active plane's grid; DINOv2 blocks get
nothing per plane (``blk(x)``). The resident backbone that 2D plugins share is untouched, so
:meth:`PlaneCycleEncoder.restore` simply hands back the plain model.

Cost per block: a block on plane HW attends within D sequences of G + h*w tokens, as the 2D model does on D
slices; DW uses h sequences of G + D*w tokens and DH w sequences of G + D*h tokens. Attention cost is
O(D*(hw)^2*C), O(h*(Dw)^2*C), O(w*(Dh)^2*C); the MLP and projections are O(D*h*w*C) on every plane. So with
D of the order of h and w, a lifted block costs what a 2D block on all D slices costs (see docs/planecycle.md).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from anymc3d.planecycle.config import (
    DEFAULT_CYCLE,
    PlaneCycleConfig,
    check_layers,
    parse_cycle,
)
from anymc3d.planecycle.op import plane_at, plane_cycle


@dataclass
class VolumeFeatures:
    """Token features of one batch of volumes, all after the model's final norm.

    The volume embedding is defined as the mean over slices of the per-slice CLS tokens (the first global
    token), the 3D analogue of the 2D slice embedding ``forward_features(x)[:, 0]``.
    """

    patch_tokens: Tensor
    """(B, D, h, w, C)"""
    global_tokens: Tensor
    """(B, D, G, C): CLS first, then registers."""
    layers: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    """block index -> (patch tokens, global tokens) after that block, normed like the output."""

    @property
    def cls_tokens(self) -> Tensor:
        """(B, D, C) per-slice CLS tokens."""
        return self.global_tokens[:, :, 0]

    @property
    def volume_embedding(self) -> Tensor:
        """(B, C): mean of the per-slice CLS tokens."""
        return self.cls_tokens.mean(dim=1)

    def float_cpu(self) -> "VolumeFeatures":
        """The same features as float32 tensors on the CPU."""
        def cpu(t: Tensor) -> Tensor:
            return t.float().cpu()

        return VolumeFeatures(patch_tokens=cpu(self.patch_tokens), global_tokens=cpu(self.global_tokens),
                              layers={i: (cpu(p), cpu(g)) for i, (p, g) in self.layers.items()})


class PlaneCycleEncoder(nn.Module):
    """A timm DINOv2/DINOv3 model run as a 3D encoder with PlaneCycle; the model itself is not changed."""

    def __init__(self, model: nn.Module, *, variant: str = "pcg", cycle: Sequence[str] | str = DEFAULT_CYCLE):
        """
        Args:
            model: a timm ``VisionTransformer`` (DINOv2) or ``Eva`` (DINOv3). Held, not copied or edited.
            variant: 'pcg' or 'pcm' (see :mod:`anymc3d.planecycle.op`).
            cycle: plane schedule, e.g. ('HW', 'DW', 'DH', 'HW') or 'HW,DW,DH,HW'.
        """
        super().__init__()
        if not isinstance(model, (VisionTransformer, Eva)):
            raise TypeError(f"model: PlaneCycle lifts timm VisionTransformer or Eva models, got {type(model).__name__}")
        if getattr(model, "rope_mixed", False):
            raise ValueError("model: depth-dependent (mixed) RoPE is not supported by PlaneCycle")
        if getattr(model, "patch_drop", None) is not None and not isinstance(model.patch_drop, nn.Identity):
            raise ValueError("model: patch dropout would break the token grid; build the model without it")
        self.config = PlaneCycleConfig(variant=variant, cycle=tuple(parse_cycle(cycle)))
        self.model = model
        self.is_rope = isinstance(model, Eva) and model.rope is not None

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    def stem(self, slices: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """The model's 2D stem on every slice.

        Args:
            slices: (N, 3, H, W) normalised slices.

        Returns:
            ``(tokens, (h, w))``: tokens (N, G + h*w, C) with the global tokens first.
        """
        m = self.model
        grid = tuple(m.patch_embed.dynamic_feat_size(tuple(slices.shape[-2:])))
        x = m.patch_embed(slices)  # (N, h, w, C) with dynamic_img_size, else (N, h*w, C)
        if isinstance(m, Eva):
            x, _ = m._pos_embed(x)  # the 2D rope it returns is replaced per plane
        else:
            x = m._pos_embed(x)
            x = m.patch_drop(x)
        return m.norm_pre(x), grid  # (N, G + h*w, C)

    def _rope(self):
        if not self.is_rope:
            return None
        rope = self.model.rope
        return lambda grid: rope.get_embed(shape=list(grid))

    def _normed(self, patches: Tensor, glob: Tensor) -> tuple[Tensor, Tensor]:
        """The final norm on all tokens: (B, D, h, w, C), (B, D, G, C) -> the same shapes."""
        b, d, h, w, c = patches.shape
        g = glob.shape[2]
        tokens = torch.cat([glob.reshape(b, d * g, c), patches.reshape(b, d * h * w, c)], dim=1)  # (B, D*G + D*h*w, C)
        tokens = self.model.norm(tokens)
        return tokens[:, d * g:].reshape(b, d, h, w, c), tokens[:, :d * g].reshape(b, d, g, c)

    def forward_features(self, volume: Tensor, layers: Sequence[int] = ()) -> VolumeFeatures:
        """Lifted features of a batch of volumes.

        Args:
            volume: (B, D, 3, H, W) normalised slices.
            layers: 0-based block indices whose outputs to return as well.

        Returns:
            :class:`VolumeFeatures` with patch tokens (B, D, h, w, C) and global tokens (B, D, G, C).
        """
        if volume.ndim != 5:
            raise ValueError(f"volume: must be (B, D, 3, H, W), got shape {tuple(volume.shape)}")
        take = check_layers(layers, self.depth)
        b, d = volume.shape[:2]
        tokens, (h, w) = self.stem(volume.flatten(0, 1))  # (B*D, G + h*w, C)
        g = self.num_prefix_tokens
        c = tokens.shape[-1]
        glob = tokens[:, :g].reshape(b, d, g, c)  # (B, D, G, C)
        patches = tokens[:, g:].reshape(b, d, h, w, c)  # (B, D, h, w, C)
        rope = self._rope()
        out: dict[int, tuple[Tensor, Tensor]] = {}
        for i, blk in enumerate(self.model.blocks):
            patches, glob = plane_cycle(patches, glob, blk, plane_at(self.config.cycle, i), self.config.variant, rope)
            if i in take:
                out[i] = self._normed(patches, glob)
        patches, glob = self._normed(patches, glob)
        return VolumeFeatures(patch_tokens=patches, global_tokens=glob, layers=out)

    def forward(self, volume: Tensor) -> Tensor:
        """(B, D, 3, H, W) -> (B, C) volume embedding (mean of per-slice CLS tokens)."""
        return self.forward_features(volume).volume_embedding

    def restore(self) -> nn.Module:
        """The plain 2D model. Nothing was changed on it, so this only drops the wrapper."""
        return self.model


def lift(model: nn.Module, config: PlaneCycleConfig | None = None) -> PlaneCycleEncoder:
    """Wrap ``model`` as a PlaneCycle 3D encoder (no copy, no edit)."""
    config = config or PlaneCycleConfig()
    return PlaneCycleEncoder(model, variant=config.variant, cycle=config.cycle)

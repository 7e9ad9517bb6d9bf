"""The PlaneCycle-lifted backbone as an encoder kind (``planecycle``) of the model module.

A plugin of kind ``planecycle`` gets, as slice embeddings h_s, the per-slice CLS tokens of the lifted backbone
(after the final norm), so the task-query pooling and head of :class:`anymc3d.model.AnyMC3DModel` work unchanged.
Importing this module registers the kind.

Slices of a volume are not independent once lifted (DW/DH blocks mix them), so each volume runs whole: there are no
slice chunks and no out-of-memory retry with smaller chunks, and padded slices are dropped before the forward (a
padded batch gives each volume exactly its unpadded result). The attention heatmaps of the 2D kind are not defined
here (no per-slice CLS attention row survives the plane mixing): ``heatmap_methods`` is empty.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from anymc3d.encoders import Encoder, EncoderOutput, SliceProgress, register_encoder
from anymc3d.planecycle.config import DEFAULT_CYCLE, PlaneCycleConfig
from anymc3d.planecycle.converter import PlaneCycleEncoder
from anymc3d.preprocessing import to_model_input


@register_encoder("planecycle")
class LiftedEncoder(Encoder):
    """Per-slice CLS tokens of the PlaneCycle-lifted resident backbone (held, never modified).

    Args:
        backbone: the resident timm DINOv2/DINOv3 model.
        variant: 'pcg' or 'pcm'.
        cycle: plane schedule, e.g. ('HW', 'DW', 'DH', 'HW').
    """

    def __init__(self, backbone: nn.Module, *, variant: str = "pcg", cycle: Sequence[str] | str = DEFAULT_CYCLE):
        super().__init__(backbone)
        self.config = PlaneCycleConfig(variant=variant, cycle=cycle)
        PlaneCycleEncoder(backbone, variant=variant, cycle=cycle)  # refuse unsupported backbones now

    def forward(self, slices: torch.Tensor, mask: torch.Tensor | None = None, *, patch_tokens: bool = False,
                heatmap: str | None = None, progress: SliceProgress | None = None) -> EncoderOutput:
        """Encode a batch of volumes, one volume at a time.

        Args:
            slices: (B, S, M, M) preprocessed slices in [0, 1].
            mask: (B, S) bool, True where a slice is real; None: all.
            patch_tokens: also return the lifted last-block patch tokens (B, S, h, w, C).
            heatmap: must be None (see the module docstring).
        """
        if heatmap is not None:
            raise ValueError(f"heatmap: the {self.kind!r} encoder has no {heatmap!r} heatmap")
        lifted = PlaneCycleEncoder(self.backbone, variant=self.config.variant, cycle=self.config.cycle)
        device = next(self.backbone.parameters()).device
        b, s = slices.shape[:2]
        mask = torch.ones(b, s, dtype=torch.bool) if mask is None else mask.to("cpu", torch.bool)
        if mask.shape != (b, s):
            raise ValueError(f"mask must be (B, S) = {(b, s)}, got {tuple(mask.shape)}")
        cls_out, patch_out = None, None
        if progress:
            progress(0, int(mask.sum()))
        done = 0
        for i in range(b):
            real = slices[i][mask[i].to(slices.device)].to(device)  # (S_i, M, M)
            feats = lifted.forward_features(to_model_input(real.float())[None])  # batch of one volume
            cls = feats.cls_tokens[0].float()  # (S_i, C)
            if cls_out is None:
                cls_out = cls.new_zeros(b, s, cls.shape[-1])  # (B, S, C), zeros at padding
                if patch_tokens:
                    patch_out = cls.new_zeros(b, s, *feats.patch_tokens.shape[2:])  # (B, S, h, w, C)
            where = mask[i].to(device)
            cls_out[i, where] = cls
            if patch_tokens:
                patch_out[i, where] = feats.patch_tokens[0].float()
            done += real.shape[0]
            if progress:
                progress(done, int(mask.sum()))
        return EncoderOutput(cls=cls_out, patch_tokens=patch_out, patch_maps=None)

"""The PlaneCycle-lifted backbone as an encoder kind (``planecycle``) of the model module.

A plugin of kind ``planecycle`` gets, as slice embeddings h_s, the per-slice CLS tokens of the lifted backbone
(after the final norm), so the task-query pooling and head of :class:`anymc3d.model.AnyMC3DModel` work unchanged.
Importing this module registers the kind.

Slices of a volume are not independent once lifted (DW/DH blocks mix them), so each volume runs whole: there are no
slice chunks and no out-of-memory retry with smaller chunks, and padded slices are dropped before the forward (a
padded batch gives each volume exactly its unpadded result). The attention heatmaps of the 2D kind are not defined
here (no per-slice CLS attention row survives the plane mixing): ``heatmap_methods`` is empty.

Kind ``planecycle_linear`` (:class:`LiftedLinearEncoder`, the lifted-feature plugin) takes as h_s the mean of slice
s's lifted last-block patch tokens, so with the task-query pooling and linear head the logit is a sum of per-token
terms and its ``contribution`` heatmap is exact (see docs/planecycle.md).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from anymc3d.device import placement
from anymc3d.encoders import Encoder, EncoderOutput, SliceProgress, register_encoder
from anymc3d.planecycle.config import DEFAULT_CYCLE, PlaneCycleConfig
from anymc3d.planecycle.converter import PlaneCycleEncoder, VolumeFeatures
from anymc3d.planecycle.head import token_terms
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

    @classmethod
    def validate_options(cls, options: dict) -> dict:
        """A plugin's ``encoder`` options: the lifting settings (variant, cycle), normalised."""
        return PlaneCycleConfig.from_dict(dict(options)).to_dict()

    def lifted(self) -> PlaneCycleEncoder:
        """The lifted view of the resident backbone (a wrapper: no copy, no edit)."""
        return PlaneCycleEncoder(self.backbone, variant=self.config.variant, cycle=self.config.cycle)

    def features(self, volume: torch.Tensor, layers: Sequence[int] = ()) -> VolumeFeatures:
        """Lifted token features of (B, D, 3, H, W) normalised volumes: each volume runs whole (its slices are
        mixed by the DW/DH blocks, so there are no chunks)."""
        return self.lifted().forward_features(volume, layers)

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
        lifted = self.lifted()
        device, dtype = placement(self.backbone)
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
            feats = lifted.forward_features(to_model_input(real.float()).to(dtype)[None])  # batch of one volume
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


@register_encoder("planecycle_linear")
class LiftedLinearEncoder(LiftedEncoder):
    """The lifted-feature plugin's encoder: h_s = mean over (h, w) of slice s's lifted last-block patch tokens.

    With the plugin's task-query pooling (v = sum_s a_s h_s) and linear head (one view), for every finding k

        logit_k - b_k = sum_s sum_t a_s (w_k . p_{s,t}) / (h w)        exactly,

    so the per-token terms are an additive, faithful explanation. Its heatmap ``contribution`` is, per slice,
    c_{s,t} = max(w_k . p_{s,t}, 0) / (h w): the positive evidence for finding k (the engine multiplies by a_s).
    :meth:`signed_maps` gives the terms before clamping.
    """

    finding_heatmaps = ("contribution",)
    finding_needs_patch_tokens = True

    def forward(self, slices: torch.Tensor, mask: torch.Tensor | None = None, *, patch_tokens: bool = False,
                heatmap: str | None = None, progress: SliceProgress | None = None) -> EncoderOutput:
        """Like :class:`LiftedEncoder`, but h_s (B, S, C) is the mean patch token of slice s (0 at padding)."""
        out = super().forward(slices, mask, patch_tokens=True, heatmap=heatmap, progress=progress)
        tokens = out.patch_tokens  # (B, S, h, w, C), zeros at padding
        return EncoderOutput(cls=tokens.mean(dim=(2, 3)), patch_tokens=tokens if patch_tokens else None)

    @staticmethod
    def signed_maps(weight: torch.Tensor, patch_tokens: torch.Tensor) -> torch.Tensor:
        """(K, C) head weights, (B, S, h, w, C) tokens -> (K, B, S, h*w) per-token terms (w_k . p_{s,t}) / (h w)."""
        b, s, h, w, c = patch_tokens.shape
        flat = patch_tokens.reshape(b, s, h * w, c).float()
        with torch.no_grad():  # a map, not a training signal (the tokens may come from inference mode)
            return token_terms(weight.detach().float(), flat) / (h * w)

    def finding_maps(self, model, views, out, method: str, masks=None,
                     progress: SliceProgress | None = None) -> torch.Tensor:
        """The ``contribution`` maps (K, B, S_0, h*w): positive per-token terms, from the forward's patch tokens."""
        if method not in self.finding_heatmaps:
            raise ValueError(f"{method!r} is not one of {self.finding_heatmaps}")
        if model.head.num_views != 1:
            raise ValueError(f"kind {self.kind!r}: the contribution map is exact for one view only, "
                             f"the plugin has {model.head.num_views}")
        if out.patch_tokens is None:
            raise ValueError("the contribution map needs the forward's patch tokens (patch_tokens=True)")
        if progress:
            progress(1, 1)
        return self.signed_maps(model.head.head.weight, out.patch_tokens[0]).clamp_min(0)

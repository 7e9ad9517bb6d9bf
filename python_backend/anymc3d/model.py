"""The AnyMC3D model: encoder (frozen backbone + the view's LoRA) -> slice embeddings -> task-query pooling
-> linear head. The one forward that inference, heatmaps, training and batch scoring all call.

Split as timm splits a model: :meth:`AnyMC3DModel.forward_features` (per view: slice embeddings H, and on
request last-block patch tokens and per-slice patch maps), :meth:`~AnyMC3DModel.pool` (a = softmax(Hq/sqrt(d)),
v = a^T H; per-view queries then the task query for several views), :meth:`~AnyMC3DModel.forward_head`
(logits). The encoder is chosen by the plugin's kind (see :mod:`anymc3d.encoders`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from anymc3d.encoders import EncoderOutput, SliceProgress, create_encoder
from anymc3d.lora import activate
from anymc3d.plugin import TaskHead


@dataclass
class ModelOutput:
    """One forward pass over a batch of B cases."""

    logits: torch.Tensor                               # (B, K) raw head output
    pooled: torch.Tensor                               # (B, C) case embedding v
    embeddings: list[torch.Tensor]                     # per view: (B, S_v, C) slice embeddings h_s
    importance: list[torch.Tensor]                     # per view: (B, S_v) a_s (0 at padding)
    patch_tokens: Optional[list[torch.Tensor]] = None  # per view: (B, S_v, h, w, C), when asked
    patch_maps: Optional[torch.Tensor] = None          # (B, S_0, P) view 0's per-slice heatmap, when asked


class AnyMC3DModel(nn.Module):
    """A task plugin on the resident backbone.

    Args:
        backbone: the frozen timm ViT, shared with other plugins; it holds this plugin's LoRA adapters.
        head: the plugin's queries and linear head.
        adapters: one LoRA adapter name per view (``None`` runs the bare backbone for that view).
        kind: encoder kind (the plugin's ``kind``), see :func:`anymc3d.encoders.create_encoder`.
        encoder_options: keyword options of that encoder kind (``slice_lora``: ``chunk_size``, ``compile``).
    """

    def __init__(self, backbone: nn.Module, head: TaskHead, adapters: Sequence[Optional[str]], *,
                 kind: str = "slice_lora", **encoder_options):
        super().__init__()
        if len(adapters) != head.num_views:
            raise ValueError(f"adapters: {len(adapters)} given for a head of {head.num_views} view(s)")
        self.encoder = create_encoder(kind, backbone, **encoder_options)
        self.head = head
        self.adapters = list(adapters)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    # ------------------------------------------------------------------------------------- forward
    def forward_features(self, views: Sequence[torch.Tensor], masks: Optional[Sequence[torch.Tensor]] = None, *,
                         patch_tokens: bool = False, heatmap: Optional[str] = None,
                         progress: Optional[SliceProgress] = None) -> list[EncoderOutput]:
        """Encode every view with its adapter.

        Args:
            views: one (B, S_v, M, M) tensor of slices in [0, 1] per view.
            masks: one (B, S_v) bool tensor per view (True = real slice), or None.
            patch_tokens: also return the last block's patch tokens.
            heatmap: "attention" or "rollout": per-slice patch maps of view 0.
        """
        if len(views) != len(self.adapters):
            raise ValueError(f"the plugin takes {len(self.adapters)} view(s), got {len(views)}")
        masks = list(masks) if masks is not None else [None] * len(views)
        outputs = []
        for i, (slices, mask, adapter) in enumerate(zip(views, masks, self.adapters)):
            activate(self.backbone, adapter)
            outputs.append(self.encoder(slices, mask, patch_tokens=patch_tokens, heatmap=heatmap if i == 0 else None,
                                        progress=progress if i == 0 else None))
        return outputs

    def pool(self, features: Sequence[EncoderOutput], masks: Optional[Sequence[torch.Tensor]] = None
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(v (B, C), importance per view (B, S_v)) from the slice embeddings."""
        return self.head.pool([f.cls for f in features], masks)

    def forward_head(self, v: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C) -> (B, K) logits (or v itself when ``pre_logits``)."""
        return self.head.forward_head(v, pre_logits=pre_logits)

    def forward(self, views: Sequence[torch.Tensor], masks: Optional[Sequence[torch.Tensor]] = None, *,
                patch_tokens: bool = False, heatmap: Optional[str] = None,
                progress: Optional[SliceProgress] = None) -> ModelOutput:
        """Logits and everything the heatmaps and training need; grad-capable (wrap in inference_mode to infer)."""
        features = self.forward_features(views, masks, patch_tokens=patch_tokens, heatmap=heatmap, progress=progress)
        v, importance = self.pool(features, masks)
        return ModelOutput(
            logits=self.forward_head(v), pooled=v, embeddings=[f.cls for f in features], importance=importance,
            patch_tokens=[f.patch_tokens for f in features] if patch_tokens else None,
            patch_maps=features[0].patch_maps,
        )

    # ------------------------------------------------------------------------------------- explanation
    def logit_grads(self, embeddings: Sequence[torch.Tensor], masks: Optional[Sequence[torch.Tensor]] = None
                    ) -> torch.Tensor:
        """d logit_k / d h_s for every finding k and slice s of view 0: (K, B, S_0, C).

        Through the pooling and head only (the embeddings are detached), so it costs no backbone pass.
        """
        with torch.enable_grad():
            first = embeddings[0].detach().float().clone().requires_grad_(True)  # clone: out of inference mode
            rest = [e.detach().float().clone() for e in embeddings[1:]]
            v, _ = self.head.pool([first, *rest], masks)
            logits = self.forward_head(v)  # (B, K)
            grads = [torch.autograd.grad(logits[:, k].sum(), first, retain_graph=True)[0]
                     for k in range(logits.shape[1])]
        return torch.stack(grads)

    def finding_maps(self, views: Sequence[torch.Tensor], out: ModelOutput, method: str,
                     masks: Optional[Sequence[torch.Tensor]] = None,
                     progress: Optional[SliceProgress] = None) -> torch.Tensor:
        """Per-finding heatmaps of view 0 (the encoder kind's ``finding_heatmaps``, e.g. ``grad_rollout``):
        (K, B, S_0, P) per slice, before weighting by the slice importance."""
        if method not in self.encoder.finding_heatmaps:
            raise ValueError(f"kind {self.encoder.kind!r} has no per-finding {method!r} map "
                             f"(it has {self.encoder.finding_heatmaps})")
        activate(self.backbone, self.adapters[0])
        return self.encoder.finding_maps(self, views, out, method, masks, progress)

    # ------------------------------------------------------------------------------------- parameters
    def lora_parameters(self) -> Iterator[nn.Parameter]:
        """This plugin's LoRA weights, which live in the shared backbone."""
        names = tuple(f".{a}." for a in self.adapters if a is not None)
        for name, p in self.backbone.named_parameters():
            if names and any(n in name for n in names):
                yield p

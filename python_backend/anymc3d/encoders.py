"""Encoder kinds: how a plugin turns each view's slices into slice embeddings.

AnyMC3D's encoder (kind ``slice_lora``) runs the frozen 2D backbone, with the view's LoRA adapter active, on
every slice on its own and keeps the last block's CLS token. Other kinds (PlaneCycle's lifted encoder) are
registered by name, as timm registers models, and a plugin's ``kind`` picks one: the model, engine, pooling,
head, plugin file and CLI never branch on it. What depends on the kind lives here: whether slices may be split
into chunks (only when they are independent), the CUDA out-of-memory retry, and which heatmaps it can explain.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from anymc3d import heatmap as hm
from anymc3d.device import placement
from anymc3d.preprocessing import to_model_input

logger = logging.getLogger(__name__)

#: progress(done, total) in slices
SliceProgress = Callable[[int, int], None]

ENCODERS: dict[str, type["Encoder"]] = {}
_COMPILED = "_anymc3d_compiled_forward_features"  # attribute of the backbone: its compiled forward, or False


def register_encoder(kind: str):
    """Class decorator: make an :class:`Encoder` subclass available to plugins of ``kind``."""
    def wrap(cls):
        if kind in ENCODERS and ENCODERS[kind] is not cls:
            raise ValueError(f"encoder kind {kind!r} is registered already ({ENCODERS[kind].__name__})")
        cls.kind = kind
        ENCODERS[kind] = cls
        return cls
    return wrap


def create_encoder(kind: str, backbone: nn.Module, **kwargs) -> "Encoder":
    """The encoder of ``kind`` over the resident ``backbone`` (shared, never modified)."""
    if kind not in ENCODERS:
        raise ValueError(f"kind: unknown encoder kind {kind!r}; known: {sorted(ENCODERS)}")
    return ENCODERS[kind](backbone, **kwargs)


@dataclass
class EncoderOutput:
    """What an encoder gives for a batch of volumes (padded slices are zeros)."""

    cls: torch.Tensor                             # (B, S, C) slice embeddings h_s
    patch_tokens: Optional[torch.Tensor] = None   # (B, S, h, w, C) last-block patch tokens after the final norm
    patch_maps: Optional[torch.Tensor] = None     # (B, S, P) per-slice heatmap ("attention" or "rollout")


class Encoder(nn.Module):
    """Base of the encoder kinds. The backbone is held, not owned: it is not a sub-module, so the encoder adds
    no parameters and the resident backbone shared by plugins is never copied or changed."""

    kind = "abstract"
    #: heatmaps computed during the forward pass: per slice of view 0, ``EncoderOutput.patch_maps``
    forward_heatmaps: tuple[str, ...] = ()
    #: heatmaps computed after it, one per finding, by :meth:`finding_maps`
    finding_heatmaps: tuple[str, ...] = ()
    #: whether :meth:`finding_maps` needs the forward's patch tokens
    finding_needs_patch_tokens = False

    @property
    def heatmap_methods(self) -> tuple[str, ...]:
        """Every heatmap this kind can give; the first is its default (``--heatmap-method auto``)."""
        return self.forward_heatmaps + self.finding_heatmaps

    def __init__(self, backbone: nn.Module):
        super().__init__()
        object.__setattr__(self, "backbone", backbone)  # not registered as a sub-module (see class docstring)

    @classmethod
    def validate_options(cls, options: dict) -> dict:
        """Check a plugin's ``encoder`` options (plugin.json) for this kind; return them normalised.

        Kinds whose construction a plugin file configures override this; by default a plugin carries none.
        """
        if options:
            raise ValueError(f"kind {cls.kind!r} takes no options, got {sorted(options)}")
        return {}

    def forward(self, slices: torch.Tensor, mask: Optional[torch.Tensor] = None, *, patch_tokens: bool = False,
                heatmap: Optional[str] = None, progress: Optional[SliceProgress] = None) -> EncoderOutput:
        raise NotImplementedError

    def finding_maps(self, model, views, out, method: str, masks=None,
                     progress: Optional[SliceProgress] = None) -> torch.Tensor:
        """Per-finding maps of view 0 for ``method`` in :attr:`finding_heatmaps`: (K, B, S_0, P) per slice, to be
        weighted by the slice importance a_s. ``model`` is the :class:`~anymc3d.model.AnyMC3DModel` (its pooling and
        head), ``out`` its forward's output on ``views``."""
        raise NotImplementedError(f"encoder kind {self.kind!r} has no per-finding heatmaps")


def _flat_mask(slices: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, S) bool of the real slices (all of them without a mask)."""
    b, s = slices.shape[:2]
    if mask is None:
        return torch.ones(b, s, dtype=torch.bool, device=slices.device)
    if mask.shape != (b, s):
        raise ValueError(f"mask must be (B, S) = {(b, s)}, got {tuple(mask.shape)}")
    return mask.to(device=slices.device, dtype=torch.bool)


def _scatter(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, ...) values of the real slices -> (B, S, ...) with zeros at padding."""
    out = flat.new_zeros(*mask.shape, *flat.shape[1:])
    out[mask] = flat
    return out


@register_encoder("slice_lora")
class SliceEncoder(Encoder):
    """AnyMC3D's 2D encoder: each slice through the backbone on its own (with the active LoRA adapter).

    Slices are independent, so they run in chunks of ``chunk_size`` (memory bounded by the chunk, not the
    volume) and a CUDA out-of-memory error redoes the failed chunk at half the size.

    Args:
        backbone: the resident timm ViT (adapters injected by the caller).
        chunk_size: slices per backbone forward.
        compile: run inference through ``torch.compile`` of the backbone's ``forward_features`` (shared by every
            encoder of that backbone); any failure to compile (no C++ compiler, an unsupported op) logs one
            warning and falls back to eager for good. Training (grad enabled) always runs eager.
    """

    forward_heatmaps = ("attention", "rollout")
    finding_heatmaps = hm.GRADIENT_METHODS

    def __init__(self, backbone: nn.Module, *, chunk_size: int = 32, compile: bool = False):
        super().__init__(backbone)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.compile = compile

    def _forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's ``forward_features``, compiled when asked and possible."""
        model = self.backbone
        if self.compile and not torch.is_grad_enabled():
            compiled = getattr(model, _COMPILED, None)
            if compiled is None:
                compiled = torch.compile(model.forward_features, dynamic=False)
                object.__setattr__(model, _COMPILED, compiled)
            if compiled is not False:
                try:
                    return compiled(x)
                except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eager
                    logger.warning("torch.compile is unavailable here (%s: %s); running eager",
                                   type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                    object.__setattr__(model, _COMPILED, False)
        return model.forward_features(x)

    def _in_chunks(self, total: int, step: Callable[[int, int], list], progress: Optional[SliceProgress]) -> list[list]:
        """Run ``step(start, stop) -> list of results`` over [0, total) and collect each result in order.

        A chunk's results are kept only when its step completed: a CUDA out-of-memory error halves the chunk
        and redoes the whole unit, so a retry can never duplicate or drop rows.
        """
        if total < 1:
            raise ValueError("no slices to encode")
        start, size, collected = 0, self.chunk_size, []
        if progress:
            progress(0, total)
        while start < total:
            stop = min(total, start + size)
            try:
                results = step(start, stop)
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                size //= 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                logger.warning("CUDA out of memory: retrying with %d slices per chunk", size)
                continue
            collected.append(results)
            start = stop
            if progress:
                progress(start, total)
        return [list(column) for column in zip(*collected)]

    def _tokens(self, x: torch.Tensor, heatmap: Optional[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The one backbone forward: (n, 3, M, M) -> tokens (n, N, C) after the final norm, and the per-slice
        patch map (n, P) when ``heatmap`` is "attention" (last-block CLS row) or "rollout"."""
        model, npt = self.backbone, self.backbone.num_prefix_tokens
        if heatmap == "attention":
            with hm.ClsRowRecorder(model.blocks[-1]) as rec:
                tokens = self._forward_features(x)
            return tokens, hm.cls_attention(rec.rows[0], npt)
        if heatmap == "rollout":  # unfused matrices: always eager
            with hm.AttentionRecorder(model.blocks, reduce=hm.head_mean) as rec:
                tokens = model.forward_features(x)
            return tokens, hm.attention_rollout(rec.maps, npt)
        if heatmap is not None:
            raise ValueError(f"heatmap {heatmap!r} is not computed in the forward pass")
        return self._forward_features(x), None

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        ph, pw = self.backbone.patch_embed.patch_size
        return height // ph, width // pw

    def forward(self, slices: torch.Tensor, mask: Optional[torch.Tensor] = None, *, patch_tokens: bool = False,
                heatmap: Optional[str] = None, progress: Optional[SliceProgress] = None) -> EncoderOutput:
        """Encode a batch of volumes.

        Args:
            slices: (B, S, M, M) preprocessed slices in [0, 1] (any device: moved to the backbone's).
            mask: (B, S) bool, True where a slice is real (volumes of unequal length are padded); None: all.
            patch_tokens: also return the last block's patch tokens (auxiliary segmentation, features).
            heatmap: None, "attention" or "rollout": also return per-slice patch maps.
        """
        device, dtype = placement(self.backbone)
        mask = _flat_mask(slices, mask)
        flat = slices.to(device)[mask.to(device)]  # (N, M, M) real slices only
        grid = self._grid(*slices.shape[-2:])
        npt = self.backbone.num_prefix_tokens

        def step(start: int, stop: int) -> list:
            tokens, maps = self._tokens(to_model_input(flat[start:stop].float()).to(dtype), heatmap)  # (n, N, C)
            cls = tokens[:, 0].float()  # (n, C)
            patches = tokens[:, npt:].float().reshape(stop - start, *grid, -1) if patch_tokens else None  # (n, h, w, C)
            return [cls, patches, None if maps is None else maps.float()]

        cls, patches, maps = self._in_chunks(flat.shape[0], step, progress)
        mask = mask.to(device)
        return EncoderOutput(
            cls=_scatter(torch.cat(cls), mask),
            patch_tokens=_scatter(torch.cat(patches), mask) if patch_tokens else None,
            patch_maps=_scatter(torch.cat(maps), mask) if heatmap is not None else None,
        )

    def finding_maps(self, model, views, out, method: str, masks=None,
                     progress: Optional[SliceProgress] = None) -> torch.Tensor:
        """Gradient maps: d logit_k / d h_s through the pooling and head, then :meth:`gradient_maps`."""
        if method not in self.finding_heatmaps:
            raise ValueError(f"{method!r} is not one of {self.finding_heatmaps}")
        cls_grads = model.logit_grads(out.embeddings, masks)
        mask = masks[0] if masks is not None else None
        return self.gradient_maps(views[0], mask, cls_grads, method == "grad_last", progress)

    def gradient_maps(self, slices: torch.Tensor, mask: Optional[torch.Tensor], cls_grads: torch.Tensor,
                      last_only: bool, progress: Optional[SliceProgress] = None) -> torch.Tensor:
        """Gradient-weighted attention maps (Chefer et al.) for K findings: (K, B, S, P).

        ``cls_grads`` (K, B, S, C) is d logit_k / d h_s from the pooling and head. Slices are independent in
        this encoder, so back-propagating <h_s, g_ks> chunk by chunk gives the exact gradient of logit_k with
        respect to each chunk's attention matrices, with memory bounded by the chunk.
        """
        device, dtype = placement(self.backbone)
        mask = _flat_mask(slices, mask)
        flat = slices.to(device)[mask.to(device)]  # (N, M, M)
        grads = cls_grads.to(device)[:, mask.to(device)]  # (K, N, C)
        npt = self.backbone.num_prefix_tokens

        def step(start: int, stop: int) -> list:
            x = to_model_input(flat[start:stop].float()).to(dtype).requires_grad_(True)
            maps = []
            with torch.enable_grad(), hm.AttentionRecorder(self.backbone.blocks, retain_grad=True) as rec:
                cls = self.backbone.forward_features(x)[:, 0].float()  # (n, C)
                for k in range(grads.shape[0]):
                    for a in rec.maps:
                        a.grad = None
                    torch.autograd.backward((cls * grads[k, start:stop]).sum(), retain_graph=True)
                    maps.append(hm.gradient_rollout(rec.maps, [a.grad for a in rec.maps], npt, last_only).detach().float())
            return [torch.stack(maps)]  # (K, n, P)

        (chunks,) = self._in_chunks(flat.shape[0], step, progress)
        per_finding = torch.cat(chunks, dim=1)  # (K, N, P)
        return torch.stack([_scatter(m, mask.to(device)) for m in per_finding])  # (K, B, S, P)

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
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from anymc3d import heatmap as hm
from anymc3d.device import in_chunks, placement
from anymc3d.planecycle.config import check_layers
from anymc3d.planecycle.converter import VolumeFeatures
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
    #: finding heatmaps that already include the pooling (not to be weighted by the slice importance a_s again)
    unweighted_heatmaps: tuple[str, ...] = ()

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

    def features(self, volume: torch.Tensor, layers: Sequence[int] = ()) -> VolumeFeatures:
        """Token features (``anymc3d features`` / ``similarity``) of a batch of volumes of model input.

        Args:
            volume: (B, D, 3, H, W) normalised slices, on the backbone's device and in its dtype.
            layers: 0-based block indices whose (normed) outputs to return as well.
        """
        raise NotImplementedError(f"encoder kind {self.kind!r} gives no token features")

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
    finding_heatmaps = hm.GRADIENT_METHODS + (hm.OCCLUSION,)
    unweighted_heatmaps = (hm.OCCLUSION,)

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
        """:func:`anymc3d.device.in_chunks` at this encoder's chunk size (the CUDA out-of-memory retry)."""
        return in_chunks(total, self.chunk_size, step, progress)

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

    def features(self, volume: torch.Tensor, layers: Sequence[int] = ()) -> VolumeFeatures:
        """The 2D baseline: every slice through the backbone on its own, shaped like lifted features (the bare
        backbone's timm ``forward_features``, or its ``forward_intermediates`` when ``layers`` are asked for), in
        chunks with the out-of-memory retry."""
        model = self.backbone
        take = check_layers(layers, len(model.blocks))
        b, d = volume.shape[:2]
        g = int(model.num_prefix_tokens)
        h, w = model.patch_embed.dynamic_feat_size(tuple(volume.shape[-2:]))
        flat = volume.flatten(0, 1)  # (B*D, 3, H, W)

        def step(start: int, stop: int) -> list[torch.Tensor]:
            chunk = flat[start:stop]  # (n, 3, H, W)
            if not take:
                return [self._forward_features(chunk)]  # (n, G + h*w, C)
            final, taken = model.forward_intermediates(chunk, indices=list(take), norm=True, output_fmt="NLC",
                                                       return_prefix_tokens=True)
            return [final, *(torch.cat([prefix, patch], dim=1) for patch, prefix in taken)]  # (n, G + h*w, C) each

        columns = self._in_chunks(flat.shape[0], step, None)
        finals, inter = columns[0], {i: columns[1 + j] for j, i in enumerate(take)}

        def split(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            c = tokens.shape[-1]
            return tokens[:, g:].reshape(b, d, h, w, c), tokens[:, :g].reshape(b, d, g, c)

        patches, glob = split(torch.cat(finals))
        return VolumeFeatures(patch_tokens=patches, global_tokens=glob,
                              layers={i: split(torch.cat(inter[i])) for i in take})

    def finding_maps(self, model, views, out, method: str, masks=None,
                     progress: Optional[SliceProgress] = None) -> torch.Tensor:
        """Gradient maps: d logit_k / d h_s through the pooling and head, then :meth:`gradient_maps`."""
        if method not in self.finding_heatmaps:
            raise ValueError(f"{method!r} is not one of {self.finding_heatmaps}")
        if method == hm.OCCLUSION:
            return self.occlusion_maps(model, views, out, masks, progress=progress)
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

    @torch.no_grad()
    def occlusion_maps(self, model, views, out, masks=None, depth: int = hm.OCCLUSION_DEPTH,
                       block: int = hm.OCCLUSION_BLOCK, body_only: bool = True,
                       progress: Optional[SliceProgress] = None, head_chunk: int = 256) -> torch.Tensor:
        """Occlusion of token blocks in the plugin's own slice space, for K findings: (K, B, S, P).

        Entry (k, b, s, p) is logit_k of the case minus logit_k when patch p of the ``depth`` slices centred on s
        (the block moved inside the volume at its ends) is set to the case's fill value (the median of its body
        pixels): how much the finding rests on that block. With ``block`` > 1 a square of ``block`` x ``block``
        patches is occluded at a time (stride ``block``) and each of its patches gets its value: ``block``^2 times
        fewer backbone passes. Slices are independent in this encoder, so each slice with one square filled
        is encoded once (S x P / block^2 backbone passes, in chunks) and every block's logit comes from the pooling and head
        alone, the other slices keeping their clean embeddings: exactly what re-encoding the occluded volume
        gives. With ``body_only``, patches without body pixels (:func:`heatmap.body_mask`) are not occluded and
        score 0: the map is restricted to the body, and the background costs nothing.
        """
        device = next(self.backbone.parameters()).device
        slices = views[0]
        mask = _flat_mask(slices, masks[0] if masks is not None else None)
        b, s_max, m, _ = slices.shape
        grid = self._grid(m, m)
        rest = [e.float().to(device) for e in out.embeddings[1:]]
        rest_masks = [None if masks is None else mk.to(device) for mk in (masks or [None] * len(views))[1:]]
        result = torch.zeros(out.logits.shape[1], b, s_max, grid[0] * grid[1], device=device)
        for case in range(b):
            real = mask[case].nonzero().flatten().to(device)
            clean = out.embeddings[0][case, real].float().to(device)  # (S, C)
            occluded, todo = self.occluded_embeddings(slices[case].to(device)[real], clean, block, body_only, progress)
            deltas = self._block_deltas(model, case, clean, occluded, todo, depth, rest, rest_masks,
                                        out.logits[case].float().to(device), head_chunk)  # (K, S, squares)
            result[:, case, real] = deltas[:, :, self._square_of_patch(grid, block).to(device)]
        return result

    @staticmethod
    def _square_of_patch(grid: tuple[int, int], block: int) -> torch.Tensor:
        """(P,) index of the occluded square (``block`` x ``block`` patches, row-major) holding each patch."""
        rows, cols = torch.meshgrid(torch.arange(grid[0]) // block, torch.arange(grid[1]) // block, indexing="ij")
        return (rows * -(-grid[1] // block) + cols).flatten()

    @torch.no_grad()
    def occluded_embeddings(self, x: torch.Tensor, clean: torch.Tensor, block: int = 1, body_only: bool = True,
                            progress: Optional[SliceProgress] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One case's slices (S, M, M) with one square of ``block`` x ``block`` patches at a time set to the fill
        value, encoded in chunks.

        Returns (S, Q, C) embeddings for the Q squares (``clean`` (S, C) where a square was not occluded) and the
        (n, 2) occluded (slice, square) pairs: every square, or with ``body_only`` those holding body pixels.
        """
        if block < 1:
            raise ValueError(f"block must be >= 1 patch, got {block}")
        x = x.float()
        grid = self._grid(*x.shape[-2:])
        ph, pw = self.backbone.patch_embed.patch_size
        sh, sw = block * ph, block * pw
        squares = (-(-grid[0] // block), -(-grid[1] // block))
        body = hm.body_mask(x)
        fill = x[body].median() if body.any() else x.median()
        padded = torch.zeros(len(x), squares[0] * sh, squares[1] * sw, dtype=torch.bool, device=x.device)
        padded[:, :grid[0] * ph, :grid[1] * pw] = body[:, :grid[0] * ph, :grid[1] * pw]
        in_body = padded.reshape(len(x), squares[0], sh, squares[1], sw).any(4).any(2).reshape(len(x), -1)  # (S, Q)
        todo = (in_body if body_only else torch.ones_like(in_body)).nonzero()  # (n, 2): slice, square
        occluded = clean[:, None].repeat(1, in_body.shape[1], 1)  # (S, Q, C)

        def step(start: int, stop: int) -> list:
            batch = x[todo[start:stop, 0]].clone()  # (n, M, M)
            for i, q in enumerate(todo[start:stop, 1].tolist()):
                r, c = divmod(q, squares[1])
                batch[i, r * sh:min((r + 1) * sh, grid[0] * ph), c * sw:min((c + 1) * sw, grid[1] * pw)] = fill
            return [self._forward_features(to_model_input(batch))[:, 0].float()]

        if len(todo):
            (cls,) = self._in_chunks(len(todo), step, progress)
            occluded[todo[:, 0], todo[:, 1]] = torch.cat(cls)
        return occluded, todo

    @staticmethod
    @torch.no_grad()
    def _block_deltas(model, case, clean, occluded, todo, depth, rest, rest_masks, logits, head_chunk):
        """(K, S, P) logit drops of the blocks centred on each (slice, patch) in ``todo`` (others stay 0)."""
        n_slices, n_patches, _ = occluded.shape
        deltas = logits.new_zeros(logits.shape[0], n_slices, n_patches)
        for start in range(0, len(todo), head_chunk):
            part = todo[start:start + head_chunk]
            h = clean[None].repeat(len(part), 1, 1)  # (n, S, C)
            for i, (s, p) in enumerate(part.tolist()):
                lo = max(0, min(s - depth // 2, n_slices - depth))
                hi = min(n_slices, lo + depth)
                h[i, lo:hi] = occluded[lo:hi, p]
            others = [e[case:case + 1].expand(len(part), -1, -1) for e in rest]
            others_masks = [None if mk is None else mk[case:case + 1].expand(len(part), -1) for mk in rest_masks]
            v, _ = model.head.pool([h, *others], [None, *others_masks])
            deltas[:, part[:, 0], part[:, 1]] = (logits[None] - model.forward_head(v)).T
        return deltas

"""Heatmaps: where the model looked, per slice, weighted by slice importance and stacked to 3D.

- ``attention`` (the paper's map): last block CLS -> patch attention, mean over heads, registers excluded.
- ``rollout``: attention rollout (Abnar & Zuidema 2020) over all blocks, head mean, residual added.
- ``grad_rollout`` / ``grad_last``: gradient-weighted attention (Chefer et al. 2021) for one finding,
  rolled out over all blocks or taken from the last block only.
- ``occlusion``: for one finding, the logit's drop when a square of ``OCCLUSION_BLOCK`` x ``OCCLUSION_BLOCK``
  patches on ``OCCLUSION_DEPTH`` neighbouring slices is set to the case's body median (computed by the encoder: ``SliceEncoder.occlusion_maps``), in the body only.

The paper's map needs one attention row only: :class:`ClsRowRecorder` takes the last block's post-norm
(and, for DINOv3, rotary) queries and keys from hooks and computes the CLS query's row, while every block
keeps its fused (SDPA) attention. Rollout and the gradient methods need whole matrices: :class:`AttentionRecorder`
hooks ``attn.attn_drop`` with ``fused_attn`` off; the hook sees the softmaxed (B, heads, N, N) matrix for
timm's ``Attention`` and ``EvaAttention`` alike and leaves the output unchanged.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from timm.layers import apply_rot_embed_cat
from torch import nn

from anymc3d.contract import GRADIENT_METHODS, HEATMAP_METHODS as METHODS, OCCLUSION  # noqa: F401 (re-exported)

#: slices per occluded block (a square of patches on this many neighbouring slices)
OCCLUSION_DEPTH = 3
#: patches per side of the occluded square: single patches (2 costs 4 times fewer backbone passes, but a square of
#: 2 x 2 patches puts the map's maximum up to two patches from the finding; measured on real anatomy,
#: benchmarks/results/real-anatomy-maps-*)
OCCLUSION_BLOCK = 1


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"heatmap method must be one of {METHODS}, got {method!r}")
    return method


class AttentionRecorder:
    """Context manager recording the attention matrices of some blocks during a forward pass.

    Args:
        blocks: the transformer blocks to record (each has ``.attn.attn_drop``).
        reduce: applied to each (B, heads, N, N) matrix before it is kept (e.g. keep the CLS row
            only, to save memory); None keeps the matrix as it is.
        retain_grad: keep the gradient of each recorded matrix (for gradient methods; ``reduce``
            must then be None and the forward must build a graph).
    """

    def __init__(self, blocks: Sequence[nn.Module], reduce: Optional[Callable] = None, retain_grad: bool = False):
        if retain_grad and reduce is not None:
            raise ValueError("retain_grad needs the full attention matrices (reduce=None)")
        self.blocks = list(blocks)
        self.reduce = reduce
        self.retain_grad = retain_grad
        self.maps: list[torch.Tensor] = []
        self._handles: list = []
        self._fused: list[bool] = []

    def _hook(self, module, inputs, output):
        if self.retain_grad and output.requires_grad:
            output.retain_grad()
        self.maps.append(output if self.reduce is None else self.reduce(output))

    def __enter__(self) -> "AttentionRecorder":
        self.maps = []
        try:
            for blk in self.blocks:
                self._fused.append(blk.attn.fused_attn)
                blk.attn.fused_attn = False
                self._handles.append(blk.attn.attn_drop.register_forward_hook(self._hook))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for blk, fused in zip(self.blocks, self._fused):
            blk.attn.fused_attn = fused
        self._handles, self._fused = [], []


class ClsRowRecorder:
    """Context manager computing one block's CLS-query attention row (head mean) without unfusing it.

    Forward hooks on ``attn.q_norm`` / ``attn.k_norm`` (modules of timm's ``Attention`` and ``EvaAttention``,
    ``nn.Identity`` when unused) see q and k as the block uses them; a pre-hook on ``attn`` sees DINOv3's
    ``rope``, applied here to the keys of the patch tokens exactly where EvaAttention applies it (the CLS query
    is a prefix token and gets none). Only (B, heads, 1, N) scores are formed: O(N) memory, not O(N^2).
    """

    def __init__(self, block: nn.Module):
        self.attn = block.attn
        self._q = self._k = self._rope = None
        self._handles: list = []
        self.rows: list[torch.Tensor] = []

    def __enter__(self) -> "ClsRowRecorder":
        self.rows = []

        def keep(name):
            def hook(module, inputs, output):
                setattr(self, name, output)
                if self._q is not None and self._k is not None:
                    self.rows.append(self._row())
                    self._q = self._k = None
            return hook

        def keep_rope(module, args, kwargs):
            self._rope = kwargs.get("rope")

        try:
            self._handles = [self.attn.q_norm.register_forward_hook(keep("_q")),
                             self.attn.k_norm.register_forward_hook(keep("_k")),
                             self.attn.register_forward_pre_hook(keep_rope, with_kwargs=True)]
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _row(self) -> torch.Tensor:
        q, k = self._q[:, :, :1].float(), self._k.float()  # (B, H, 1, d), (B, H, N, d)
        if self._rope is not None:
            npt, half = self.attn.num_prefix_tokens, getattr(self.attn, "rotate_half", False)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], self._rope.float(), half=half)], dim=2)
        scores = (q * self.attn.scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
        return scores.softmax(dim=-1)[:, :, 0].mean(dim=1)  # (B, N)

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._q, self._k, self._rope = [], None, None, None


def cls_row_mean(attn: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, N) -> (B, N): the CLS query's attention averaged over heads."""
    return attn[:, :, 0, :].float().mean(dim=1)


def head_mean(attn: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, N) -> (B, N, N)."""
    return attn.float().mean(dim=1)


def cls_attention(cls_rows: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """(B, N) CLS rows -> (B, P) attention on the patch tokens (CLS and registers dropped)."""
    return cls_rows[:, num_prefix_tokens:]


def attention_rollout(attentions: Sequence[torch.Tensor], num_prefix_tokens: int) -> torch.Tensor:
    """Rollout of head-averaged attentions [(B, N, N) per block, first to last] -> (B, P).

    Each block's matrix gets the identity (the residual path) and is row-normalised; the product over
    blocks says how much each input token reaches the final CLS token.
    """
    b, n, _ = attentions[0].shape
    eye = torch.eye(n, device=attentions[0].device)
    rollout = eye.expand(b, n, n)
    for a in attentions:
        a = a.float() + eye
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout  # (B, N, N)
    return rollout[:, 0, num_prefix_tokens:]


def gradient_rollout(attentions: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], num_prefix_tokens: int,
                     last_only: bool = False) -> torch.Tensor:
    """Gradient-weighted attention relevance [(B, heads, N, N) per block, first to last] -> (B, P).

    A_l = mean_heads(relu(grad_l * attn_l)); rollout R = prod_l (I + A_l) applied as R <- R + A_l R;
    ``last_only`` returns the last block's A_L CLS row.
    """
    weighted = [(g.float() * a.float()).clamp(min=0).mean(dim=1) for a, g in zip(attentions, grads)]  # (B, N, N)
    if last_only:
        return weighted[-1][:, 0, num_prefix_tokens:]
    b, n, _ = weighted[0].shape
    relevance = torch.eye(n, device=weighted[0].device).expand(b, n, n)
    for a in weighted:
        relevance = relevance + a @ relevance  # (B, N, N)
    return relevance[:, 0, num_prefix_tokens:]


def to_grid(patch_maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(S, P) per-patch values -> (S, h, w) on the patch grid (timm flattens patches row-major)."""
    return patch_maps.reshape(patch_maps.shape[0], *grid)


def weight_by_importance(slice_maps: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """Stack per-slice maps (S, h, w) into the volume heatmap: each slice weighted by a_s, max -> 1.

    A map that is zero everywhere stays zero (no division by zero).
    """
    volume = slice_maps.float() * importance.float().reshape(-1, 1, 1)  # (S, h, w)
    peak = volume.max()
    return volume / peak if peak > 0 else volume


def body_mask(slices: torch.Tensor) -> torch.Tensor:
    """(S, M, M) slices in [0, 1] -> (S, M, M) bool: the body, i.e. pixels above the volume's Otsu threshold
    (SimpleITK), holes filled slice by slice (dark structures inside the body, e.g. ventricles, belong to it)."""
    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage

    x = slices.detach().float().cpu().numpy()
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.Execute(sitk.GetImageFromArray(x))
    above = x > otsu.GetThreshold()
    filled = np.stack([ndimage.binary_fill_holes(s) for s in above]) if above.any() else above
    return torch.from_numpy(filled).to(slices.device)

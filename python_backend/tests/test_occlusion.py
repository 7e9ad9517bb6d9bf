"""Occlusion maps against a direct recomputation: each block filled in the slices and the whole model run again."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from anymc3d import heatmap as hm
from test_model import _model, padded_and_single_maps


def _case(size, n=5, seed=0):
    """A 'body' (bright disc with texture) on a dark background, so body-only occlusion has something to skip."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.3 * size) ** 2).float()
    return (0.02 * torch.rand(n, size, size, generator=g) + disc * (0.5 + 0.4 * torch.rand(n, size, size, generator=g)))


def _direct(model, x, s, p, depth, fill, patch, grid, block=1):
    """logit drop when the block x block square of patches holding patch p, on the depth slices centred on s, is
    set to ``fill``, by a full forward."""
    n = x.shape[0]
    lo = max(0, min(s - depth // 2, n - depth))
    y = x.clone()
    r, c = divmod(p, grid[1])
    r0, c0 = (r // block) * block * patch, (c // block) * block * patch
    y[lo:lo + depth, r0:r0 + block * patch, c0:c0 + block * patch] = fill
    with torch.inference_mode():
        return (model([x[None]]).logits - model([y[None]]).logits)[0]  # (K,)


@pytest.mark.parametrize("depth,block", [(1, 1), (3, 1), (3, 2), (2, 3)])
def test_occlusion_equals_recomputing_each_occluded_volume(depth, block):
    model, bb = _model("dinov2", chunk_size=7)  # chunks that do not divide S x P
    size = bb.spec.img_size
    x = _case(size)
    with torch.inference_mode():
        out = model([x[None]])
    maps = model.encoder.occlusion_maps(model, [x[None]], out, depth=depth, block=block, body_only=False, head_chunk=5)
    patch = bb.spec.patch_size
    grid = (size // patch, size // patch)
    assert maps.shape == (model.num_classes, 1, x.shape[0], grid[0] * grid[1])
    body = hm.body_mask(x)
    fill = float(x[body].median())
    for s in (0, 2, x.shape[0] - 1):  # both ends (the block moved inside) and the middle
        for p in (0, 5, 6, grid[0] * grid[1] - 1):
            np.testing.assert_allclose(maps[:, 0, s, p], _direct(model, x, s, p, depth, fill, patch, grid, block),
                                       rtol=1e-4, atol=1e-5)
    assert maps.abs().max() > 1e-3  # occlusion changes the logits: the comparison can fail


def test_body_only_skips_the_background_and_keeps_body_blocks():
    model, bb = _model("dinov2", chunk_size=4)
    size = bb.spec.img_size
    x = _case(size, seed=1)
    with torch.inference_mode():
        out = model([x[None]])
    full = model.encoder.occlusion_maps(model, [x[None]], out, depth=1, block=1, body_only=False)
    body = model.encoder.occlusion_maps(model, [x[None]], out, depth=1, block=1, body_only=True)
    patch = bb.spec.patch_size
    in_body = hm.body_mask(x).reshape(x.shape[0], size // patch, patch, size // patch, patch).any(4).any(2).flatten(1)
    assert 0 < in_body.sum() < in_body.numel()
    assert torch.all(body[:, 0][:, ~in_body] == 0)
    np.testing.assert_allclose(body[:, 0][:, in_body], full[:, 0][:, in_body], rtol=1e-5, atol=1e-6)


def test_padded_batch_equals_case_by_case():
    model, bb = _model("dinov2", chunk_size=6)
    size = bb.spec.img_size
    a, b = _case(size, 4, seed=2), _case(size, 3, seed=3)
    maps, refs = padded_and_single_maps(model, [a, b], "occlusion")
    for i, (x, ref) in enumerate(zip((a, b), refs)):
        np.testing.assert_allclose(maps[:, i, :x.shape[0]], ref[:, 0], rtol=1e-4, atol=1e-6)
    assert torch.all(maps[:, 1, 3] == 0)


def test_body_mask_fills_dark_structures_inside_the_body():
    x = torch.zeros(2, 20, 20)
    x[:, 4:16, 4:16] = 0.8
    x[:, 8:12, 8:12] = 0.05  # a dark "ventricle" inside
    m = hm.body_mask(x)
    assert m[:, 4:16, 4:16].all() and not m[:, :4].any() and not m[:, :, 16:].any()


@pytest.mark.slow
def test_engine_occlusion_is_the_logit_drop_of_rerunning_the_engine_on_each_occluded_volume(demo_dir):
    """The engine's default occlusion map (``OCCLUSION_BLOCK`` x ``OCCLUSION_BLOCK`` patches on ``OCCLUSION_DEPTH``
    slices, body only, drops clamped at 0, max 1) against filling each square by hand and predicting again."""
    from anymc3d.engine import Engine

    engine = Engine(demo_dir / "backbone.safetensors", device="cpu")
    name = engine.add_plugin(demo_dir / "plugin.anymc3d")
    x = _case(112, n=3, seed=4)
    pred = engine.predict_slices([x], name, heatmap="occlusion")
    side = engine.backbone.spec.patch_size * hm.OCCLUSION_BLOCK
    squares = -(-112 // side)
    body = hm.body_mask(x)
    fill = float(x[body].median())
    depth, n = hm.OCCLUSION_DEPTH, x.shape[0]
    for k, label in enumerate(pred.labels):
        drops = np.zeros((n, squares, squares))
        for s in range(n):
            lo = max(0, min(s - depth // 2, n - depth))
            for r in range(squares):
                for c in range(squares):
                    rows, cols = slice(r * side, (r + 1) * side), slice(c * side, (c + 1) * side)
                    if not body[s, rows, cols].any():
                        continue  # outside the body: not occluded, scores 0
                    y = x.clone()
                    for t in range(lo, lo + depth):
                        if body[t, rows, cols].any():
                            y[t, rows, cols] = fill
                    drops[s, r, c] = pred.logits[k] - engine.predict_slices([y], name).logits[k]
        drops = drops.clip(min=0).repeat(hm.OCCLUSION_BLOCK, 1).repeat(hm.OCCLUSION_BLOCK, 2)[:, :8, :8]
        assert drops.max() > 1e-3  # occlusion moves the logit: the comparison can fail
        np.testing.assert_allclose(pred.finding_heatmaps[label], drops / drops.max(), rtol=1e-3, atol=1e-4)

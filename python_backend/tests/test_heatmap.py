"""Heatmaps against independent computations: attention recomputed by hand from the last block's q and k,
rollout written with numpy loops, and the chunked gradient maps against one full autograd pass."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from anymc3d import heatmap as hm
from anymc3d.demo import random_plugin
from anymc3d.engine import Engine
from anymc3d.plugin import save_plugin
from anymc3d.preprocessing import to_model_input
from conftest import small_backbone


def _engine_with_plugin(tmp_path, family="dinov2", chunk_size=4, num_views=1):
    bb = small_backbone(family)
    views = ("a", "b")[:num_views]
    config, head, lora = random_plugin(bb.model, bb.spec, views=views, lora_scale=0.2)
    path = save_plugin(tmp_path / f"p{family}.anymc3d", config, head, lora)
    fresh = small_backbone(family)  # a backbone without the adapters random_plugin attached
    engine = Engine(fresh, device="cpu", chunk_size=chunk_size)
    return engine, engine.add_plugin(path), fresh


def _slices(n, size, seed=0):
    return torch.rand(n, size, size, generator=torch.Generator().manual_seed(seed))


def _hand_last_block_attention(model, x):
    """softmax(q k^T / sqrt(d)) of the last block from its own qkv weights: (B, heads, N, N)."""
    captured = {}
    blk = model.blocks[-1]
    handle = blk.norm1.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    with torch.no_grad():
        model.forward_features(x)
    handle.remove()
    xn = captured["x"]  # (B, N, C)
    b, n, c = xn.shape
    heads = blk.attn.num_heads
    qkv = torch.nn.functional.linear(xn, blk.attn.qkv.get_base_layer().weight if hasattr(blk.attn.qkv, "get_base_layer")
                                     else blk.attn.qkv.weight, None)
    if hasattr(blk.attn.qkv, "lora_A"):  # add the active adapter's low-rank update by hand
        name = blk.attn.qkv.active_adapters[0]
        a, bb = blk.attn.qkv.lora_A[name].weight, blk.attn.qkv.lora_B[name].weight
        qkv = qkv + blk.attn.qkv.scaling[name] * (xn @ a.T @ bb.T)
    bias = blk.attn.qkv.get_base_layer().bias if hasattr(blk.attn.qkv, "get_base_layer") else blk.attn.qkv.bias
    qkv = qkv + bias
    q, k, _ = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # (B, heads, N, d)
    return torch.softmax(q @ k.transpose(-1, -2) / (c // heads) ** 0.5, dim=-1)


def test_recorded_attention_equals_attention_by_hand_and_output_is_unchanged():
    bb = small_backbone("dinov2")
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        fused = bb.model.forward_features(x)
        with hm.AttentionRecorder(bb.model.blocks[-1:]) as rec:
            recorded_out = bb.model.forward_features(x)
    torch.testing.assert_close(recorded_out, fused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rec.maps[0], _hand_last_block_attention(bb.model, x), rtol=1e-5, atol=1e-6)
    assert bb.model.blocks[-1].attn.fused_attn  # restored


def test_recorder_restores_fused_attention_after_an_error():
    bb = small_backbone("dinov3")
    with pytest.raises(AssertionError, match="divisible by patch size"):
        with hm.AttentionRecorder(bb.model.blocks):
            bb.model.forward_features(torch.randn(1, 3, 17, 17))  # not a multiple of the patch: fails inside
    assert all(b.attn.fused_attn for b in bb.model.blocks)
    assert all(not b.attn.attn_drop._forward_hooks for b in bb.model.blocks)


def test_engine_heatmap_equals_hand_computed_cls_attention_weighted_by_slice_importance(tmp_path):
    engine, name, model = _engine_with_plugin(tmp_path, "dinov2", chunk_size=3)
    slices = _slices(7, 56)
    pred = engine.predict_slices([slices], name, heatmap="attention")
    attn = _hand_last_block_attention(model.model, to_model_input(slices))  # adapter is active after predict
    npt = model.model.num_prefix_tokens
    per_slice = attn[:, :, 0, npt:].mean(1).reshape(7, 4, 4)  # CLS row, registers dropped, head mean
    expected = per_slice * torch.from_numpy(pred.slice_importance[0]).reshape(7, 1, 1)
    expected = expected / expected.max()
    np.testing.assert_allclose(pred.heatmap, expected.numpy(), rtol=1e-4, atol=1e-6)
    assert pred.heatmap.std() > 0.05  # a load-bearing backbone gives a non-uniform map


def test_heatmap_excludes_register_tokens(tmp_path):
    engine, name, _ = _engine_with_plugin(tmp_path, "dinov3")
    pred = engine.predict_slices([_slices(4, 64)], name, heatmap="attention")
    assert pred.heatmap.shape == (4, 4, 4)  # 16 patches per slice: CLS and 4 registers dropped


def _numpy_rollout(mats):
    """Abnar & Zuidema rollout with explicit loops: mats is a list of (N, N) head-averaged attentions."""
    n = mats[0].shape[0]
    result = np.eye(n)
    for a in mats:
        a = a + np.eye(n)
        a = a / a.sum(axis=1, keepdims=True)
        result = a @ result
    return result


def test_attention_rollout_equals_numpy_reference():
    rng = np.random.default_rng(0)
    mats = [rng.random((2, 3, 9, 9)) for _ in range(4)]
    mats = [m / m.sum(-1, keepdims=True) for m in mats]
    out = hm.attention_rollout([torch.from_numpy(m).mean(1) for m in mats], num_prefix_tokens=1)
    for b in range(2):
        expected = _numpy_rollout([m[b].mean(0) for m in mats])[0, 1:]
        np.testing.assert_allclose(out[b].numpy(), expected, rtol=1e-6)


def test_gradient_rollout_equals_numpy_reference():
    rng = np.random.default_rng(1)
    attn = [rng.random((1, 2, 6, 6)) for _ in range(3)]
    grad = [rng.normal(size=(1, 2, 6, 6)) for _ in range(3)]
    weighted = [np.maximum(g[0] * a[0], 0).mean(0) for a, g in zip(attn, grad)]
    r = np.eye(6)
    for w in weighted:
        r = r + w @ r
    t = lambda xs: [torch.from_numpy(x) for x in xs]  # noqa: E731
    np.testing.assert_allclose(hm.gradient_rollout(t(attn), t(grad), 1)[0].numpy(), r[0, 1:], rtol=1e-6)
    np.testing.assert_allclose(hm.gradient_rollout(t(attn), t(grad), 1, last_only=True)[0].numpy(), weighted[-1][0, 1:])


@pytest.mark.parametrize("method", ["grad_rollout", "grad_last"])
def test_chunked_gradient_maps_equal_one_full_autograd_pass(tmp_path, method):
    """The engine back-propagates chunk by chunk; the reference builds one graph over all slices."""
    engine, name, bb = _engine_with_plugin(tmp_path, "dinov2", chunk_size=2)
    slices = _slices(5, 56, seed=3)
    pred = engine.predict_slices([slices], name, heatmap=method)
    head = engine.plugins[name].plugin.head
    x = to_model_input(slices).requires_grad_(True)
    with hm.AttentionRecorder(bb.model.blocks, retain_grad=True) as rec:
        cls = bb.model.forward_features(x)[:, 0]
        logits = head([cls[None]])[0]
    npt = bb.model.num_prefix_tokens
    for k, label in enumerate(pred.labels):
        for a in rec.maps:
            a.grad = None
        logits[k].backward(retain_graph=True)
        maps = hm.gradient_rollout(rec.maps, [a.grad for a in rec.maps], npt, last_only=method == "grad_last")
        expected = hm.weight_by_importance(maps.reshape(5, 4, 4), torch.from_numpy(pred.slice_importance[0]))
        np.testing.assert_allclose(pred.finding_heatmaps[label], expected.detach().numpy(), rtol=1e-3, atol=1e-5)
    maps = list(pred.finding_heatmaps.values())
    assert np.abs(maps[0] - maps[1]).max() > 1e-3  # per finding, not one map for all


def test_rollout_through_the_engine_is_a_proper_map(tmp_path):
    engine, name, _ = _engine_with_plugin(tmp_path, "dinov3")
    pred = engine.predict_slices([_slices(3, 64)], name, heatmap="rollout")
    assert pred.heatmap.shape == (3, 4, 4) and np.isclose(pred.heatmap.max(), 1.0) and pred.heatmap.min() >= 0


def test_zero_map_stays_zero():
    assert torch.count_nonzero(hm.weight_by_importance(torch.zeros(2, 3, 3), torch.ones(2) / 2)) == 0

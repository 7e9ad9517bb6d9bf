"""The model module: one forward for inference, heatmaps and training, checked against independent paths.

Batched (padded, masked) equals case by case; merged LoRA equals the adapter path and unmerging restores the
base weights bit for bit; the CLS-row attention equals the row of the full attention matrix; an out-of-memory
retry gives the same maps as no retry; a new encoder kind plugs in without touching engine, pooling, head or CLI;
backward reaches every trainable parameter and no frozen one.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from anymc3d import encoders
from anymc3d import heatmap as hm
from anymc3d.demo import random_plugin
from anymc3d.engine import Engine
from anymc3d.lora import activate, add_adapter, load_adapter_state, merge, merged_adapter, set_trainable, unmerge
from anymc3d.model import AnyMC3DModel
from anymc3d.plugin import TaskHead, save_plugin
from anymc3d.image_reading import read_image
from anymc3d.image_writing import write_image_atomic
from anymc3d.preprocessing import prepare, to_model_input
from anymc3d.synthetic import make_ct_volume
from conftest import small_backbone


def _slices(n, size, seed=0):
    return torch.rand(n, size, size, generator=torch.Generator().manual_seed(seed))


def _model(family="dinov2", views=1, chunk_size=3, seed=0):
    """A model with a random (non-zero) LoRA per view on a fresh load-bearing backbone."""
    source = small_backbone(family)
    config, head, lora = random_plugin(source.model, source.spec, views=("a", "b")[:views], lora_scale=0.3, seed=seed)
    bb = small_backbone(family)
    adapters = []
    for i, state in enumerate(lora):
        add_adapter(bb.model, f"v{i}", config.lora)
        load_adapter_state(bb.model, f"v{i}", state)
        adapters.append(f"v{i}")
    fresh = TaskHead(head.embed_dim, head.num_classes, head.num_views)
    fresh.load_state_dict(head.state_dict())
    return AnyMC3DModel(bb.model, fresh, adapters, chunk_size=chunk_size), bb


def pad(volumes):
    """Volumes (S_i, M, M) as one padded batch (B, max S_i, M, M) and its mask (B, max S_i), True on real slices."""
    longest, size = max(x.shape[0] for x in volumes), volumes[0].shape[-1]
    padded = torch.zeros(len(volumes), longest, size, size)
    mask = torch.zeros(len(volumes), longest, dtype=torch.bool)
    for i, x in enumerate(volumes):
        padded[i, :x.shape[0]], mask[i, :x.shape[0]] = x, True
    return padded, mask


def padded_and_single_maps(model, volumes, method):
    """Finding maps of one-view cases batched (padded, masked) (K, B, S, P) and of each case alone [(K, 1, S_i, P)]."""
    padded, mask = pad(volumes)
    with torch.inference_mode():
        out = model([padded], [mask])
        single = [model([x[None]]) for x in volumes]
    maps = model.finding_maps([padded], out, method, [mask])
    return maps, [model.finding_maps([x[None]], o, method) for x, o in zip(volumes, single)]


@pytest.mark.parametrize("family", ["dinov2", "dinov3"])
def test_batched_padded_forward_equals_case_by_case(family):
    model, bb = _model(family, views=2)
    size = bb.spec.img_size
    cases = [(_slices(5, size, 1), _slices(4, size, 2)), (_slices(3, size, 3), _slices(6, size, 4))]
    with torch.inference_mode():
        alone = [model([a[None], b[None]], heatmap="attention") for a, b in cases]
        views, masks = map(list, zip(*(pad([c[v] for c in cases]) for v in range(2))))
        batched = model(views, masks, heatmap="attention")
    for i, single in enumerate(alone):
        np.testing.assert_allclose(batched.logits[i], single.logits[0], rtol=1e-5, atol=1e-6)
        for v in range(2):
            n = cases[i][v].shape[0]
            np.testing.assert_allclose(batched.importance[v][i, :n], single.importance[v][0], rtol=1e-5, atol=1e-7)
            assert torch.all(batched.importance[v][i, n:] == 0)  # padding gets no weight
        n0 = cases[i][0].shape[0]
        np.testing.assert_allclose(batched.patch_maps[i, :n0], single.patch_maps[0], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(alone[0].logits, alone[1].logits)  # the cases differ, so the check can fail


def test_batched_gradient_maps_equal_case_by_case():
    model, bb = _model("dinov2", chunk_size=2)
    size = bb.spec.img_size
    a, b = _slices(4, size, 5), _slices(3, size, 6)
    maps, refs = padded_and_single_maps(model, [a, b], "grad_rollout")  # (K, 2, 4, P), [(K, 1, S, P)]
    for i, (x, ref) in enumerate(zip((a, b), refs)):
        np.testing.assert_allclose(maps[:, i, : x.shape[0]], ref[:, 0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["dinov2", "dinov3"])
def test_cls_row_attention_equals_the_full_matrix_row(family):
    """One query row with fused attention everywhere == the CLS row of the unfused last block's matrix;
    and recording it leaves the forward's output unchanged. LoRA active, so its qkv update is included."""
    model, bb = _model(family)
    x = to_model_input(_slices(3, bb.spec.img_size, 7))
    fused_before = [blk.attn.fused_attn for blk in bb.model.blocks]
    with torch.no_grad():
        plain = bb.model.forward_features(x)
        with hm.ClsRowRecorder(bb.model.blocks[-1]) as row:
            with_row = bb.model.forward_features(x)
        with hm.AttentionRecorder(bb.model.blocks[-1:], reduce=hm.cls_row_mean) as full:
            bb.model.forward_features(x)
    assert [blk.attn.fused_attn for blk in bb.model.blocks] == fused_before  # the recorders put the flags back
    np.testing.assert_allclose(with_row, plain, rtol=0, atol=0)
    np.testing.assert_allclose(row.rows[0], full.maps[0], rtol=1e-5, atol=1e-7)
    assert row.rows[0].std(dim=-1).min() > 1e-3  # not uniform: a transposed or rope-less row would differ


def test_merged_lora_equals_adapters_and_unmerge_is_bit_exact():
    model, bb = _model("dinov3")
    base = {k: v.clone() for k, v in bb.model.state_dict().items()}
    x = [_slices(4, bb.spec.img_size, 8)[None]]
    with torch.inference_mode():
        adapter = model(x, heatmap="attention")
        merge(bb.model, "v0")
        assert merged_adapter(bb.model) == "v0"
        merged = model(x, heatmap="attention")
        changed = any(not torch.equal(base[k], v) for k, v in bb.model.state_dict().items())
        unmerge(bb.model)
        after = model(x, heatmap="attention")
    assert changed  # merging really rewrote the weights
    np.testing.assert_allclose(merged.logits, adapter.logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(merged.patch_maps, adapter.patch_maps, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(base[k], v) for k, v in bb.model.state_dict().items())  # bit for bit
    assert torch.equal(after.logits, adapter.logits)


def test_engine_merging_switches_plugins_exactly(tmp_path):
    volume = make_ct_volume(size=(40, 36, 8), spacing=(0.9, 0.9, 3.0), lesion=True, seed=2)
    paths = []
    for seed in (1, 2):
        source = small_backbone()
        config, head, lora = random_plugin(source.model, source.spec, name=f"p{seed}", lora_scale=0.3, seed=seed)
        paths.append(save_plugin(tmp_path / f"p{seed}.anymc3d", config, head, lora))
    results = {}
    for merge_lora in (False, True):
        engine = Engine(small_backbone(), device="cpu", merge_lora=merge_lora)
        names = [engine.add_plugin(p) for p in paths]
        base = {k: v.clone() for k, v in engine.model.state_dict().items() if "lora_" not in k}
        # p1, p2, p1 again: each switch restores the base weights before merging the next plugin
        results[merge_lora] = [engine.predict_image(volume, [n], heatmap="attention").predictions[0]
                               for n in (names[0], names[1], names[0])]
        engine.remove_plugin(names[0]), engine.remove_plugin(names[1])
        assert all(torch.equal(base[k], v) for k, v in engine.model.state_dict().items() if k in base)
    for plain, merged in zip(results[False], results[True]):
        np.testing.assert_allclose(merged.probabilities, plain.probabilities, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(merged.heatmap, plain.heatmap, rtol=1e-3, atol=1e-5)
    assert np.array_equal(results[True][0].probabilities, results[True][2].probabilities)


def test_out_of_memory_retry_redoes_the_whole_unit(monkeypatch):
    """An OOM raised once in the middle of a chunk's per-finding loop: the chunk is redone at half size and
    the maps equal a run without the error (no duplicated or missing rows)."""
    model, bb = _model("dinov2", chunk_size=4)
    x = [_slices(6, bb.spec.img_size, 9)[None]]
    with torch.inference_mode():
        out = model(x)
    reference = model.finding_maps(x, out, "grad_rollout")
    real, calls = hm.gradient_rollout, {"n": 0}

    def failing_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second finding of the first chunk: one finding's row is done already
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(*args, **kwargs)

    monkeypatch.setattr(hm, "gradient_rollout", failing_once)
    retried = model.finding_maps(x, out, "grad_rollout")
    assert calls["n"] > model.num_classes * 2  # it did fail and redo
    assert retried.shape == reference.shape
    np.testing.assert_allclose(retried, reference, rtol=1e-5, atol=1e-7)


def test_backward_reaches_every_trainable_parameter_and_no_frozen_one():
    model, bb = _model("dinov3", views=2)
    set_trainable(bb.model, None)
    for p in model.lora_parameters():
        p.requires_grad_(True)
    size = bb.spec.img_size
    out = model([_slices(3, size, 1)[None], _slices(2, size, 2)[None]], patch_tokens=True)
    (out.logits.sum() + out.patch_tokens[0].mean()).backward()
    lora = dict((n, p) for n, p in bb.model.named_parameters() if "lora_" in n)
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values()), \
        [n for n, p in lora.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert all(p.grad is None for n, p in bb.model.named_parameters() if "lora_" not in n)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())
    assert {id(p) for p in model.lora_parameters()} == {id(p) for p in lora.values()}
    assert out.patch_tokens[0].shape == (1, 3, size // 16, size // 16, bb.model.embed_dim)


class _MeanPatchEncoder(encoders.SliceEncoder):
    """A trivial second kind for the test: the slice embedding is the mean of the patch tokens, not CLS."""

    forward_heatmaps = finding_heatmaps = ()

    def forward(self, slices, mask=None, *, patch_tokens=False, heatmap=None, progress=None):
        out = super().forward(slices, mask, patch_tokens=True)
        return encoders.EncoderOutput(cls=out.patch_tokens.mean(dim=(2, 3)),
                                      patch_tokens=out.patch_tokens if patch_tokens else None)


def test_a_new_encoder_kind_plugs_in_without_touching_engine_or_cli(tmp_path, monkeypatch):
    monkeypatch.setitem(encoders.ENCODERS, "mean_patch", _MeanPatchEncoder)
    _MeanPatchEncoder.kind = "mean_patch"
    source = small_backbone()
    config, head, lora = random_plugin(source.model, source.spec, name="meanp", lora_scale=0.3, seed=4)
    config.kind = "mean_patch"
    plugin = save_plugin(tmp_path / "meanp.anymc3d", config, head, lora)
    volume = tmp_path / "v.nii.gz"
    write_image_atomic(make_ct_volume(size=(40, 36, 6), spacing=(0.9, 0.9, 3.0), lesion=True, seed=1), volume)
    engine = Engine(small_backbone(), device="cpu")
    name = engine.add_plugin(plugin)
    pred = engine.predict_file(volume).predictions[0]
    assert pred.kind == "mean_patch"
    # independent: the mean patch token per slice by hand (adapter active), then the plugin's pooling and head
    slices, _ = prepare(read_image(volume), config.preprocessing[0])
    model = engine.plugins[name].model
    activate(engine.model, model.adapters[0])
    with torch.no_grad():
        tokens = engine.model.forward_features(to_model_input(slices))[:, engine.model.num_prefix_tokens:]
        h = tokens.mean(dim=1)[None]  # (1, S, C)
        logits = model.head([h])[0]
    np.testing.assert_allclose(pred.logits, logits.numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="heatmap"):
        engine.predict_file(volume, heatmap="attention")
    from anymc3d.cli import main  # the CLI runs it like any plugin
    out = tmp_path / "r.json"
    assert main(["predict", str(volume), "--backbone", str(_save_small(tmp_path)), "--plugin", str(plugin),
                 "--device", "cpu", "--progress", "none", "--json", str(out)]) == 0


def _save_small(tmp_path):
    from anymc3d.backbone import save_backbone

    bb = small_backbone()
    return save_backbone(bb.model, bb.spec, tmp_path / "bb.safetensors")


def test_compiled_path_falls_back_to_eager_cleanly(monkeypatch, caplog):
    """Where torch.compile cannot work (here: a compiler that raises on first call), the engine warns once
    and gives the eager results; the failure is remembered, so later calls do not try again."""
    from anymc3d import encoders as enc

    calls = {"n": 0}

    def broken_compile(fn, **kwargs):
        def run(*args):
            calls["n"] += 1
            raise RuntimeError("no C++ compiler (simulated)")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model, bb = _model("dinov2")
    compiled_model = AnyMC3DModel(bb.model, model.head, model.adapters, chunk_size=3, compile=True)
    x = [_slices(4, bb.spec.img_size, 3)[None]]
    with torch.inference_mode():
        eager = model(x, heatmap="attention")
        with caplog.at_level("WARNING", logger=enc.__name__):
            first = compiled_model(x, heatmap="attention")
            second = compiled_model(x, heatmap="attention")
    assert calls["n"] == 1 and "torch.compile is unavailable" in caplog.text
    assert torch.equal(first.logits, eager.logits) and torch.equal(second.patch_maps, eager.patch_maps)

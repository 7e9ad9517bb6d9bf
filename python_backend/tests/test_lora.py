"""LoRA: B = 0 is the identity, the adapter path equals a hand-merged weight, adapters switch cleanly,
only adapter weights train, and the parameter count is the paper's."""
from __future__ import annotations

import pytest
import torch

from anymc3d.backbone import BackboneSpec, create_backbone
from anymc3d.lora import (LoraSettings, activate, active_adapter, adapter_state, add_adapter, load_adapter_state,
                          lora_layers, remove_adapter, set_trainable, trainable_parameters)
from anymc3d.errors import PluginError
from anymc3d.plugin import TaskHead
from conftest import small_backbone


def _input(bb, n=2, seed=0):
    size = bb.spec.img_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _randomize_b(model, name, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = adapter_state(model, name)
    state = {k: (torch.randn(v.shape, generator=g) * 0.1 if "lora_B" in k else v) for k, v in state.items()}
    load_adapter_state(model, name, state)
    return state


def test_targets_are_patch_embedding_and_every_qkv_and_output_projection(family):
    bb = small_backbone(family)
    add_adapter(bb.model, "a", LoraSettings())
    expected = {"patch_embed.proj"} | {f"blocks.{i}.attn.{m}" for i in range(bb.spec.depth) for m in ("qkv", "proj")}
    assert set(lora_layers(bb.model)) == expected


def test_zero_b_leaves_the_backbone_output_unchanged(family):
    bb = small_backbone(family)
    x = _input(bb)
    with torch.no_grad():
        before = bb.model.forward_features(x)
        add_adapter(bb.model, "a", LoraSettings())
        activate(bb.model, "a")
        after = bb.model.forward_features(x)
    assert torch.equal(before, after)
    assert all(torch.count_nonzero(v) == 0 for k, v in adapter_state(bb.model, "a").items() if "lora_B" in k)


def test_adapter_path_equals_hand_merged_weights(family):
    """Independent reference: W' = W + (alpha / r) B A written into a fresh copy of the backbone."""
    bb = small_backbone(family)
    base = {k: v.clone() for k, v in bb.model.state_dict().items()}
    settings = LoraSettings(rank=4, alpha=8.0)
    add_adapter(bb.model, "a", settings)
    state = _randomize_b(bb.model, "a")
    activate(bb.model, "a")
    scale = settings.alpha / settings.rank
    merged = dict(base)
    for module in {k.rsplit(".lora_", 1)[0] for k in state}:
        a, b = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
        if a.ndim == 4:  # conv: A is a (r, C, k, k) conv, B a 1x1 conv (out, r, 1, 1)
            delta = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
        else:
            delta = b @ a
        merged[f"{module}.weight"] = base[f"{module}.weight"] + scale * delta
    reference = create_backbone(bb.spec)
    reference.load_state_dict(merged)
    x = _input(bb)
    with torch.no_grad():
        adapted, expected = bb.model.forward_features(x), reference.forward_features(x)
    assert (adapted - base_output(bb, base, x)).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(adapted, expected, rtol=1e-4, atol=1e-4)


def base_output(bb, base, x):
    plain = create_backbone(bb.spec)
    plain.load_state_dict(base)
    with torch.no_grad():
        return plain.forward_features(x)


def test_switching_adapters_is_exact_and_none_is_the_bare_backbone():
    bb = small_backbone()
    x = _input(bb)
    with torch.no_grad():
        bare = bb.model.forward_features(x)
    for name, seed in (("p", 1), ("q", 2)):
        add_adapter(bb.model, name, LoraSettings())
        _randomize_b(bb.model, name, seed)
    outputs = {}
    with torch.no_grad():
        for name in ("p", "q", None, "p"):
            activate(bb.model, name)
            assert active_adapter(bb.model) == name
            outputs.setdefault(name, []).append(bb.model.forward_features(x))
    assert torch.equal(outputs[None][0], bare)
    assert torch.equal(outputs["p"][0], outputs["p"][1])
    assert (outputs["p"][0] - outputs["q"][0]).abs().max() > 1e-3
    with pytest.raises(PluginError, match="no adapter 'zz'"):
        activate(bb.model, "zz")
    remove_adapter(bb.model, "q")  # removing another adapter keeps the active one and its output
    assert active_adapter(bb.model) == "p"
    with torch.no_grad():
        assert torch.equal(bb.model.forward_features(x), outputs["p"][0])


def test_backward_reaches_every_plugin_parameter_and_no_frozen_one(family):
    bb = small_backbone(family)
    add_adapter(bb.model, "a", LoraSettings())
    _randomize_b(bb.model, "a")  # with B = 0 the gradient of A is exactly zero
    activate(bb.model, "a")
    set_trainable(bb.model, "a")
    head = TaskHead(bb.model.embed_dim, 3)
    cls = bb.model.forward_features(_input(bb, n=4))[:, 0]  # (S, C)
    head([cls[None]]).sum().backward()
    trainable = [(n, p) for n, p in bb.model.named_parameters() if p.requires_grad] + list(head.named_parameters())
    assert all(".lora_" in n for n, p in bb.model.named_parameters() if p.requires_grad)
    for name, p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in bb.model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("name,patch", [("dinov2_vits14_reg", 14), ("dinov3_vits16", 16)])
def test_trainable_parameter_count_matches_the_paper(name, patch):
    """ViT-S: about 0.23 M (LoRA r=8 on patch conv + 12 x (qkv + proj), query, head); counted by formula."""
    model = create_backbone(BackboneSpec(name, img_size=patch * 2))
    add_adapter(model, "a", LoraSettings())
    set_trainable(model, "a")
    head = TaskHead(384, 2)
    r, c = 8, 384
    lora = (3 * patch * patch * r + r * c) + 12 * ((c * r + r * 3 * c) + (c * r + r * c))
    assert trainable_parameters(model) == lora
    assert trainable_parameters(model) + trainable_parameters(head) == lora + c + (c * 2 + 2)
    assert 0.22e6 < lora + c + c * 2 + 2 < 0.24e6


def test_folding_without_adapter_layers_equals_the_peft_adapter_path(family):
    """fold_state (no peft layers) gives the adapter path's output (peft's forward, the independent reference),
    unmerge restores the base weights bit for bit, and tensors of the wrong shape are refused."""
    from anymc3d.lora import check_state, fold_state, merged_adapter, unmerge

    bb = small_backbone(family)
    settings = LoraSettings(rank=4, alpha=8.0)
    add_adapter(bb.model, "a", settings)
    state = _randomize_b(bb.model, "a")
    activate(bb.model, "a")
    x = _input(bb)
    with torch.no_grad():
        adapted = bb.model.forward_features(x)
    plain = small_backbone(family).model  # the same base weights, never given adapter layers
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    check_state(plain, state, settings)
    fold_state(plain, "folded", state, settings)
    assert merged_adapter(plain) == "folded" and not lora_layers(plain)
    with torch.no_grad():
        folded = plain.forward_features(x)
    torch.testing.assert_close(folded, adapted, rtol=1e-4, atol=1e-4)
    activate(plain, "folded")  # the folded plugin is the active one: nothing changes
    assert merged_adapter(plain) == "folded"
    unmerge(plain)
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())
    bad = dict(state)
    key = next(k for k in bad if k.endswith("attn.qkv.lora_A.weight"))
    bad[key] = bad[key][:, :-1]
    with pytest.raises(PluginError, match="mismatched shapes"):
        check_state(plain, bad, settings)
    with pytest.raises(PluginError, match="missing"):
        check_state(plain, {k: v for k, v in state.items() if k != key}, settings)

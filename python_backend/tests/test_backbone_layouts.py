"""Backbones as users have them: transformers checkpoint folders of Dinov2Model, Dinov2WithRegistersModel and
DINOv3ViTModel load onto timm exactly (checked against transformers' own forward at another input size), a
plain timm state dict and an official checkpoint are named from their tensors, the same weights give one
fingerprint in every layout, and what does not map is refused in one line."""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import transformers

from anymc3d.backbone import BackboneSpec, load_backbone, spec_from_file
from anymc3d.errors import BackboneError
from anymc3d.layouts import read_checkpoint

#: (transformers model, config, checkpoint image size, size the comparison runs at)
SMALL_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
FAMILIES = {
    "Dinov2Model": (transformers.Dinov2Model, transformers.Dinov2Config(**SMALL_CONFIG, patch_size=14, image_size=28,
                                                                        layerscale_value=0.5), 70),
    "Dinov2WithRegistersModel": (transformers.Dinov2WithRegistersModel, transformers.Dinov2WithRegistersConfig(
        **SMALL_CONFIG, patch_size=14, image_size=42, num_register_tokens=4, layerscale_value=0.5), 70),
    "DINOv3ViTModel": (transformers.DINOv3ViTModel, transformers.DINOv3ViTConfig(
        **SMALL_CONFIG, patch_size=16, image_size=32, num_register_tokens=4, query_bias=False, value_bias=False,
        layerscale_value=0.5), 48),
}
PREFIX = {"Dinov2Model": 1, "Dinov2WithRegistersModel": 5, "DINOv3ViTModel": 5}


@torch.no_grad()
def load_bearing(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights that make every block matter (transformers' init is as near-identity as timm's): matrices
    std 1/sqrt(fan_in), LayerScale 0.1-1, tokens and position embeddings std 0.5, biases std 0.02."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("lambda1"):
            p.copy_(torch.rand(p.shape, generator=g) * 0.9 + 0.1)
        elif name.startswith("embeddings.") and "patch_embeddings" not in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        elif p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def save_transformers(kind: str, folder, seed: int = 0, **config_changes):
    cls, config, _ = FAMILIES[kind]
    config = type(config).from_dict({**config.to_dict(), **config_changes})
    model = load_bearing(cls(config).eval(), seed)
    model.save_pretrained(folder)
    return model


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_transformers_folder_matches_transformers_forward_at_another_size(tmp_path, kind):
    reference = save_transformers(kind, tmp_path / kind)
    size = FAMILIES[kind][2]
    assert size != FAMILIES[kind][1].image_size
    recorded = spec_from_file(tmp_path / kind)
    assert recorded.img_size == FAMILIES[kind][1].image_size
    # built for the size it runs at, as plugins are: the position embedding resized once, as transformers does
    loaded = load_backbone(tmp_path / kind, BackboneSpec(**{**recorded.to_dict(), "img_size": size}))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(pixel_values=x).last_hidden_state
        got = loaded.model.forward_features(x)
    assert got.shape == expected.shape
    n = PREFIX[kind]
    assert loaded.model.num_prefix_tokens == n
    assert relative(got[:, 0], expected[:, 0]) <= 1e-4  # CLS
    assert relative(got[:, n:], expected[:, n:]) <= 1e-4  # patch tokens
    if n > 1:
        assert relative(got[:, 1:n], expected[:, 1:n]) <= 1e-4  # registers
    # the weights are load-bearing: the last block changes its input, so a wrong mapping could not pass
    blocks = list(reference.encoder.layer if hasattr(reference, "encoder") else reference.model.layer)
    assert float(blocks[-1].layer_scale2.lambda1.detach().abs().min()) >= 0.1
    assert loaded.spec.embed_dim == 64 and loaded.spec.num_heads == 4 and loaded.spec.depth == 2
    at_own_size = load_backbone(tmp_path / kind)  # the architecture from config.json alone
    assert at_own_size.spec == recorded
    x = torch.randn(1, 3, recorded.img_size, recorded.img_size)
    with torch.no_grad():
        expected = reference(pixel_values=x).last_hidden_state
        assert relative(at_own_size.model.forward_features(x), expected) <= 1e-4


def test_a_wrong_mapping_is_caught_by_the_comparison(tmp_path):
    """Control: the same comparison fails when two blocks' weights are exchanged in the saved checkpoint."""
    reference = save_transformers("Dinov2WithRegistersModel", tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    state = safetensors.torch.load_file(str(path))
    a, b = "encoder.layer.0.attention.attention.query.weight", "encoder.layer.1.attention.attention.query.weight"
    state[a], state[b] = state[b], state[a]
    safetensors.torch.save_file(state, str(path), metadata={"format": "pt"})
    loaded = load_backbone(tmp_path / "m")
    x = torch.randn(1, 3, 70, 70)
    with torch.no_grad():
        assert relative(loaded.model.forward_features(x)[:, 0], reference(pixel_values=x).last_hidden_state[:, 0]) > 1e-2


def test_same_weights_in_every_layout_give_one_architecture_and_fingerprint(tmp_path):
    """A published-size ViT-S/14 with registers as a transformers folder, a plain timm state dict (safetensors,
    no metadata) and an official-layout .pth: each named from its tensors alone, one fingerprint."""
    save_transformers("Dinov2WithRegistersModel", tmp_path / "hf", hidden_size=384, intermediate_size=1536,
                      num_hidden_layers=12, num_attention_heads=6, image_size=56)
    from_hf = load_backbone(tmp_path / "hf")
    assert from_hf.spec == BackboneSpec("dinov2_vits14_reg", img_size=56)
    plain = {k: v.contiguous() for k, v in from_hf.model.state_dict().items()}
    safetensors.torch.save_file(plain, str(tmp_path / "plain.safetensors"))
    torch.save(read_checkpoint(tmp_path / "hf")[0], tmp_path / "official.pth")
    for path in (tmp_path / "plain.safetensors", tmp_path / "official.pth"):
        loaded = load_backbone(path)
        assert loaded.spec == from_hf.spec, path
        assert loaded.fingerprint == from_hf.fingerprint, path
    assert load_backbone(tmp_path / "plain.safetensors", arch="vit_small_patch14_reg4_dinov2").fingerprint == \
        from_hf.fingerprint
    with pytest.raises(BackboneError, match=r"plain\.safetensors: holds dinov2_vits14_reg, but --arch dinov2_vits14 "):
        load_backbone(tmp_path / "plain.safetensors", arch="dinov2_vits14")
    with pytest.raises(BackboneError, match="not a supported backbone"):
        load_backbone(tmp_path / "plain.safetensors", arch="resnet50")


def test_a_plain_state_dict_of_unpublished_size_is_refused_in_one_line(tmp_path):
    save_transformers("Dinov2Model", tmp_path / "hf")
    loaded = load_backbone(tmp_path / "hf")
    safetensors.torch.save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()},
                                str(tmp_path / "small.safetensors"))
    with pytest.raises(BackboneError, match=r"small\.safetensors: a dinov2 of non-published size \(width 64, 2 blocks\)"):
        load_backbone(tmp_path / "small.safetensors")
    # with the architecture given (a plugin's), the same file loads to the same weights
    assert load_backbone(tmp_path / "small.safetensors", loaded.spec).fingerprint == loaded.fingerprint


@pytest.mark.parametrize("change, message", [
    (dict(use_gated_mlp=True), "use_gated_mlp=True has no timm DINO counterpart"),
    (dict(num_register_tokens=2), "num_register_tokens=2 has no timm DINO counterpart"),
    (dict(hidden_act="silu"), "hidden_act='silu' has no timm DINO counterpart"),
    (dict(query_bias=True), "non-zero qkv biases"),
])
def test_what_does_not_map_is_refused_in_one_line(tmp_path, change, message):
    save_transformers("DINOv3ViTModel", tmp_path / "m", **change)
    with pytest.raises(BackboneError, match=message) as info:
        load_backbone(tmp_path / "m")
    assert "\n" not in str(info.value)


def test_other_transformers_models_and_incomplete_folders_are_refused(tmp_path):
    save_transformers("Dinov2Model", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text(encoding="utf-8"))
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "model_type": "vit", "architectures": ["ViTModel"]}))
    with pytest.raises(BackboneError, match=r"transformers model 'ViTModel' is not a supported backbone"):
        load_backbone(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(BackboneError, match=r"must hold a transformers checkpoint \(config.json and model.safetensors\)"):
        load_backbone(tmp_path / "m")

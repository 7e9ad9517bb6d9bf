"""Backbones: every supported name builds and runs; weight files in timm and official layouts load to
the same fingerprint; bad files are refused with the file and the first mismatched keys named."""
from __future__ import annotations

import json
import pickle

import pytest
import safetensors.torch
import torch

from anymc3d.backbone import (BACKBONES, SPEC_METADATA_KEY, BackboneSpec, create_backbone, fingerprint, load_backbone, make_load_bearing,
                              save_backbone, spec_from_file)
import anymc3d.backbone as backbone_module
from anymc3d.errors import BackboneError
from conftest import SMALL, small_backbone


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_and_gives_finite_cls_and_patch_tokens(name):
    patch = 14 if name.startswith("dinov2") else 16
    spec = BackboneSpec(name, img_size=2 * patch, depth=2)
    model = make_load_bearing(create_backbone(spec))
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(2, 3, 2 * patch, 2 * patch))
    expected_prefix = 5 if ("reg" in name or name.startswith("dinov3")) else 1
    assert model.num_prefix_tokens == expected_prefix
    assert tokens.shape == (2, expected_prefix + 4, model.embed_dim)
    assert torch.isfinite(tokens).all()
    assert not any(p.requires_grad for p in model.parameters())  # frozen


def test_load_bearing_weights_make_every_block_matter():
    """timm's DINO init is near-identity (LayerScale 1e-5); the test backbones must not be."""
    x = torch.randn(2, 3, 56, 56)
    for model, expect_large in ((create_backbone(SMALL["dinov2"]), False), (small_backbone().model, True)):
        inputs = []
        handle = model.blocks[-1].register_forward_hook(lambda m, i, o: inputs.append((i[0], o)))
        with torch.no_grad():
            model.forward_features(x)
        handle.remove()
        block_in, block_out = inputs[0]
        change = ((block_out - block_in).norm() / block_in.norm()).item()
        assert (change > 0.1) if expect_large else (change < 1e-3), change


def test_timm_layout_safetensors_round_trip_keeps_the_fingerprint(tmp_path):
    bb = small_backbone("dinov3")
    path = save_backbone(bb.model, bb.spec, tmp_path / "b.safetensors")
    assert spec_from_file(path) == bb.spec
    loaded = load_backbone(path)
    assert loaded.fingerprint == bb.fingerprint == fingerprint(loaded.model)


@pytest.mark.parametrize("family", sorted(SMALL))
def test_loading_builds_on_meta_and_gives_exactly_the_saved_model(tmp_path, family, monkeypatch):
    """load_backbone skips the random init (built on the meta device, the file's tensors assigned): the result is
    the saved model exactly (every output, every buffer, DINOv3's recomputed rotary periods too), on the CPU,
    float32 and frozen, also from a float16 file."""
    bb = small_backbone(family)
    x = torch.rand(2, 3, bb.spec.img_size, bb.spec.img_size)
    for dtype in (torch.float32, torch.float16):
        model = create_backbone(bb.spec)
        model.load_state_dict({k: v.to(dtype).float() for k, v in bb.model.state_dict().items()})
        path = tmp_path / f"{dtype}.safetensors"
        safetensors.torch.save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, str(path),
                                    metadata={SPEC_METADATA_KEY: json.dumps(bb.spec.to_dict())})
        built = []
        monkeypatch.setattr(backbone_module, "create_backbone",
                            lambda spec, device=None: built.append(device) or create_backbone(spec, device))
        loaded = load_backbone(path).model
        monkeypatch.undo()
        assert built == ["meta"]  # no second, randomly initialised build
        tensors = dict(loaded.state_dict(), **dict(loaded.named_buffers()))
        assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors.values())
        assert not any(p.requires_grad for p in loaded.parameters())
        reference = dict(model.state_dict(), **dict(model.named_buffers()))
        assert tensors.keys() == reference.keys() and all(torch.equal(tensors[k], reference[k]) for k in tensors)
        with torch.no_grad():
            assert torch.equal(loaded.forward_features(x), model.forward_features(x))


def _official_dinov2(state: dict, generator, zero_cls_pos: bool) -> dict:
    """Inverse of timm's DINOv2 conversion, written independently: registers and CLS overlap pos_embed."""
    out = {k: v.clone() for k, v in state.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    dim = state["pos_embed"].shape[-1]
    p0 = torch.zeros(1, 1, dim) if zero_cls_pos else torch.randn(1, 1, dim, generator=generator)
    out["pos_embed"] = torch.cat([p0, state["pos_embed"]], dim=1)
    out["cls_token"] = state["cls_token"] - p0
    out["register_tokens"] = state["reg_token"].clone()
    out["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return out


def _official_dinov3(state: dict, depth: int) -> dict:
    """The DINOv3 repository's key names: storage tokens, ls1/ls2, zero qkv bias + mask, rope periods."""
    out = {}
    for k, v in state.items():
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[k] = v.clone()
    dim = state["cls_token"].shape[-1]
    for i in range(depth):
        out[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * dim)
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.ones(3 * dim)
    out["rope_embed.periods"] = torch.ones(dim // 3 // 4)
    out["mask_token"] = torch.zeros(1, dim)
    return out


def test_official_dinov2_pth_loads_to_the_same_weights(tmp_path):
    bb = small_backbone("dinov2")
    # a random CLS position embedding: the mapping adds it back to the CLS token (equal up to rounding)
    official = _official_dinov2(bb.model.state_dict(), torch.Generator().manual_seed(1), zero_cls_pos=False)
    torch.save({"teacher": official}, tmp_path / "dinov2.pth")
    loaded = load_backbone(tmp_path / "dinov2.pth", bb.spec)
    for k, v in bb.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[k], v, rtol=0, atol=1e-6)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.forward_features(x), bb.model.forward_features(x), rtol=1e-5, atol=1e-5)
    # a zero CLS position embedding: the same weights bit for bit, so the same fingerprint
    torch.save(_official_dinov2(bb.model.state_dict(), None, zero_cls_pos=True), tmp_path / "dinov2_zero.pth")
    assert load_backbone(tmp_path / "dinov2_zero.pth", bb.spec).fingerprint == bb.fingerprint


def test_official_dinov3_pth_loads_to_the_same_weights(tmp_path):
    bb = small_backbone("dinov3")
    torch.save(_official_dinov3(bb.model.state_dict(), bb.spec.depth), tmp_path / "dinov3.pth")
    assert load_backbone(tmp_path / "dinov3.pth", bb.spec).fingerprint == bb.fingerprint


def test_nonzero_dinov3_qkv_bias_is_refused_not_dropped(tmp_path):
    bb = small_backbone("dinov3")
    state = _official_dinov3(bb.model.state_dict(), bb.spec.depth)
    state["blocks.1.attn.qkv.bias"] += 0.5
    torch.save(state, tmp_path / "biased.pth")
    with pytest.raises(BackboneError, match=r"biased\.pth.*non-zero qkv biases"):
        load_backbone(tmp_path / "biased.pth", bb.spec)


def test_missing_and_misshaped_keys_are_named(tmp_path):
    bb = small_backbone("dinov2")
    state = {k: v for k, v in bb.model.state_dict().items() if k != "blocks.2.mlp.fc1.weight"}
    safetensors.torch.save_file(state, tmp_path / "missing.safetensors")
    with pytest.raises(BackboneError, match=r"missing\.safetensors.*missing keys \['blocks\.2\.mlp\.fc1\.weight'\]"):
        load_backbone(tmp_path / "missing.safetensors", bb.spec)
    state = dict(bb.model.state_dict())
    state["norm.weight"] = torch.ones(7)
    safetensors.torch.save_file(state, tmp_path / "shape.safetensors")
    with pytest.raises(BackboneError, match=r"shape\.safetensors.*mismatched shapes \['norm\.weight \(7,\)"):
        load_backbone(tmp_path / "shape.safetensors", bb.spec)


def test_weights_of_another_architecture_are_refused(tmp_path):
    bb = small_backbone("dinov2")
    save_backbone(bb.model, bb.spec, tmp_path / "b.safetensors")
    other = BackboneSpec("dinov2_vits14_reg", img_size=56, depth=4, embed_dim=96, num_heads=3)
    with pytest.raises(BackboneError, match="holds DINOv2-architecture demo, 3 blocks, width 96, random weights .*, but DINOv2-architecture demo, 4 blocks"):
        load_backbone(tmp_path / "b.safetensors", other)


def test_unreadable_files_are_clear_errors(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(BackboneError, match=r"junk\.safetensors: cannot read backbone weights"):
        load_backbone(tmp_path / "junk.safetensors", SMALL["dinov2"])
    with pytest.raises(BackboneError, match="not found"):
        load_backbone(tmp_path / "absent.pth", SMALL["dinov2"])
    with pytest.raises(BackboneError, match=r"plain\.pth: not a DINOv2/DINOv3 checkpoint"):
        torch.save({"a": torch.zeros(1)}, tmp_path / "plain.pth")
        load_backbone(tmp_path / "plain.pth")


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_objects_are_never_executed(tmp_path):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(BackboneError, match=r"evil\.pth: cannot read backbone weights"):
        load_backbone(tmp_path / "evil.pth", SMALL["dinov2"])

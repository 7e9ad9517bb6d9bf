"""``features`` / ``similarity`` run the backbone through the engine (its placement, precision and encoder kinds):
the numbers equal the lifted / slice-wise forward written out from the building blocks, the bare backbone's
features are unchanged by a plugin attached to the same engine, and no process-wide switch is flipped."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from anymc3d.demo import random_plugin
from anymc3d.engine import Engine
from anymc3d.errors import PluginError
from anymc3d.image_reading import read_image
from anymc3d.plugin import save_plugin
from anymc3d.planecycle import features
from anymc3d.planecycle.config import PlaneCycleConfig
from anymc3d.planecycle.converter import lift
from anymc3d.preprocess_config import PreprocessConfig
from anymc3d.preprocessing import prepare, to_model_input
from anymc3d.synthetic import make_ct_volume, random_oblique_direction
from conftest import small_backbone

PREPROCESS = PreprocessConfig(input_size=56)  # a multiple of DINOv2's patch (14)
PREPROCESS_V3 = PreprocessConfig(input_size=64)  # and of DINOv3's (16)
CONFIG = PlaneCycleConfig(variant="pcm", cycle=("HW", "DW", "DH"))


@pytest.fixture
def image_path(tmp_path):
    image = make_ct_volume(size=(22, 18, 7), spacing=(0.9, 0.8, 2.5), lesion=True, seed=1,
                           direction=random_oblique_direction(1))
    path = tmp_path / "case.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def _old_tokens(model, slices, mode):
    """The features as computed before the engine path: ``lift(model).forward_features`` or timm's own 2D forward."""
    x = to_model_input(slices)  # (D, 3, M, M)
    with torch.no_grad():
        if mode == "planecycle":
            return lift(model, CONFIG).forward_features(x[None]).patch_tokens[0]  # (D, h, w, C)
        tokens = model.forward_features(x)  # (D, G + h*w, C)
        h = w = slices.shape[-1] // model.patch_embed.patch_size[0]
        return tokens[:, model.num_prefix_tokens:].reshape(len(x), h, w, -1)


@pytest.mark.parametrize("mode", ["planecycle", "slicewise"])
def test_similarity_through_the_engine_equals_the_old_computation(family, mode, image_path):
    model = small_backbone(family).model  # load-bearing weights
    seed, preprocess = (5, 11, 3), PREPROCESS if family == "dinov2" else PREPROCESS_V3
    result = features.similarity(model, image_path, seed, mode=mode, config=CONFIG, preprocess=preprocess)
    slices, geometry = prepare(read_image(image_path), preprocess)
    tokens = _old_tokens(model, slices, mode)
    s, y, x = features.seed_to_slice(geometry, seed)
    token = tuple(v * n // full for v, n, full in zip((s, y, x), tokens.shape[:3], geometry.slice_shape))
    cosine = F.normalize(tokens, dim=-1) @ F.normalize(tokens[token], dim=0)  # (D, h, w)
    assert result.token == token
    torch.testing.assert_close(result.token_map, cosine, rtol=0, atol=2e-6)
    expected = sitk.GetArrayFromImage(geometry.to_input(cosine))
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.image), expected, rtol=0, atol=2e-6)
    assert float(cosine.min()) < 0.99  # load-bearing: the map is not constant


def test_lifted_and_slicewise_features_differ(image_path):
    """The mode reaches the encoder: lifted tokens are not the 2D ones (DW/DH blocks mix slices)."""
    model = small_backbone("dinov2").model
    slices, _ = prepare(read_image(image_path), PREPROCESS)
    volume = to_model_input(slices)
    lifted = features.compute_features(model, volume, "planecycle", CONFIG).patch_tokens
    flat = features.compute_features(model, volume, "slicewise").patch_tokens
    assert (lifted - flat).abs().max() > 1e-2


def test_engine_features_are_the_bare_backbones_with_a_plugin_attached(tmp_path, image_path):
    """A merged plugin's LoRA is set aside for features and folded in again for the next prediction."""
    bb = small_backbone("dinov2")
    config, head, lora = random_plugin(bb.model, bb.spec, name="p", labels=("a",), seed=3, lora_scale=0.5)
    plugin = save_plugin(tmp_path / "p.anymc3d", config, head, lora)
    engine = Engine(small_backbone("dinov2"), device="cpu")
    name = engine.add_plugin(plugin)
    slices, _ = prepare(read_image(image_path), config.preprocessing[0])
    before = engine.predict_slices([slices], name).logits
    volume = to_model_input(slices)
    got = engine.features(volume, "planecycle", **CONFIG.to_dict()).patch_tokens[0]
    torch.testing.assert_close(got, _old_tokens(bb.model, slices, "planecycle"), rtol=0, atol=2e-6)
    np.testing.assert_array_equal(engine.predict_slices([slices], name).logits, before)


def test_a_bare_model_engine_gives_features_but_refuses_plugins(tmp_path):
    bb = small_backbone("dinov2")
    config, head, lora = random_plugin(bb.model, bb.spec, name="p", labels=("a",), seed=0)
    engine = Engine(bb.model, device="cpu")
    with pytest.raises(PluginError, match="bare model"):
        engine.add_plugin(save_plugin(tmp_path / "p.anymc3d", config, head, lora))


def test_features_flip_no_process_wide_switch(image_path):
    switches = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.get_float32_matmul_precision(), torch.is_grad_enabled())
    slices, _ = prepare(read_image(image_path), PREPROCESS_V3)
    features.compute_features(small_backbone("dinov3").model, to_model_input(slices), "planecycle")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision(), torch.is_grad_enabled()) == switches

"""Engine: the three prediction levels agree, CPU results are deterministic and chunk-independent,
plugins share one backbone without leaking into each other, ensembles and calibration follow their
definitions, and heatmaps come back in the input's geometry."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import anymc3d.engine as engine_module
from anymc3d.demo import random_plugin
from anymc3d.engine import Engine, ensemble
from anymc3d.errors import AnyMC3DError, InputError
from anymc3d.plugin import save_plugin
from anymc3d.image_reading import read_image
from anymc3d.image_writing import write_image_atomic
from anymc3d.preprocess_config import PreprocessConfig
from anymc3d.preprocessing import prepare
from anymc3d.synthetic import make_ct_volume, random_oblique_direction
from conftest import SMALL, small_backbone


def _plugin(tmp_path, name="p", seed=0, labels=("a", "b", "c"), views=("image",), calibration=None, **kw):
    bb = small_backbone()
    config, head, lora = random_plugin(bb.model, bb.spec, name=name, labels=labels, views=views, seed=seed,
                                       lora_scale=0.2, **kw)
    if calibration:
        config.calibration_a, config.calibration_b = calibration
    return save_plugin(tmp_path / f"{name}.anymc3d", config, head, lora)


def _engine(*plugins, chunk_size=8):
    engine = Engine(small_backbone(), device="cpu", chunk_size=chunk_size)
    return engine, [engine.add_plugin(p) for p in plugins]


@pytest.fixture
def volume(tmp_path):
    image = make_ct_volume(size=(40, 36, 12), spacing=(0.9, 0.9, 3.0), lesion=True, seed=2)
    return write_image_atomic(image, tmp_path / "case.nii.gz")


def _same(a, b):
    for field in ("logits", "probabilities", "embedding", "heatmap"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert all(np.array_equal(x, y) for x, y in zip(a.slice_importance, b.slice_importance))


def test_file_image_and_slice_levels_agree(tmp_path, volume):
    engine, (name,) = _engine(_plugin(tmp_path))
    from_file = engine.predict_file(volume, heatmap="attention").predictions[0]
    from_image = engine.predict_image(read_image(volume), heatmap="attention").predictions[0]
    slices, _ = prepare(read_image(volume), engine.plugins[name].plugin.config.preprocessing[0])
    from_slices = engine.predict_slices([slices], name, heatmap="attention")
    _same(from_file, from_image)
    _same(from_file, from_slices)


def test_cpu_results_are_deterministic_and_chunk_independent(tmp_path, volume):
    path = _plugin(tmp_path)
    a = _engine(path, chunk_size=5)[0].predict_file(volume, heatmap="attention").predictions[0]
    b = _engine(path, chunk_size=5)[0].predict_file(volume, heatmap="attention").predictions[0]
    c = _engine(path, chunk_size=64)[0].predict_file(volume, heatmap="attention").predictions[0]
    _same(a, b)
    np.testing.assert_allclose(a.probabilities, c.probabilities, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.heatmap, c.heatmap, rtol=1e-4, atol=1e-6)


def test_embedding_and_logits_follow_the_definition(tmp_path, volume):
    """v = a^T H with a = softmax(H q / sqrt(d)); logits = W v + b; recomputed from the slice embeddings."""
    engine, (name,) = _engine(_plugin(tmp_path))
    slices, _ = prepare(read_image(volume), engine.plugins[name].plugin.config.preprocessing[0])
    pred = engine.predict_slices([slices], name)
    model = engine.plugins[name].model
    with torch.inference_mode():
        h = model.forward_features([slices[None]])[0].cls[0]  # (S, C): the encoder alone, before any pooling
    head = engine.plugins[name].plugin.head
    hq = h.double() @ head.task_pool.query.detach().double() / np.sqrt(h.shape[1])
    a = torch.softmax(hq, 0)
    v = a @ h.double()
    logits = head.head.weight.detach().double() @ v + head.head.bias.detach().double()
    np.testing.assert_allclose(pred.slice_importance[0], a.numpy(), rtol=1e-5)
    np.testing.assert_allclose(pred.embedding, v.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pred.logits, logits.numpy(), rtol=1e-4, atol=1e-5)


def test_plugins_share_the_backbone_and_do_not_leak(tmp_path, volume):
    p1, p2 = _plugin(tmp_path, "first", seed=1), _plugin(tmp_path, "second", seed=2)
    together, names = _engine(p1, p2)
    model = together.model
    both = together.predict_file(volume, heatmap="attention").predictions
    assert together.model is model  # attaching a plugin never rebuilds the backbone
    alone = [_engine(p)[0].predict_file(volume, heatmap="attention").predictions[0] for p in (p1, p2)]
    for shared, single in zip(both, alone):
        _same(shared, single)
    assert not np.allclose(both[0].probabilities, both[1].probabilities)
    together.remove_plugin(names[0])
    _same(together.predict_file(volume, heatmap="attention").predictions[0], alone[1])


def test_shared_preprocessing_runs_once_per_recipe(tmp_path, volume, monkeypatch):
    calls = []
    real = engine_module.prepare
    monkeypatch.setattr(engine_module, "prepare", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    other = PreprocessConfig(input_size=SMALL["dinov2"].img_size, window="lung")
    engine, _ = _engine(_plugin(tmp_path, "p1", seed=1), _plugin(tmp_path, "p2", seed=2),
                        _plugin(tmp_path, "p3", seed=3, preprocessing=other))
    engine.predict_file(volume)
    assert len(calls) == 2 and {c.window for c in calls} == {"soft_tissue", "lung"}


def test_platt_calibration_and_decisions(tmp_path, volume):
    a, b = [2.0, 0.5, 1.0], [-1.0, 0.3, 0.0]
    engine, _ = _engine(_plugin(tmp_path, calibration=(a, b)))
    pred = engine.predict_file(volume).predictions[0]
    expected = 1 / (1 + np.exp(-(np.array(a) * pred.logits + np.array(b))))
    np.testing.assert_allclose(pred.probabilities, expected, rtol=1e-5)
    np.testing.assert_allclose(pred.probabilities_raw, 1 / (1 + np.exp(-pred.logits)), rtol=1e-5)
    assert list(pred.decisions) == list(expected >= 0.5)


def test_multiclass_uses_softmax_and_argmax(tmp_path, volume):
    engine, _ = _engine(_plugin(tmp_path, labels=("x", "y", "z"), task="multiclass"))
    pred = engine.predict_file(volume).predictions[0]
    z = pred.calibrated_logits
    np.testing.assert_allclose(pred.probabilities, np.exp(z) / np.exp(z).sum(), rtol=1e-5)
    assert pred.decisions.sum() == 1 and pred.decisions[np.argmax(z)]


def test_ensemble_averages_calibrated_logits(tmp_path, volume):
    engine, _ = _engine(_plugin(tmp_path, "m1", seed=1, calibration=([1.5] * 3, [0.2] * 3)),
                        _plugin(tmp_path, "m2", seed=2))
    members = engine.predict_file(volume, heatmap="attention").predictions
    combined = ensemble(members)
    mean = (members[0].calibrated_logits + members[1].calibrated_logits) / 2
    np.testing.assert_allclose(combined.calibrated_logits, mean, rtol=1e-6)
    np.testing.assert_allclose(combined.probabilities, 1 / (1 + np.exp(-mean)), rtol=1e-5)
    np.testing.assert_allclose(combined.heatmap, (members[0].heatmap + members[1].heatmap) / 2)
    engine2, _ = _engine(_plugin(tmp_path, "other", labels=("q", "r")))
    with pytest.raises(AnyMC3DError, match="must share labels"):
        ensemble([members[0], engine2.predict_file(volume).predictions[0]])


def test_multi_view_plugin_takes_one_image_per_view(tmp_path):
    engine, (name,) = _engine(_plugin(tmp_path, views=("sag", "cor")))
    sag = make_ct_volume(size=(12, 40, 36), spacing=(3.0, 0.9, 0.9), seed=1)
    cor = make_ct_volume(size=(40, 12, 36), spacing=(0.9, 3.0, 0.9), seed=2)
    result = engine.predict_image([sag, cor], heatmap="attention")
    pred = result.predictions[0]
    assert pred.geometry.slice_axis == 0
    assert [len(a) for a in pred.slice_importance] == [12, 12]
    assert pred.heatmap_image().GetSize() == sag.GetSize()
    with pytest.raises(InputError, match=r"takes 2 view\(s\) \['sag', 'cor'\], got 1"):
        engine.predict_image(sag)


def test_heatmap_has_the_geometry_of_an_oblique_anisotropic_input(tmp_path):
    engine, _ = _engine(_plugin(tmp_path))
    image = make_ct_volume(size=(44, 38, 10), spacing=(0.7, 0.9, 3.0), origin=(-12.5, 30.0, 7.25),
                           direction=random_oblique_direction(5), lesion=True, seed=4)
    result = engine.predict_image(image, heatmap="attention")
    heat = result.predictions[0].heatmap_image()
    assert heat.GetSize() == image.GetSize()
    assert np.allclose(heat.GetOrigin(), image.GetOrigin(), atol=0) and heat.GetSpacing() == image.GetSpacing()
    assert np.allclose(heat.GetDirection(), image.GetDirection(), atol=0)
    values = sitk.GetArrayFromImage(heat)
    assert values.max() <= 1.0 + 1e-6 and values.min() >= 0 and values.std() > 0


def test_bad_images_in_memory_are_refused(tmp_path):
    engine, _ = _engine(_plugin(tmp_path))
    image = make_ct_volume(size=(20, 20, 8))
    arr = sitk.GetArrayFromImage(image)
    arr[3, 4, 5] = np.nan
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(image)
    with pytest.raises(InputError, match="case7.*NaN"):
        engine.predict_image(bad, sources=["case7"])
    with pytest.raises(InputError):
        engine.predict_image(sitk.Image(20, 20, sitk.sitkFloat32))


def test_asking_for_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AnyMC3DError, match="no CUDA GPU is available"):
        engine_module.resolve_device("cuda")
    assert engine_module.resolve_device("auto").type == "cpu"


def test_a_plugin_made_in_memory_attaches_like_a_file(tmp_path, volume):
    from anymc3d.plugin import LoadedPlugin, load_plugin

    path = _plugin(tmp_path)
    loaded = load_plugin(path)
    in_memory = LoadedPlugin(config=loaded.config, head=loaded.head, lora=loaded.lora)  # no path, e.g. after training
    engine, _ = _engine()
    name = engine.add_plugin(in_memory)
    assert name == "p"
    _same(engine.predict_file(volume, heatmap="attention").predictions[0],
          _engine(path)[0].predict_file(volume, heatmap="attention").predictions[0])


def test_plugins_that_slice_differently_each_map_back_correctly(tmp_path):
    """One plugin slices along the coarsest axis (K), another along I: each heatmap and importance
    comes back on the input grid along its own axis."""
    along_i = PreprocessConfig(input_size=SMALL["dinov2"].img_size, slice_axis=0)
    engine, _ = _engine(_plugin(tmp_path, "auto_axis", seed=1), _plugin(tmp_path, "i_axis", seed=2, preprocessing=along_i))
    image = make_ct_volume(size=(30, 26, 9), spacing=(0.8, 0.8, 3.0), direction=random_oblique_direction(3), seed=6)
    auto, fixed = engine.predict_image(image, heatmap="attention").predictions
    assert (auto.geometry.slice_axis, fixed.geometry.slice_axis) == (2, 0)
    assert len(auto.importance_per_input_slice()) == 9 and len(fixed.importance_per_input_slice()) == 30
    for pred in (auto, fixed):
        heat = pred.heatmap_image()
        assert heat.GetSize() == image.GetSize() and np.allclose(heat.GetDirection(), image.GetDirection())
    # a one-hot model slice lands on the input I-index that the importance mapping names for it
    for s in (3, 20):
        one_hot = np.zeros_like(fixed.heatmap)
        one_hot[s] = 1.0
        fixed.heatmap = one_hot
        lit = sitk.GetArrayFromImage(fixed.heatmap_image()).max(axis=(0, 1))  # per input I-index
        expected = fixed.geometry.importance_to_input(np.eye(len(one_hot))[s])
        assert np.argmax(lit) == np.argmax(expected) and lit[np.argmax(lit)] > 0.99
    with pytest.raises(AnyMC3DError, match="must slice the images alike"):
        ensemble([auto, fixed])


def test_an_unknown_heatmap_method_fails_before_any_slice_is_encoded(tmp_path, monkeypatch):
    engine, (name,) = _engine(_plugin(tmp_path))
    encoder = engine.plugins[name].model.encoder
    monkeypatch.setattr(encoder, "forward", lambda *a, **k: pytest.fail("encoded before checking the method"))
    with pytest.raises(ValueError, match="heatmap method must be one of"):
        engine.predict_slices([torch.rand(3, 56, 56)], name, heatmap="saliency")

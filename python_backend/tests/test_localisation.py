"""Localisation measures against hand computations."""
import numpy as np
import pytest
import SimpleITK as sitk

from anymc3d.localisation import deletion_curve, localise, slice_space_spacing, summarise, upsample
from anymc3d.preprocessing import PreprocessConfig, prepare


def _lesion(shape=(6, 8, 8)):
    m = np.zeros(shape, bool)
    m[2:4, 3:5, 4:6] = True  # 8 voxels
    return m


def test_map_equal_to_the_lesion_hits_with_mass_share_one():
    m = _lesion()
    r = localise(m.astype(float), m)
    assert r.hit and r.distance_mm == 0.0
    assert r.mass_share == 1.0
    assert r.volume_share == pytest.approx(8 / m.size)
    assert r.mass_ratio == pytest.approx(m.size / 8)


def test_uniform_map_scores_the_volume_share():
    m = _lesion()
    r = localise(np.full(m.shape, 0.3), m)
    assert r.mass_share == pytest.approx(8 / m.size)
    assert r.mass_ratio == pytest.approx(1.0)


def test_pointing_distance_in_mm_and_tolerance():
    m = _lesion()
    h = np.zeros(m.shape)
    h[2, 3, 1] = 1.0  # 3 voxels left of the lesion's first column (x = 4) along the last axis
    spacing = (5.0, 1.0, 2.0)
    r = localise(h, m, spacing, tolerance_mm=5.0)
    assert r.distance_mm == pytest.approx(6.0) and not r.hit
    assert localise(h, m, spacing, tolerance_mm=6.0).hit
    assert r.mass_share == 0.0
    h[0, 3, 4] = 2.0  # two slices above: 2 x 5 mm
    assert localise(h, m, spacing).distance_mm == pytest.approx(10.0)


def test_negative_values_count_as_zero_and_zero_maps_never_hit():
    m = _lesion()
    h = -np.ones(m.shape)
    h[m] = 1.0
    assert localise(h, m).mass_share == 1.0
    assert not localise(np.zeros(m.shape), m).hit
    with pytest.raises(ValueError, match="empty"):
        localise(h, np.zeros(m.shape))


def test_patch_map_is_upsampled_without_moving_mass():
    coarse = np.arange(8, dtype=float).reshape(2, 2, 2)
    fine = upsample(coarse, (2, 4, 6))
    assert fine.shape == (2, 4, 6)
    assert fine[1, 3, 5] == coarse[1, 1, 1] and fine[0, 1, 2] == coarse[0, 0, 0] and fine[0, 2, 3] == coarse[0, 1, 1]
    m = np.zeros((2, 4, 6), bool)
    m[1, 2:, 3:] = True  # exactly the last patch
    assert localise(coarse, m).mass_share == pytest.approx(7 / (6 * sum(range(8))) * 6)


def test_deletion_curve_on_a_hand_built_case():
    volume = np.zeros((2, 2, 2))
    volume[0, 0, 0], volume[1, 1, 1] = 10.0, 4.0  # median 0
    predict = lambda v: float(v.sum()) / 14.0  # noqa: E731 - "probability": the share of the bright voxels left
    heat = np.zeros((2, 2, 2))
    heat[0, 0, 0], heat[1, 1, 1] = 2.0, 1.0
    probs, area = deletion_curve(predict, volume, heat, fractions=(0.0, 0.125, 0.25, 0.5))
    assert probs == pytest.approx([1.0, 4 / 14, 0.0, 0.0])
    # trapezoids: 0.125 * (1 + 4/14) / 2 + 0.125 * (4/14) / 2 + 0, over 0.5
    assert area == pytest.approx((0.125 * (1 + 4 / 14) / 2 + 0.125 * (4 / 14) / 2) / 0.5)
    probs_bad, area_bad = deletion_curve(predict, volume, -heat, fractions=(0.0, 0.125, 0.25, 0.5))
    assert area_bad > area  # a map pointing away deletes the evidence later


def test_slice_space_spacing_follows_the_recipe():
    image = sitk.Image([30, 20, 10], sitk.sitkFloat32)
    image.SetSpacing((0.5, 1.0, 3.0))
    slices, geometry = prepare(image, PreprocessConfig(input_size=14, num_slices=5, intensity="none"))
    assert tuple(slices.shape) == (5, 14, 14)
    # sliced along K (largest spacing): S = K extent / 5; H = J (20 mm) / 14; W = I (15 mm) / 14
    assert slice_space_spacing(geometry, slices.shape) == pytest.approx((30.0 / 5, 20.0 / 14, 15.0 / 14))


def test_summary_of_cases():
    cases = [dict(hit=True, distance_mm=0.0, mass_share=0.2, volume_share=0.01, mass_ratio=20.0, deletion_area=0.3),
             dict(hit=False, distance_mm=30.0, mass_share=0.0, volume_share=0.03, mass_ratio=0.0, deletion_area=0.5)]
    s = summarise(cases)
    assert s["hit_rate"] == 0.5 and s["median_distance_mm"] == 15.0
    assert s["mass_over_volume_share"] == pytest.approx(0.1 / 0.02)
    assert s["mean_deletion_area"] == pytest.approx(0.4)


def test_model_card_recorded_in_a_plugin_drives_auto(demo_dir, tmp_path):
    import shutil

    import torch

    from anymc3d.engine import Engine
    from anymc3d.localisation import model_card
    from anymc3d.plugin import load_plugin, record_localisation

    summaries = {"attention": {"cases": 6, "hit_rate": 0.0, "mass_over_volume_share": 1.1},
                 "occlusion": {"cases": 6, "hit_rate": 0.83, "mass_over_volume_share": 16.0},
                 "rollout": {"cases": 0}}
    card = model_card(summaries, "a task")
    assert card["best"] == "occlusion" and set(card["measured"]) == {"attention", "occlusion"}
    measured = shutil.copy(demo_dir / "plugin.anymc3d", tmp_path / "measured.anymc3d")
    before = load_plugin(measured)
    record_localisation(measured, card)
    after = load_plugin(measured)
    assert after.config.localisation == card
    assert after.config.weights_sha256 == before.config.weights_sha256
    assert torch.equal(after.head.head.weight, before.head.head.weight)
    with pytest.raises(Exception, match="localisation"):
        record_localisation(measured, {**card, "best": "grad_last"})  # not measured
    assert load_plugin(measured).config.localisation == card  # a refused card leaves the file as it was

    engine = Engine(demo_dir / "backbone.safetensors", device="cpu")
    engine.add_plugin(measured, "measured")
    engine.add_plugin(demo_dir / "plugin.anymc3d", "never")
    x = torch.rand(2, 112, 112, generator=torch.Generator().manual_seed(0))
    x[:, :20] = 0.0  # some background
    got = engine.predict_slices([x], "measured", heatmap="auto")
    assert got.heatmap_method == "occlusion" and got.heatmap_localisation["hit_rate"] == 0.83
    assert got.heatmap_localisation["task"] == "a task"
    plain = engine.predict_slices([x], "never", heatmap="auto")
    assert plain.heatmap_method == "attention" and plain.heatmap_localisation is None

"""``anymc3d similarity --features-cache DIR`` and several ``--seed``: features are computed once per image.

Backbone runs are counted with a forward hook on the real backbone's first block (installed by wrapping
``features.load_model``), so "not recomputed" means the backbone really did not run, not that a flag was set.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from anymc3d import cli
from anymc3d.backbone import save_backbone
from anymc3d.planecycle import cache, features
from anymc3d.synthetic import make_ct_volume, random_oblique_direction
from conftest import small_backbone

SEEDS = [(5, 11, 3), (17, 2, 6)]


@pytest.fixture(scope="module")
def backbone_path(tmp_path_factory):
    loaded = small_backbone("dinov3")
    return save_backbone(loaded.model, loaded.spec, tmp_path_factory.mktemp("bb") / "dinov3.safetensors")


@pytest.fixture
def counter(monkeypatch):
    """Counts backbone loads and forwards of block 0 (one per lifted or slice-wise forward pass)."""
    counts = {"loads": 0, "forwards": 0}
    original = features.load_model

    def load_model(path, arch=None):
        counts["loads"] += 1
        model, digest = original(path, arch)
        model.blocks[0].register_forward_hook(lambda *_: counts.__setitem__("forwards", counts["forwards"] + 1))
        return model, digest

    monkeypatch.setattr(features, "load_model", load_model)
    return counts


def _image(seed=0):
    return make_ct_volume(size=(22, 18, 7), spacing=(0.9, 0.8, 2.5), lesion=True, seed=seed,
                          direction=random_oblique_direction(0))


def _run(capsys, image, backbone, out, seeds, *extra):
    args = ["similarity", str(image), "--backbone", str(backbone), "--input-size", "64", "--out", str(out), *extra]
    for seed in seeds:
        args += ["--seed", ",".join(map(str, seed))]
    rc = cli.main(args)
    lines = capsys.readouterr().out.strip().splitlines()
    return rc, (json.loads(lines[-1]) if rc == 0 else None)


def _maps(report):
    return [sitk.GetArrayFromImage(sitk.ReadImage(p)) for p in report["out"]]


def test_second_call_loads_the_features_and_gives_identical_maps(backbone_path, counter, capsys, tmp_path):
    image = tmp_path / "case.nrrd"
    sitk.WriteImage(_image(), str(image))
    store = tmp_path / "cache"

    rc, first = _run(capsys, image, backbone_path, tmp_path / "first", SEEDS, "--features-cache", str(store),
                     "--format", "nrrd")
    assert rc == 0 and first["features_cache"] == "miss"
    assert counter == {"loads": 1, "forwards": 1}  # two seeds, one forward
    assert [p.rsplit("/", 1)[1] for p in first["out"]] == ["similarity_5_11_3.nrrd", "similarity_17_2_6.nrrd"]
    tokens_file = store / cache.TOKENS_NAME
    stamp = tokens_file.stat().st_mtime_ns
    key = json.loads((store / cache.META_NAME).read_text(encoding="utf-8"))[cache.KEY_FIELD]
    assert key["image_sha256"] == cache.file_sha256(image)

    rc, second = _run(capsys, image, backbone_path, tmp_path / "second", SEEDS, "--features-cache", str(store),
                      "--format", "nrrd")
    assert rc == 0 and second["features_cache"] == "hit"
    assert counter == {"loads": 1, "forwards": 1}  # the backbone was neither loaded nor run again
    assert tokens_file.stat().st_mtime_ns == stamp
    for a, b in zip(_maps(first), _maps(second), strict=True):
        np.testing.assert_array_equal(a, b)

    # Against the uncached command (one seed, plain file output), which test_planecycle checks independently.
    rc, plain = _run(capsys, image, backbone_path, tmp_path / "plain.nii.gz", SEEDS[1:])
    assert rc == 0 and plain["features_cache"] is None and counter["forwards"] == 2
    np.testing.assert_allclose(_maps(second)[1], _maps(plain)[0], atol=1e-6)
    assert float(_maps(second)[0].min()) < 0.99  # not a constant map
    assert not np.allclose(_maps(second)[0], _maps(second)[1])  # each seed its own map


def test_changed_image_or_settings_invalidate_the_cache(backbone_path, counter, capsys, tmp_path):
    image = tmp_path / "case.nrrd"
    sitk.WriteImage(_image(seed=0), str(image))
    store = tmp_path / "cache"
    rc, first = _run(capsys, image, backbone_path, tmp_path / "a.nii.gz", SEEDS[:1], "--features-cache", str(store))
    assert rc == 0 and counter["forwards"] == 1

    sitk.WriteImage(_image(seed=1), str(image))  # same geometry and name, other voxels
    rc, second = _run(capsys, image, backbone_path, tmp_path / "b.nii.gz", SEEDS[:1], "--features-cache", str(store))
    assert rc == 0 and second["features_cache"] == "miss" and counter["forwards"] == 2
    assert not np.allclose(_maps(first)[0], _maps(second)[0])

    rc, third = _run(capsys, image, backbone_path, tmp_path / "c.nii.gz", SEEDS[:1], "--features-cache", str(store),
                     "--mode", "slicewise")
    assert rc == 0 and third["features_cache"] == "miss" and counter["forwards"] == 3
    rc, fourth = _run(capsys, image, backbone_path, tmp_path / "d.nii.gz", SEEDS[:1], "--features-cache", str(store),
                      "--mode", "slicewise")
    assert rc == 0 and fourth["features_cache"] == "hit" and counter["forwards"] == 3


def test_crash_while_storing_never_pairs_an_old_key_with_new_arrays(backbone_path, counter, capsys, monkeypatch,
                                                                     tmp_path):
    """Cache holds image A; storing image B's features crashes after the arrays, before features.json; back on A,
    the cache must not serve B's arrays under A's key (features.json is removed before any array is replaced)."""
    image = tmp_path / "case.nrrd"
    sitk.WriteImage(_image(seed=0), str(image))
    store = tmp_path / "cache"
    rc, a = _run(capsys, image, backbone_path, tmp_path / "a.nii.gz", SEEDS[:1], "--features-cache", str(store))
    assert rc == 0 and counter["forwards"] == 1

    def crashing(feats, out, meta):
        np.save(out / cache.TOKENS_NAME, feats.patch_tokens[0].numpy())  # B's arrays written, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(cache, "write_features", crashing)
    sitk.WriteImage(_image(seed=1), str(image))
    with pytest.raises(OSError):
        _run(capsys, image, backbone_path, tmp_path / "b.nii.gz", SEEDS[:1], "--features-cache", str(store))
    assert not (tmp_path / "b.nii.gz").exists()
    monkeypatch.undo()  # the real writer (and the real load_model: count no further)

    sitk.WriteImage(_image(seed=0), str(image))
    rc, again = _run(capsys, image, backbone_path, tmp_path / "c.nii.gz", SEEDS[:1], "--features-cache", str(store))
    assert rc == 0 and again["features_cache"] == "miss"
    np.testing.assert_array_equal(_maps(again)[0], _maps(a)[0])


def test_a_seed_outside_is_one_line_and_computes_nothing(backbone_path, counter, capsys, caplog, tmp_path):
    image = tmp_path / "case.nrrd"
    sitk.WriteImage(_image(), str(image))
    rc, _ = _run(capsys, image, backbone_path, tmp_path / "out", [SEEDS[0], (22, 0, 0)],
                 "--features-cache", str(tmp_path / "cache"))
    assert rc == 2
    assert counter == {"loads": 0, "forwards": 0}
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "outside the image" in errors[0] and "case.nrrd" in errors[0] and "\n" not in errors[0]

"""The CPU plan: with LoRA and augmentation off, slice embeddings are computed once and reused (the trained plugin
equals the one trained without the cache); the run states its recipe and expected time up front; a full-size
backbone on a CPU gets 112-pixel slices, 24 per volume, unless told otherwise."""
from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

from anymc3d.backbone import BackboneSpec, LoadedBackbone, create_backbone, fingerprint
from anymc3d.data import load_manifest
from anymc3d.model import AnyMC3DModel
from anymc3d.plugin import load_plugin, read_training_summary
from anymc3d.training.config import CPU_INPUT_SIZE, CPU_NUM_SLICES, TrainConfig, TrainingError
from anymc3d.training.trainer import Trainer, train
from conftest import small_backbone
from train_tasks import write_task

FROZEN = TrainConfig(epochs=3, lora=False, augment=False, num_slices=6, seed=0)


@pytest.mark.slow
def test_cached_embeddings_train_the_same_plugin_and_encode_each_case_once(tmp_path, monkeypatch, caplog):
    manifest = write_task(tmp_path / "task", 8, splits=["train"] * 5 + ["val"] * 3)
    calls = []
    original = AnyMC3DModel.forward_features

    def counting(self, views, *args, **kwargs):
        calls.append(tuple(float(v.sum()) for v in views))  # which case was encoded
        return original(self, views, *args, **kwargs)

    monkeypatch.setattr(AnyMC3DModel, "forward_features", counting)
    with caplog.at_level(logging.INFO, logger="anymc3d.training.trainer"):
        cached = train(manifest, small_backbone(), tmp_path / "cached.anymc3d", FROZEN, progress=False)[0]
    assert len(calls) == len(set(calls)) == 8  # every case encoded once, over 3 epochs
    calls.clear()
    plain = train(manifest, small_backbone(), tmp_path / "plain.anymc3d",
                  dataclasses.replace(FROZEN, cache_embeddings=False), progress=False)[0]
    assert len(calls) > len(set(calls))  # without the cache the cases are encoded again every epoch
    a, b = load_plugin(tmp_path / "cached.anymc3d"), load_plugin(tmp_path / "plain.anymc3d")
    for key, value in a.head.state_dict().items():
        torch.testing.assert_close(value, b.head.state_dict()[key], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(a.head.head.weight, torch.zeros_like(a.head.head.weight))
    assert [h["val_auroc"] for h in cached.history] == pytest.approx([h["val_auroc"] for h in plain.history])
    plan = read_training_summary(tmp_path / "cached.anymc3d")["plan"]
    assert plan["cached_embeddings"] and not plan["lora"] and plan["seconds_per_slice"] > 0
    assert plan["expected_minutes"] >= 0
    assert any("plan:" in r.getMessage() and "cached" in r.getMessage() for r in caplog.records)


def test_cache_is_refused_when_embeddings_change_between_epochs(tmp_path):
    manifest = write_task(tmp_path / "task", 6, splits=["train"] * 4 + ["val"] * 2)
    with pytest.raises(TrainingError, match="cache_embeddings"):
        train(manifest, small_backbone(), tmp_path / "p.anymc3d",
              dataclasses.replace(FROZEN, augment=True, cache_embeddings=True), progress=False)


def test_full_size_backbone_on_cpu_gets_the_cpu_recipe(tmp_path):
    manifest = load_manifest(write_task(tmp_path / "task", 8, splits=["train"] * 4 + ["val"] * 4))
    spec = BackboneSpec("dinov2_vits14", img_size=224, depth=1, embed_dim=48, num_heads=2)
    model = create_backbone(spec)
    full = LoadedBackbone(model=model, spec=spec, fingerprint=fingerprint(model))
    trainer = Trainer(manifest, full, tmp_path / "p.anymc3d", TrainConfig(), device="cpu")
    assert (trainer.recipe.input_size, trainer.recipe.num_slices) == (CPU_INPUT_SIZE, CPU_NUM_SLICES)
    told = Trainer(manifest, full, tmp_path / "p.anymc3d", TrainConfig(input_size=224, num_slices=40), device="cpu")
    assert (told.recipe.input_size, told.recipe.num_slices) == (224, 40)
    small = Trainer(manifest, small_backbone(), tmp_path / "p.anymc3d", TrainConfig(), device="cpu")
    assert (small.recipe.input_size, small.recipe.num_slices) == (56, None)


@pytest.mark.slow
def test_eval_with_a_mask_column_measures_localisation_and_records_it(tmp_path):
    from anymc3d.training.evaluate import evaluate_plugin

    import csv

    manifest = write_task(tmp_path / "task", 10, masks=True, radius_mm=(7.0, 9.0))
    with manifest.open() as f:
        rows = list(csv.DictReader(f))
    for y in ("0", "1"):  # per label: 2 train, 1 val, 2 test
        for i, row in enumerate(r for r in rows if r["lesion"] == y):
            row["split"] = ["train", "train", "val", "test", "test"][i]
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    backbone = small_backbone()
    train(manifest, backbone, tmp_path / "p.anymc3d", dataclasses.replace(FROZEN, aux_seg=False), progress=False)
    metrics = evaluate_plugin(manifest, backbone, tmp_path / "p.anymc3d", tmp_path / "eval", bootstrap=10,
                              heatmap_methods=["attention", "occlusion"], record="tiny CT lesions")
    loc = metrics["localisation"]
    positives = [c for c in load_manifest(manifest).subset("test") if c.target.any()]
    assert loc["cases"] == len(positives) > 0
    for method in ("attention", "occlusion"):
        s = loc["methods"][method]
        assert s["cases"] == len(positives) and 0.0 <= s["hit_rate"] <= 1.0
        assert 0.0 < s["mean_volume_share"] < 0.2 and s["mean_deletion_area"] is not None
        per = [c["methods"][method] for c in loc["per_case"]]
        assert s["hit_rate"] == pytest.approx(np.mean([p["hit"] for p in per]))
    card = load_plugin(tmp_path / "p.anymc3d").config.localisation
    assert card["task"] == "tiny CT lesions" and set(card["measured"]) == {"attention", "occlusion"}
    best = max(card["measured"], key=lambda m: (card["measured"][m]["hit_rate"],
                                                card["measured"][m]["mass_over_volume_share"]))
    assert card["best"] == best
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))["localisation"]["cases"] == len(positives)

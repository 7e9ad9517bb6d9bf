"""`anymc3d train --folds K` and `anymc3d eval` through the command line: files, ensemble, bad manifest;
`anymc3d info` on trained plugins and ensembles; `anymc3d predict --plugin FOLDER` with a --folds ensemble."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.special import expit, logit

from anymc3d.backbone import save_backbone
from anymc3d.cli import main
from anymc3d.plugin import load_plugin, read_plugin_metadata, read_training_summary
from conftest import small_backbone
from train_tasks import split_list, write_task


def _run(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "anymc3d", *args], env=env, capture_output=True, text=True, encoding="utf-8", timeout=600)


@pytest.mark.slow
def test_folds_ensemble_eval_info_and_predict(tmp_path, capsys):
    manifest = write_task(tmp_path / "data", 16, seed=8, splits=split_list(12, 0, 4))  # no val rows: folds draw them
    bb = small_backbone()
    backbone = save_backbone(bb.model, bb.spec, tmp_path / "bb.safetensors")
    out = tmp_path / "ens"
    r = _run("train", str(manifest), "--backbone", str(backbone), "--out", str(out), "--folds", "2", "--epochs", "2",
             "--num-slices", "6", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    index = json.loads((out / "ensemble.json").read_text(encoding="utf-8"))
    assert index["plugins"] == ["fold0.anymc3d", "fold1.anymc3d"]
    s0, s1 = (read_training_summary(out / p) for p in index["plugins"])
    assert s0["splits"]["val"]["cases"] == s1["splits"]["val"]["cases"] == 6  # 12 non-test cases in 2 folds
    assert s0["splits"]["test"]["cases"] == 4
    assert load_plugin(out / "fold0.anymc3d").config.thresholds == [0.5]
    r = _run("eval", str(manifest), "--backbone", str(backbone), "--plugin", str(out), "--out", str(tmp_path / "ev"),
             "--bootstrap", "50")
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["cases"] == 4 and metrics["evaluated_split"] == "test" and len(metrics["plugin"]) == 2
    assert (tmp_path / "ev" / "metrics.csv").is_file() and (tmp_path / "ev" / "roc_lesion.png").is_file()
    _info_shows_the_training(out, [out / p for p in index["plugins"]], capsys)
    _predict_with_the_folder(out, backbone, [manifest.parent / "case000.nii.gz", manifest.parent / "case001.nii.gz"],
                             tmp_path)


def _info_shows_the_training(folder, members, capsys):
    """``info`` on a trained plugin: its training summary's numbers; on the folder: the ensemble, then each."""
    summary = read_training_summary(members[0])
    assert main(["info", str(members[0])]) == 0
    text = capsys.readouterr().out
    assert f"training     {summary['epochs_run']} epochs of at most 2 (best epoch {summary['best_epoch']})" in text
    for split, s in summary["splits"].items():
        assert f"{split} {s['cases']} (lesion {s['positives']['lesion']} positive)" in text
    assert f"validation   AUROC {summary['best_val_auroc']:.3f}" in text
    assert f"fitted on the {summary['splits']['val']['cases']} validation cases" in text
    assert summary["manifest_sha256"][:16] in text and "untrained" not in text
    assert main(["info", str(members[0]), "--json"]) == 0  # --json is still the plugin.json
    assert json.loads(capsys.readouterr().out) == read_plugin_metadata(members[0])
    assert main(["info", str(folder)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ensemble     2 plugins") and all(f"({m})" in text for m in members)
    assert text.count("validation   AUROC") == 2
    assert main(["info", str(folder), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["members"] == [read_plugin_metadata(m) for m in members] and shown["ensemble"]["folds"] == 2


def _results(path):
    return [{r["plugin"]: r for r in record["results"]} for record in json.loads(path.read_text(encoding="utf-8"))]


def _predict(backbone, images, out, *plugins):
    args = ["predict", *map(str, images), "--backbone", str(backbone), "--json", str(out), "--progress", "none"]
    for p in plugins:
        args += ["--plugin", str(p)] if p != "--ensemble" else [p]
    assert main(args) == 0
    return _results(out)


def _p(result) -> float:
    return float(result["probabilities"]["lesion"])


def _predict_with_the_folder(folder, backbone, images, tmp_path):
    """``--plugin FOLDER`` is one result, the mean calibrated logit of its members (checked against the members
    predicted separately, by the formula); mixed with a plugin it stands beside it; ``--ensemble`` counts it once."""
    fold0, fold1 = folder / "fold0.anymc3d", folder / "fold1.anymc3d"
    heat = tmp_path / "heat"
    assert main(["predict", *map(str, images), "--backbone", str(backbone), "--plugin", str(folder), "--heatmap",
                 str(heat), "--json", str(tmp_path / "unit.json"), "--progress", "none"]) == 0
    unit = _results(tmp_path / "unit.json")
    assert [list(r) for r in unit] == [["ens"], ["ens"]]
    assert unit[0]["ens"]["plugin_path"] == [str(fold0.resolve()), str(fold1.resolve())]
    assert sorted(p.name for p in heat.iterdir()) == ["case000__ens.nii.gz", "case001__ens.nii.gz"]
    mixed = _predict(backbone, images, tmp_path / "mixed.json", folder, fold0, fold1)
    assert [sorted(r) for r in mixed] == [["ens", "ens#1", "ens#2"]] * 2  # side by side, names made unique
    for u, m in zip(unit, mixed):
        z0, z1 = (logit(np.clip(_p(m[k]), 1e-7, 1 - 1e-7)) for k in ("ens#1", "ens#2"))
        assert abs(_p(u["ens"]) - expit((z0 + z1) / 2)) < 1e-4, (u, m)
        assert abs(_p(m["ens"]) - _p(u["ens"])) < 1e-6
    flat = _predict(backbone, images, tmp_path / "flat.json", fold0, fold1, "--ensemble")
    once = _predict(backbone, images, tmp_path / "once.json", folder, fold0, "--ensemble")
    for u, f, o, m in zip(unit, flat, once, mixed):
        assert abs(_p(f["ensemble"]) - _p(u["ens"])) < 1e-6  # = --ensemble with the member files
        z_unit, z0 = (logit(np.clip(_p(r), 1e-7, 1 - 1e-7)) for r in (u["ens"], m["ens#1"]))
        assert abs(_p(o["ensemble"]) - expit((z_unit + z0) / 2)) < 1e-4  # the folder weighs as one member


def test_bad_manifest_is_refused_before_training(tmp_path):
    manifest = write_task(tmp_path / "data", 6, seed=9)
    text = manifest.read_text(encoding="utf-8").splitlines()
    text[2] = text[2].rsplit(",", 1)[0] + ",2"  # line 3: label 2 (binary task)
    text[3] = text[3].replace("case002", "gone")
    manifest.write_text("\n".join(text) + "\n")
    bb = small_backbone()
    backbone = save_backbone(bb.model, bb.spec, tmp_path / "bb.safetensors")
    r = _run("train", str(manifest), "--backbone", str(backbone), "--out", str(tmp_path / "p.anymc3d"),
             "--task", "multilabel", "--no-progress")
    assert r.returncode == 2
    assert "line 3: label lesion must be 0 or 1, got '2'" in r.stderr and "line 4: image" in r.stderr and "gone" in r.stderr
    assert not (tmp_path / "p.anymc3d").exists() and not (tmp_path / "p.anymc3d.checkpoint.safetensors").exists()


@pytest.mark.slow
def test_train_and_eval_take_a_plain_timm_state_dict_and_show_progress(tmp_path):
    """The file as users have it (a plain timm state dict of a published size, no metadata): train names its
    architecture from the tensors (``--arch`` is checked, not needed) and the plugin records the same fingerprint."""
    import safetensors.torch
    import timm

    from anymc3d.backbone import load_backbone, make_load_bearing

    manifest = write_task(tmp_path / "data", 8, seed=3, splits=split_list(4, 2, 2))
    model = make_load_bearing(timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=28))
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain))
    r = _run("train", str(manifest), "--backbone", str(plain), "--arch", "dinov2_vitb14", "--out", str(tmp_path / "x"))
    assert r.returncode != 0 and "holds dinov2_vits14, but --arch dinov2_vitb14 was given" in r.stderr
    out = tmp_path / "p.anymc3d"
    r = _run("train", str(manifest), "--backbone", str(plain), "--arch", "vit_small_patch14_dinov2", "--out", str(out),
             "--epochs", "1", "--num-slices", "2", "--no-augment")
    assert r.returncode == 0, r.stderr[-2000:]
    # every pass shows progress per volume: the statistics pass, the epoch (with its loss), the validation
    assert "statistics (embedding mean and std of the training volumes, once)" in r.stderr
    assert "epoch 1/1" in r.stderr and "validation" in r.stderr
    assert "epoch 1/1: training loss" in r.stderr and "validation AUROC" in r.stderr
    meta = read_plugin_metadata(out)
    assert meta["backbone"]["name"] == "dinov2_vits14" and meta["backbone"]["img_size"] == 28
    assert meta["backbone_fingerprint"] == load_backbone(plain).fingerprint
    r = _run("eval", str(manifest), "--backbone", str(plain), "--plugin", str(out), "--out", str(tmp_path / "ev"),
             "--bootstrap", "20")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "eval, plugin 1 of 1" in r.stderr  # the eval pass shows its progress too

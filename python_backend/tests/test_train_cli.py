"""`anymc3d train --folds K` and `anymc3d eval` through the command line: files, ensemble, bad manifest."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from anymc3d.backbone import save_backbone
from anymc3d.plugin import load_plugin, read_training_summary
from conftest import small_backbone
from train_tasks import split_list, write_task


def _run(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "anymc3d", *args], env=env, capture_output=True, text=True, timeout=600)


def test_folds_ensemble_and_eval(tmp_path):
    manifest = write_task(tmp_path / "data", 16, seed=8, splits=split_list(12, 0, 4))  # no val rows: folds draw them
    bb = small_backbone()
    backbone = save_backbone(bb.model, bb.spec, tmp_path / "bb.safetensors")
    out = tmp_path / "ens"
    r = _run("train", str(manifest), "--backbone", str(backbone), "--out", str(out), "--folds", "2", "--epochs", "2",
             "--num-slices", "6", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    index = json.loads((out / "ensemble.json").read_text())
    assert index["plugins"] == ["fold0.anymc3d", "fold1.anymc3d"]
    s0, s1 = (read_training_summary(out / p) for p in index["plugins"])
    assert s0["splits"]["val"]["cases"] == s1["splits"]["val"]["cases"] == 6  # 12 non-test cases in 2 folds
    assert s0["splits"]["test"]["cases"] == 4
    assert load_plugin(out / "fold0.anymc3d").config.thresholds == [0.5]
    r = _run("eval", str(manifest), "--backbone", str(backbone), "--plugin", str(out), "--out", str(tmp_path / "ev"),
             "--bootstrap", "50")
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["cases"] == 4 and metrics["evaluated_split"] == "test" and len(metrics["plugin"]) == 2
    assert (tmp_path / "ev" / "metrics.csv").is_file() and (tmp_path / "ev" / "roc_lesion.png").is_file()


def test_bad_manifest_is_refused_before_training(tmp_path):
    manifest = write_task(tmp_path / "data", 6, seed=9)
    text = manifest.read_text().splitlines()
    text[2] = text[2].rsplit(",", 1)[0] + ",2"  # row 2: label 2 (binary task)
    text[3] = text[3].replace("case002", "gone")
    manifest.write_text("\n".join(text) + "\n")
    bb = small_backbone()
    backbone = save_backbone(bb.model, bb.spec, tmp_path / "bb.safetensors")
    r = _run("train", str(manifest), "--backbone", str(backbone), "--out", str(tmp_path / "p.anymc3d"),
             "--task", "multilabel", "--no-progress")
    assert r.returncode == 2
    assert "row 2" in r.stderr and "0 or 1" in r.stderr and "row 3" in r.stderr and "gone" in r.stderr
    assert not (tmp_path / "p.anymc3d").exists() and not (tmp_path / "p.anymc3d.checkpoint.safetensors").exists()

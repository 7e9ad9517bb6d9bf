"""`anymc3d eval --record-evaluation`: the held-out evaluation travels in the plugin's model card (plugin.json
`evaluation`), read back with plain zipfile + json and checked against metrics.json and against scikit-learn on the
probabilities `anymc3d predict` gives for the same test cases; `info` prints one line per finding; the plugin's
weights are untouched; a hostile or oversized `evaluation` key is refused when the plugin is read."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import zipfile

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from anymc3d.backbone import save_backbone
from anymc3d.cli import main
from anymc3d.errors import PluginError
from anymc3d.plugin import load_plugin, read_plugin_metadata
from anymc3d.plugin_file import read_plugin_json
from conftest import small_backbone
from train_tasks import one_thread, split_list, write_task  # noqa: F401 (autouse: one torch thread per test)

#: a run of seconds: queries and head only, 6 slices per case
TINY = ["--epochs", "2", "--num-slices", "6", "--no-lora", "--no-augment", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny plugin trained on 8 cases (4 for validation), evaluated with --record-evaluation on 8 test cases."""
    folder = tmp_path_factory.mktemp("evalcard")
    bb = small_backbone()
    manifest = write_task(folder / "data", 20, seed=3, splits=split_list(8, 4, 8))
    backbone = save_backbone(bb.model, bb.spec, folder / "bb.safetensors")
    plugin = folder / "lesion.anymc3d"
    assert main(["train", str(manifest), "--backbone", str(backbone), "--out", str(plugin), *TINY]) == 0
    with zipfile.ZipFile(plugin) as zf:
        weights_before = zf.read("plugin.safetensors")
    assert main(["eval", str(manifest), "--backbone", str(backbone), "--plugin", str(plugin), "--out",
                 str(folder / "ev"), "--bootstrap", "200", "--device", "cpu", "--record-evaluation"]) == 0
    return {"manifest": manifest, "backbone": backbone, "plugin": plugin, "weights_before": weights_before,
            "metrics": json.loads((folder / "ev" / "metrics.json").read_text(encoding="utf-8")), "folder": folder}


def _test_cases(manifest):
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    return [manifest.parent / r["image"] for r in rows], np.array([int(r["lesion"]) for r in rows])


def _by_hand(y, p, threshold):
    """Sensitivity and specificity of the rule p >= threshold, counted by hand."""
    pred = p >= threshold
    return (pred & (y == 1)).sum() / (y == 1).sum(), (~pred & (y == 0)).sum() / (y == 0).sum()


def test_the_recorded_evaluation_equals_metrics_json_and_scikit_learn(evaluated, tmp_path, capsys):
    plugin, metrics = evaluated["plugin"], evaluated["metrics"]
    with zipfile.ZipFile(plugin) as zf:  # independent of the project's reader
        card = json.loads(zf.read("plugin.json").decode("utf-8"))["evaluation"]
        assert zf.read("plugin.safetensors") == evaluated["weights_before"]  # the weights untouched
    load_plugin(plugin)  # still a valid plugin: the weights' hash and the card check out
    images, y = _test_cases(evaluated["manifest"])
    assert card["split"] == "test" and card["cases"] == len(images) == metrics["cases"]
    assert card["manifest_sha256"] == hashlib.sha256(evaluated["manifest"].read_bytes()).hexdigest()
    (finding,) = card["findings"]
    entry = metrics["per_label"]["lesion"]
    assert finding["label"] == "lesion" and finding["positives"] == entry["positives"] == int(y.sum())
    assert finding["auroc"] == entry["auroc"] and finding["auroc_ci95"] == entry["auroc_ci95"]
    assert finding["at_threshold"]["threshold"] == entry["at_stored_threshold"]["threshold"]
    assert finding["at_youden"]["threshold"] == entry["youden_threshold_from_validation"]  # chosen on val
    # independent: anymc3d predict's probabilities of the same test cases, scored by scikit-learn and by hand
    out = tmp_path / "p.json"
    assert main(["predict", *map(str, images), "--backbone", str(evaluated["backbone"]), "--plugin", str(plugin),
                 "--json", str(out), "--progress", "none", "--device", "cpu"]) == 0
    p = np.array([r["results"][0]["probabilities"]["lesion"] for r in json.loads(out.read_text(encoding="utf-8"))])
    assert 0 < y.sum() < len(y) and len(set(p.round(6))) > 2  # a ranking to score
    assert finding["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
    assert finding["auroc_ci95"][0] <= finding["auroc"] <= finding["auroc_ci95"][1]
    for point in (finding["at_threshold"], finding["at_youden"]):
        sensitivity, specificity = _by_hand(y, p, point["threshold"])
        assert (point["sensitivity"], point["specificity"]) == pytest.approx((sensitivity, specificity))
    # info prints it, one line per finding
    capsys.readouterr()
    assert main(["info", str(plugin)]) == 0
    lines = capsys.readouterr().out.splitlines()
    a, y_ = finding["at_threshold"], finding["at_youden"]
    expected = (f"  lesion: held-out AUROC {finding['auroc']:.2f} (95 % CI {finding['auroc_ci95'][0]:.2f}-"
                f"{finding['auroc_ci95'][1]:.2f}), sensitivity {a['sensitivity']:.2f} / specificity "
                f"{a['specificity']:.2f} at {a['threshold']:.2f}; sensitivity {y_['sensitivity']:.2f} / specificity "
                f"{y_['specificity']:.2f} at {y_['threshold']:.2f} (validation Youden), {len(images)} cases "
                f"({int(y.sum())} positive)")
    assert expected in lines, lines
    assert f"held-out evaluation on the test split of manifest sha256 {card['manifest_sha256'][:16]}" in lines


def _with_evaluation(source, target, change):
    """A copy of ``source`` whose plugin.json's evaluation is changed by ``change`` (written as a plain zip)."""
    with zipfile.ZipFile(source) as zf:
        meta, weights = json.loads(zf.read("plugin.json")), zf.read("plugin.safetensors")
    change(meta["evaluation"])
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("plugin.json", json.dumps(meta))
        zf.writestr("plugin.safetensors", weights)
    return target


def _finding(card):
    return card["findings"][0]


HOSTILE = {
    "nan_auroc": lambda c: _finding(c).update(auroc=math.nan),
    "infinite_threshold": lambda c: _finding(c)["at_threshold"].update(threshold=math.inf),
    "auroc_above_one": lambda c: _finding(c).update(auroc=1.5),
    "thousands_of_findings": lambda c: c.update(findings=c["findings"] * 5000),
    "label_not_the_plugins": lambda c: _finding(c).update(label="calcification"),
    "long_label": lambda c: _finding(c).update(label="x" * 10_000),
    "more_positives_than_cases": lambda c: _finding(c).update(positives=c["cases"] + 1),
    "unknown_key": lambda c: c.update(script="<img src=x onerror=alert(1)>"),
    "not_a_sha256": lambda c: c.update(manifest_sha256="../../etc/passwd"),
    "three_ci_bounds": lambda c: _finding(c).update(auroc_ci95=[0.1, 0.2, 0.3]),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_or_oversized_evaluation_is_refused_on_load(evaluated, tmp_path, name):
    bad = _with_evaluation(evaluated["plugin"], tmp_path / f"{name}.anymc3d", HOSTILE[name])
    for reader in (read_plugin_json, read_plugin_metadata, load_plugin):  # torch-free, the torch side, loading
        with pytest.raises(PluginError, match="invalid plugin metadata at evaluation"):
            reader(bad)
    good = _with_evaluation(evaluated["plugin"], tmp_path / "same.anymc3d", lambda c: None)
    assert read_plugin_metadata(good)["evaluation"] == read_plugin_metadata(evaluated["plugin"])["evaluation"]


def test_an_ensembles_evaluation_is_not_recorded_into_its_members(evaluated, tmp_path, caplog):
    """The evaluation of a --folds ensemble is not any member's: refused in one line (exit 2), nothing rewritten."""
    import shutil

    from anymc3d.contract import EXIT_USAGE

    folder = tmp_path / "folds"
    folder.mkdir()
    for name in ("fold0.anymc3d", "fold1.anymc3d"):
        shutil.copy(evaluated["plugin"], folder / name)
    (folder / "ensemble.json").write_text(json.dumps({"plugins": ["fold0.anymc3d", "fold1.anymc3d"], "folds": 2}))
    before = (folder / "fold0.anymc3d").read_bytes()
    assert main(["eval", str(evaluated["manifest"]), "--backbone", str(evaluated["backbone"]), "--plugin", str(folder),
                 "--out", str(tmp_path / "ev"), "--device", "cpu", "--record-evaluation"]) == EXIT_USAGE
    assert "records one plugin's evaluation, not an ensemble's" in caplog.text
    assert (folder / "fold0.anymc3d").read_bytes() == before and not (tmp_path / "ev").exists()

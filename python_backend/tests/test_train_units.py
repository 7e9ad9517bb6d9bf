"""Focal loss, Platt calibration, metrics and manifest checks against independent computations."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from anymc3d.calibration import calibrate, f1_optimal_threshold
from anymc3d.data import ManifestError, assign_split, load_manifest
from anymc3d.evaluation import bootstrap_ci, evaluate, write_report
from anymc3d.losses import sigmoid_focal_loss, softmax_focal_loss


# ------------------------------------------------------------------------------------------ focal loss
def test_sigmoid_focal_matches_torchvision():
    from torchvision.ops import sigmoid_focal_loss as tv

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 3, generator=g) * 3
    targets = (torch.rand(7, 3, generator=g) > 0.5).float()
    for gamma, alpha in ((2.0, 0.25), (0.0, -1.0), (1.5, 0.6)):
        ours = sigmoid_focal_loss(logits, targets, gamma, alpha)
        ref = tv(logits, targets, alpha=alpha, gamma=gamma, reduction="mean")
        assert torch.allclose(ours, ref, atol=1e-6), (gamma, alpha)


def test_softmax_focal_matches_hand_formula():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    targets = torch.tensor([0, 2])
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    pt = p[[0, 1], [0, 2]]
    expected = np.mean(-0.25 * (1 - pt) ** 2 * np.log(pt))
    assert softmax_focal_loss(logits, targets, 2.0, 0.25).item() == pytest.approx(expected, rel=1e-6)
    # gamma 0, no alpha: plain cross-entropy
    ce = torch.nn.functional.cross_entropy(logits, targets)
    assert softmax_focal_loss(logits, targets, 0.0, -1).item() == pytest.approx(ce.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------ calibration
def _scores(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    z = rng.normal(size=n) + 1.5 * y - 0.7
    return z, y


def test_platt_maps_f1_optimal_point_to_half_and_is_max_likelihood():
    from sklearn.metrics import f1_score

    z, y = _scores()
    cal = calibrate(z[:, None], y[:, None], "multilabel")
    a, b = cal.a[0], cal.b[0]
    # independent F1 search: every observed score as a threshold
    f1s = [f1_score(y, (z >= t).astype(int)) for t in z]
    t_star = z[int(np.argmax(f1s))]
    assert max(f1s) == pytest.approx(f1_score(y, (z >= f1_optimal_threshold(z, y)).astype(int)))
    p_star = 1 / (1 + np.exp(-(a * t_star + b)))
    assert p_star == pytest.approx(0.5, abs=1e-9)
    # decisions at 0.5 on the calibrated probability == decisions at the F1-optimal raw threshold
    p = 1 / (1 + np.exp(-(a * z + b)))
    assert np.array_equal(p >= 0.5, z >= t_star)
    # the slope is the maximum-likelihood one against Platt's targets (scipy, not scikit-learn)
    assert a == pytest.approx(_platt_slope(z, y, t_star), rel=1e-3)


def _platt_slope(z, y, anchor, high=50.0):
    """Independent: the slope minimising the cross-entropy to Platt's targets (N+ + 1)/(N+ + 2), 1/(N- + 2)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_expit

    t = np.where(y == 1, (y.sum() + 1) / (y.sum() + 2), 1 / (len(y) - y.sum() + 2))

    def nll(s):
        x = s * (z - anchor)
        return -np.mean(t * log_expit(x) + (1 - t) * log_expit(-x))

    return minimize_scalar(nll, bounds=(1e-3, high), method="bounded").x


def test_platt_slope_stays_finite_on_a_separated_validation_split():
    """12 validation cases, perfectly separated (seed 0 of the learning test: the 0/1 fit gave a = 827 and
    float32 probabilities of exactly 0 and 1, ties that cost held-out AUROC): the slope is Platt's finite one,
    and held-out scores between and beyond the validation ones keep their order after calibration (float32)."""
    import torch

    from anymc3d.plugin import probabilities

    z = np.array([-0.82, -0.81, -0.80, -0.80, -0.79, -0.78, -0.45, -0.30, -0.12, 0.05, 0.31, 0.60])
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    cal = calibrate(z[:, None], y[:, None], "multilabel")
    assert cal.raw_thresholds[0] == pytest.approx(-0.45)
    assert cal.a[0] == pytest.approx(_platt_slope(z, y, -0.45, high=1e4), rel=1e-3) and cal.a[0] < 50
    held_out = np.sort(np.r_[np.linspace(-0.9, 0.7, 40), [-0.8001, -0.8002, -0.5, -0.4]])
    calibrated = torch.tensor(cal.a[0] * held_out + cal.b[0], dtype=torch.float32)[:, None]
    p = probabilities(calibrated, "multilabel").numpy()[:, 0]
    assert np.all(np.diff(p) > 0) and 0 < p.min() and p.max() < 1


def test_temperature_for_multiclass():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + 4 * np.eye(3)[y]  # overconfident-looking scale
    cal = calibrate(logits, y, "multiclass")
    assert len(set(cal.a)) == 1 and cal.b == [0.0, 0.0, 0.0]
    assert 0 < cal.a[0] < 5


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_against_sklearn_and_hand_counts(tmp_path):
    from sklearn.metrics import roc_auc_score

    z, y = _scores(120, seed=3)
    p = 1 / (1 + np.exp(-z))
    zv, yv = _scores(80, seed=4)
    pv = 1 / (1 + np.exp(-zv))
    m = evaluate(y[:, None], p[:, None], ["lesion"], [0.5], yv[:, None], pv[:, None], bootstrap=200)
    e = m["per_label"]["lesion"]
    assert e["auroc"] == pytest.approx(roc_auc_score(y, p))
    lo, hi = e["auroc_ci95"]
    assert lo < e["auroc"] < hi and hi - lo < 0.3
    at = e["at_stored_threshold"]
    pred = p >= 0.5
    assert (at["tp"], at["fp"], at["tn"], at["fn"]) == (int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum()),
                                                          int((~pred & (y == 0)).sum()), int((~pred & (y == 1)).sum()))
    assert at["sensitivity"] == pytest.approx(at["tp"] / (at["tp"] + at["fn"]))
    assert at["specificity"] == pytest.approx(at["tn"] / (at["tn"] + at["fp"]))
    assert at["f1"] == pytest.approx(2 * at["tp"] / (2 * at["tp"] + at["fp"] + at["fn"]))
    # Youden threshold chosen on validation: maximises sens + spec - 1 there (hand search), not on the test cases
    j = [((pv >= t) & (yv == 1)).sum() / (yv == 1).sum() - ((pv >= t) & (yv == 0)).sum() / (yv == 0).sum() for t in pv]
    t = e["youden_threshold_from_validation"]
    assert max(j) == pytest.approx(((pv >= t) & (yv == 1)).sum() / (yv == 1).sum() - ((pv >= t) & (yv == 0)).sum() / (yv == 0).sum())
    paths = write_report(m, y[:, None], p[:, None], tmp_path)
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "roc_lesion.png").stat().st_size > 1000
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert {r["operating_point"] for r in rows} == {"stored_threshold", "youden"}
    assert "json" in paths


def test_bootstrap_ci_of_a_perfect_separator_is_one():
    y = np.array([0, 1] * 20)
    assert bootstrap_ci(y, y + 0.1, n=100) == (1.0, 1.0)


# ------------------------------------------------------------------------------------------ manifests
def _volume(path: Path, size=(8, 8, 4), spacing=(1.0, 1.0, 2.0)):
    image = sitk.GetImageFromArray(np.zeros(tuple(reversed(size)), np.float32))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def _write_csv(path: Path, rows: list[dict]):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_bad_manifest_lists_every_problem_with_its_line(tmp_path):
    for i in range(4):
        _volume(tmp_path / f"c{i}.nii.gz")
    _volume(tmp_path / "badmask.nii.gz", size=(8, 8, 5))
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    rows = [{"image": "c0.nii.gz", "lesion": "1", "mask": ""},
            {"image": "missing.nii.gz", "lesion": "0", "mask": ""},
            {"image": "c1.nii.gz", "lesion": "yes", "mask": ""},
            {"image": "c2.nii.gz", "lesion": "", "mask": ""}]
    with pytest.raises(ManifestError) as info:
        load_manifest(_write_csv(tmp_path / "m.csv", rows))
    text = str(info.value)
    assert f"line 3: image {tmp_path / 'missing.nii.gz'}: file or folder not found" in text
    assert "line 4: label lesion must be 0 or 1, got 'yes'" in text
    assert "line 5: label lesion must be 0 or 1, got ''" in text
    assert len(info.value.problems) == 3
    # once labels and paths are right, images are read: unreadable file and mask geometry, with rows
    rows = [{"image": "c0.nii.gz", "lesion": "1", "mask": "badmask.nii.gz"},
            {"image": "broken.nii.gz", "lesion": "0", "mask": ""},
            {"image": "c1.nii.gz", "lesion": "0", "mask": ""}]
    with pytest.raises(ManifestError) as info:
        load_manifest(_write_csv(tmp_path / "m2.csv", rows))
    text = str(info.value)
    assert "line 2: mask" in text and "does not lie on the image grid" in text
    assert f"line 3: {tmp_path / 'broken.nii.gz'}:" in text


def test_one_class_only_in_a_split_is_refused(tmp_path):
    for i in range(6):
        _volume(tmp_path / f"c{i}.nii.gz")
    rows = [{"image": f"c{i}.nii.gz", "lesion": str(i % 2), "split": "train" if i < 4 else "val"} for i in range(6)]
    rows[4]["lesion"] = rows[5]["lesion"] = "1"
    with pytest.raises(ManifestError, match=r"split 'val' \(lines 6, 7\): label lesion is 1 in every case"):
        load_manifest(_write_csv(tmp_path / "m.csv", rows))


def test_manifest_multiview_multiclass_and_seeded_split(tmp_path):
    for i in range(12):
        _volume(tmp_path / f"a{i}.nii.gz"), _volume(tmp_path / f"b{i}.nii.gz")
    rows = [{"case": f"x{i}", "image_ax": f"a{i}.nii.gz", "image_cor": f"b{i}.nii.gz", "grade": str(i % 3)}
            for i in range(12)]
    m = load_manifest(_write_csv(tmp_path / "m.csv", rows))
    assert m.views == ["ax", "cor"] and m.task == "multiclass" and m.labels == ["grade_0", "grade_1", "grade_2"]
    assign_split(m, val_fraction=0.5, seed=3)
    first = [c.split for c in m.cases]
    m2 = load_manifest(tmp_path / "m.csv")
    assign_split(m2, val_fraction=0.5, seed=3)
    assert first == [c.split for c in m2.cases]
    for split in ("train", "val"):
        assert sorted(int(c.target) for c in m.subset(split)) == [0, 0, 1, 1, 2, 2]


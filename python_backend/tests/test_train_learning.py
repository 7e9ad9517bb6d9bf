"""The trainer learns: a small ellipsoid lesion in noisy CT-like volumes of varying size and spacing, on the
test backbone (random, load-bearing: its slice embeddings barely vary, see training/standardize.py),
with the default settings except a short budget; shuffled labels stay near chance; a finding visible in one
of two views is learned through the multi-view path; masks drive the auxiliary decoder.

Held-out AUROC is computed by ``anymc3d eval`` (evaluate_plugin) on a test split never seen in training.
"""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from anymc3d.training.config import TrainConfig
from anymc3d.training.evaluate import evaluate_plugin
from anymc3d.training.trainer import train
from conftest import small_backbone
from train_tasks import split_list, write_task

logger = logging.getLogger(__name__)

#: the test budget: the defaults (30 epochs at most, patience 10) on 24 training volumes resampled to 8 slices
BUDGET = dict(num_slices=8)
SPLITS = split_list(24, 12, 32)
#: the shuffled-label controls: the same training and validation sizes, a larger test split (see chance_band)
CONTROL_SPLITS = split_list(24, 12, 96)


from train_tasks import one_thread  # noqa: E402,F401 (autouse: one torch thread per test)


def _run(tmp_path, seed: int, shuffle: bool = False, masks: bool = False, views: int = 1, radius=(6.0, 9.0),
         aux_seg=None, name="p", splits=SPLITS):
    manifest = tmp_path / f"data_{seed}_{int(shuffle)}_{views}_{radius[0]}" / "manifest.csv"
    if not manifest.exists():
        write_task(manifest.parent, len(splits), seed=seed, shuffle_labels=shuffle, masks=masks, splits=splits,
                   radius_mm=radius, views=views)
    out = tmp_path / f"{name}_{seed}_{int(shuffle)}.anymc3d"
    result = train(manifest, small_backbone(), out, TrainConfig(seed=seed, aux_seg=aux_seg, **BUDGET), progress=False)[0]
    metrics = evaluate_plugin(manifest, small_backbone(), out, tmp_path / f"eval_{name}_{seed}_{int(shuffle)}", bootstrap=200)
    return result, metrics


def chance_band(positives: int, negatives: int, z: float = 3.0) -> float:
    """Half-width of the band around 0.5 where the AUROC of scores independent of the labels falls with
    probability ~99.7 % (z=3): the Mann-Whitney null SD of AUROC, sqrt((n1 + n0 + 1) / (12 n1 n0)), times z
    (normal approximation; exact for untied scores in the limit)."""
    return z * math.sqrt((positives + negatives + 1) / (12.0 * positives * negatives))


def test_chance_band_matches_permuted_labels():
    """The band's SD against a direct simulation: AUROC of fixed scores under random label permutations."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=96), np.array([0, 1] * 48)
    aucs = [roc_auc_score(rng.permutation(labels), scores) for _ in range(2000)]
    assert abs(np.std(aucs) - chance_band(48, 48, z=1.0)) < 0.004, np.std(aucs)


def test_lesion_task_is_learned_for_every_seed_and_shuffled_labels_are_not(tmp_path):
    """Three seeds (data, split and initialisation), each held-out AUROC >= 0.9 (the issue's bar, per seed).

    Why seed 0 once gave 0.853 whatever the epoch: not the lesions (every held-out positive's lesion is in the
    8-slice grid, 127-564 pixels on its largest slice) nor the trainer: the raw scores ranked the held-out cases
    at AUROC 0.992. The 12 validation cases were perfectly separated, so the Platt fit on 0/1 labels ran to a
    slope of 827; every held-out probability became exactly 0.0 or 1.0 in float32 and positives tied with
    negatives. Calibration now fits Platt's regularised targets (anymc3d/calibration.py): a finite slope.
    Measured (CPU, 2026-12-01): held-out AUROC 0.992, 1.0, 0.992 for seeds 0, 1, 2; shuffled 0.461, 0.548,
    0.524 against the band 0.5 +- 0.179.

    Shuffled-label controls: labels permuted over the whole manifest, so held-out labels are independent of
    the images and held-out AUROC follows the Mann-Whitney null: within 0.5 +- 3 SD with
    SD = sqrt((n1 + n0 + 1) / (12 n1 n0)) (:func:`chance_band`); the controls' test split is 96 cases
    (SD ~0.059 for 48/48: band +-0.18) so the band says something; a 32-case split would allow +-0.31."""
    learned, chance = [], []
    for seed in (0, 1, 2):
        result, metrics = _run(tmp_path, seed)
        _, control = _run(tmp_path, seed, shuffle=True, splits=CONTROL_SPLITS)
        learned.append(metrics["macro_auroc"])
        counts = control["per_label"]["lesion"]
        band = chance_band(counts["positives"], counts["negatives"])
        chance.append((control["macro_auroc"], band))
        print(json.dumps({"seed": seed, "held_out_auroc": learned[-1], "ci95": metrics["macro_auroc_ci95"],
                          "shuffled_auroc": chance[-1][0], "chance_band": [0.5 - band, 0.5 + band],
                          "val": [round(h["val_auroc"], 3) for h in result.history],
                          "train_s": result.summary["seconds"]}))
        # the calibrated probabilities' F1 point is 0.5 and the stored thresholds are 0.5
        assert metrics["per_label"]["lesion"]["at_stored_threshold"]["threshold"] == 0.5
    assert min(learned) >= 0.9, learned
    assert all(abs(auc - 0.5) <= band for auc, band in chance), chance


def test_finding_in_one_of_two_views_is_learned(tmp_path):
    """View a never shows the lesion, view b shows it in half the cases: needs the per-view path."""
    result, metrics = _run(tmp_path, 2, views=2, name="mv")
    print(json.dumps({"multi_view_held_out_auroc": metrics["macro_auroc"], "val": [h["val_auroc"] for h in result.history]}))
    assert result.summary["splits"]["train"]["cases"] == 24
    assert metrics["macro_auroc"] >= 0.85


def test_masks_are_used_only_when_asked_and_the_decoder_loss_falls(tmp_path):
    """A tiny lesion (radius 3-4.5 mm, ~1/3 of a 14-pixel patch): the same budget (the defaults, at most 30
    epochs) with and without the auxiliary decoder, on the same data and seed.

    What it shows: the masks are used only when asked (the summary's aux_seg, no segmentation loss in the run
    without) and the decoder learns (its Dice + CE falls below 0.8 of the first epoch's). What it does not show,
    and does not test: that masks improve classification. The two held-out AUROCs are printed, not ranked: one seed and 32 held-out
    cases cannot rank them (the sampling SD of one AUROC is already ~0.1 near chance at 16/16, see chance_band),
    and a test claiming either way would be a coin toss. Measured (CPU, 2026-12-01, after the calibration fix):
    neither run learns this tiny lesion at this budget: held-out AUROC 0.571 with masks, 0.538 without (both
    within chance for 32 cases), early-stopped after 15 epochs; the decoder's loss fell 1.76 -> 1.23."""
    with_masks, m1 = _run(tmp_path, 3, masks=True, radius=(3.0, 4.5), name="seg")
    without, m2 = _run(tmp_path, 3, masks=True, radius=(3.0, 4.5), aux_seg=False, name="noseg")
    seg = [h["train_seg_loss"] for h in with_masks.history]
    print(json.dumps({"tiny_lesion_auroc_with_masks": m1["macro_auroc"], "without_masks": m2["macro_auroc"],
                      "seg_loss": seg}))
    assert with_masks.summary["aux_seg"] and not without.summary["aux_seg"]
    assert all(h["train_seg_loss"] is None for h in without.history)
    assert min(seg[-3:]) < 0.8 * seg[0]


pytestmark = pytest.mark.slow  # training loops: left out of the quick tier

"""Calibration of a plugin's raw scores on the validation split (stored in the plugin as Platt a, b).

Multi-label: per finding, Platt scaling p = sigmoid(a z + b) constrained so that the F1-optimal threshold z*
of the raw validation scores maps to probability 0.5 (b = -a z*): the decision threshold 0.5 then is the
F1-optimal operating point, and a is the maximum-likelihood slope of a logistic fit on (z - z*) (scikit-learn,
no penalty) to Platt's own regularised targets, (N+ + 1)/(N+ + 2) for positives and 1/(N- + 2) for negatives
(Platt 1999, sec. 2.2), not to the 0/1 labels. Why: a small validation split is often perfectly separated, and
the 0/1 fit's slope then runs off to infinity (a = 827 on tests/test_train_learning.py's seed 0, 12 validation
cases): every held-out probability became exactly 0.0 or 1.0 in float32, positives tied with negatives, and
the held-out AUROC fell from 0.992 (raw scores) to 0.853. Platt's targets keep the slope finite, and equal to
the 0/1 fit's as the split grows. Multi-class: one temperature for all classes (a_c = 1/T, b_c = 0), fitted by
maximum likelihood, since a per-class shift would change the softmax ranking.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class Calibration:
    """Per-finding Platt parameters and thresholds (on the calibrated probability)."""

    a: list[float]
    b: list[float]
    thresholds: list[float]
    raw_thresholds: list[float]


def f1_optimal_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The raw-score threshold t maximising F1 of the rule ``score >= t`` (scikit-learn's PR curve)."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    return float(thresholds[int(np.argmax(f1))])


def platt_targets(labels: np.ndarray) -> np.ndarray:
    """Platt's regularised targets: (N+ + 1)/(N+ + 2) for positives, 1/(N- + 2) for negatives."""
    y = np.asarray(labels, dtype=int)
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    return np.where(y == 1, (pos + 1.0) / (pos + 2.0), 1.0 / (neg + 2.0))


def platt_through(scores: np.ndarray, labels: np.ndarray, anchor: float) -> float:
    """Maximum-likelihood slope a > 0 of p = sigmoid(a (z - anchor)) against Platt's targets (finite on
    separated data); 1.0 (with a warning) when the fit is not positive (no signal in the validation scores)."""
    from sklearn.linear_model import LogisticRegression

    x = (np.asarray(scores, dtype=np.float64) - anchor)[:, None]
    t = platt_targets(labels)
    # soft targets as scikit-learn takes them: each case once as a positive (weight t), once as a negative (1 - t)
    # C = inf: no penalty (scikit-learn 1.8 deprecates penalty=None; C = inf means the same in every version)
    fit = LogisticRegression(C=np.inf, fit_intercept=False, tol=1e-10, max_iter=1000).fit(
        np.vstack([x, x]), np.r_[np.ones(len(x), int), np.zeros(len(x), int)], sample_weight=np.r_[t, 1.0 - t])
    a = float(fit.coef_[0, 0])
    if not np.isfinite(a) or a <= 1e-6:
        logger.warning("Platt fit gave slope %.3g (no signal on validation): slope 1 kept", a)
        return 1.0
    return a


def fit_temperature(logits: np.ndarray, classes: np.ndarray) -> float:
    """Temperature T > 0 minimising the softmax negative log-likelihood (scipy, bounded scalar search)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    logits = np.asarray(logits, dtype=np.float64)

    def nll(log_t: float) -> float:
        return -float(log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(classes)), classes].mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-5, 5), method="bounded").x))


def calibrate(logits: np.ndarray, targets: np.ndarray, task: str) -> Calibration:
    """Fit the calibration on validation raw logits (N, K) and targets ((N, K) 0/1, or (N,) class indices)."""
    logits = np.asarray(logits, dtype=np.float64)
    k = logits.shape[1]
    if task == "multiclass":
        t = fit_temperature(logits, np.asarray(targets, dtype=int))
        return Calibration([1.0 / t] * k, [0.0] * k, [0.5] * k, [0.5] * k)
    a, b, raw = [], [], []
    for c in range(k):
        y = np.asarray(targets[:, c], dtype=int)
        if y.min() == y.max():
            logger.warning("finding %d has one class only on validation: left uncalibrated", c)
            a.append(1.0), b.append(0.0), raw.append(0.0)
            continue
        z_star = f1_optimal_threshold(logits[:, c], y)
        slope = platt_through(logits[:, c], y, z_star)
        a.append(slope), b.append(-slope * z_star), raw.append(z_star)
    return Calibration(a, b, [0.5] * k, raw)

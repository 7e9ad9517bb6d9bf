"""Evaluation of a plugin's predictions: AUROC per finding and macro with bootstrapped 95 % confidence
intervals; F1, accuracy, sensitivity, specificity and confusion counts at the Youden point (chosen on
validation data, never on the test set) and at the plugin's stored thresholds; JSON, CSV and ROC PNGs.

Every number comes from scikit-learn's metrics; only the bootstrap loop and the file writing live here.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from anymc3d.contract import safe_name
from anymc3d.fileio import atomic_path, write_text_atomic

logger = logging.getLogger(__name__)


def one_hot(targets: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,) class indices -> (N, K) 0/1; (N, K) passes through."""
    targets = np.asarray(targets)
    if targets.ndim == 2:
        return targets.astype(int)
    return np.eye(num_classes, dtype=int)[targets.astype(int)]


def auroc(y: np.ndarray, p: np.ndarray) -> Optional[float]:
    """AUROC, or None when only one class is present."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None


def bootstrap_ci(y: np.ndarray, p: np.ndarray, n: int = 1000, seed: int = 0) -> Optional[tuple[float, float]]:
    """Percentile 95 % interval of AUROC over ``n`` case resamples (resamples with one class are skipped)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        value = auroc(y[idx], p[idx])
        if value is not None:
            values.append(value)
    if len(values) < n // 2:
        return None
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def youden_threshold(y: np.ndarray, p: np.ndarray) -> Optional[float]:
    """Probability threshold maximising sensitivity + specificity - 1 (scikit-learn's ROC curve)."""
    from sklearn.metrics import roc_curve

    if not 0 < y.sum() < len(y):
        return None
    fpr, tpr, thresholds = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))


def at_threshold(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """F1, accuracy, sensitivity, specificity and confusion counts of the rule ``p >= threshold``."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    return {"threshold": float(threshold), "f1": float(f1_score(y, pred, zero_division=0)),
            "accuracy": float(accuracy_score(y, pred)),
            "sensitivity": float(recall_score(y, pred, pos_label=1, zero_division=0)),
            "specificity": float(recall_score(y, pred, pos_label=0, zero_division=0)),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def evaluate(targets: np.ndarray, probs: np.ndarray, labels: Sequence[str], thresholds: Sequence[float],
             val_targets: Optional[np.ndarray] = None, val_probs: Optional[np.ndarray] = None,
             bootstrap: int = 1000, seed: int = 0) -> dict:
    """Metrics of calibrated probabilities (N, K) against targets ((N, K) 0/1 or (N,) class indices).

    The Youden threshold of each finding comes from ``val_probs``/``val_targets``; without them it is not
    reported (choosing it on the evaluated cases would flatter the result).
    """
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    y = one_hot(targets, k)
    yv = None if val_targets is None else one_hot(val_targets, k)
    per = {}
    for c, label in enumerate(labels):
        entry = {"positives": int(y[:, c].sum()), "negatives": int(len(y) - y[:, c].sum()),
                 "auroc": auroc(y[:, c], probs[:, c]), "auroc_ci95": bootstrap_ci(y[:, c], probs[:, c], bootstrap, seed + c),
                 "at_stored_threshold": at_threshold(y[:, c], probs[:, c], thresholds[c])}
        youden = None if yv is None else youden_threshold(yv[:, c], np.asarray(val_probs)[:, c])
        entry["youden_threshold_from_validation"] = youden
        entry["at_youden"] = None if youden is None else at_threshold(y[:, c], probs[:, c], youden)
        per[label] = entry
    aurocs = [e["auroc"] for e in per.values() if e["auroc"] is not None]
    return {"cases": int(len(y)), "labels": list(labels), "per_label": per,
            "macro_auroc": float(np.mean(aurocs)) if aurocs else None,
            "macro_auroc_ci95": _macro_ci(y, probs, bootstrap, seed)}


def _macro_ci(y: np.ndarray, probs: np.ndarray, n: int, seed: int) -> Optional[tuple[float, float]]:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        cols = [c for c in range(y.shape[1]) if 0 < y[idx, c].sum() < len(idx)]
        if cols:
            values.append(np.mean([roc_auc_score(y[idx, c], probs[idx, c]) for c in cols]))
    if len(values) < n // 2:
        return None
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def metrics_rows(metrics: dict) -> list[dict]:
    """One flat row per finding and operating point (for the CSV)."""
    rows = []
    for label, e in metrics["per_label"].items():
        ci = e["auroc_ci95"] or (None, None)
        for point in ("at_stored_threshold", "at_youden"):
            if e[point] is None:
                continue
            rows.append({"label": label, "operating_point": point.removeprefix("at_"), "auroc": e["auroc"],
                         "auroc_ci95_low": ci[0], "auroc_ci95_high": ci[1], **e[point]})
    return rows


def write_report(metrics: dict, targets: np.ndarray, probs: np.ndarray, folder: Path) -> dict[str, Path]:
    """Write metrics.json, metrics.csv and one roc_<label>.png per finding into ``folder`` (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_text_atomic(folder / "metrics.json", json.dumps(metrics, indent=2))}
    rows = metrics_rows(metrics)
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths["csv"] = write_text_atomic(folder / "metrics.csv", buffer.getvalue())
    y = one_hot(targets, probs.shape[1])
    for c, label in enumerate(metrics["labels"]):
        e = metrics["per_label"][label]
        if e["auroc"] is None:
            continue
        fpr, tpr, _ = roc_curve(y[:, c], probs[:, c])
        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        ax.plot(fpr, tpr, label=f"AUROC {e['auroc']:.3f}")
        ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC: {label}", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right")
        with atomic_path(folder / f"roc_{safe_name(label)}.png", ".png") as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        paths[f"roc_{label}"] = folder / f"roc_{safe_name(label)}.png"
    return paths


def evaluation_card(metrics: dict, bootstrap: int) -> dict:
    """The model card's summary of :func:`evaluate`'s ``metrics`` of one plugin (``plugin.json`` ``evaluation``,
    schemas/plugin.schema.json): the split and manifest evaluated, the cases, and per finding its positives, AUROC with
    the bootstrapped 95 % CI, and sensitivity / specificity at the plugin's threshold and, when validation chose one,
    at the Youden threshold. Undefined numbers (an AUROC of one class only) are left out."""
    def point(at):
        return {key: at[key] for key in ("threshold", "sensitivity", "specificity")}

    findings = []
    for label in metrics["labels"]:
        e = metrics["per_label"][label]
        entry = {"label": label, "positives": e["positives"], "at_threshold": point(e["at_stored_threshold"])}
        if e["auroc"] is not None:
            entry["auroc"] = e["auroc"]
        if e["auroc_ci95"] is not None:
            entry["auroc_ci95"] = list(e["auroc_ci95"])
        if e.get("at_youden"):
            entry["at_youden"] = point(e["at_youden"])
        findings.append(entry)
    return {"split": metrics["evaluated_split"], "manifest_sha256": metrics["manifest_sha256"],
            "cases": metrics["cases"], "bootstrap": int(bootstrap), "findings": findings}

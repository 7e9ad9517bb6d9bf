"""``anymc3d fit-lifted``: a lifted-feature plugin (kind ``planecycle_linear``) fitted on a labelled manifest.

The backbone stays frozen and lifted (PlaneCycle, no gradients): each case's slice embeddings h_s (mean lifted patch
token of slice s) are computed once through :class:`anymc3d.model.AnyMC3DModel` with a zero task query, so the
pooled case embedding v is the plain mean of all the volume's lifted patch tokens (uniform a_s). The linear head is
fitted on v with scikit-learn's logistic regression (:meth:`MeanTokenHead.fit`), one per finding; with a ``val``
split each finding gets a Platt calibration on it. The plugin keeps the zero query, so at prediction time the head
sees exactly what it was fitted on, and a zero LoRA (B = 0: the backbone used as trained) per view, so the plugin
file has the same members as every other kind.

Manifest: a CSV with an ``image`` column (paths relative to the manifest), one 0/1 column per finding and an optional
``split`` column (train / val / test; missing: train). Every row is checked before any image is read. A minimal
reader is written here (the full trainer's data module is not on main yet).
"""
from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from anymc3d.backbone import load_backbone
from anymc3d.lora import LoraSettings, adapter_state, add_adapter, remove_adapter
from anymc3d.model import AnyMC3DModel
from anymc3d.planecycle.config import PlaneCycleConfig
from anymc3d.planecycle.head import MeanTokenHead
from anymc3d.plugin import PluginConfig, TaskPlugin, save_plugin
from anymc3d.image_reading import read_image
from anymc3d.preprocess_config import PreprocessConfig
from anymc3d.preprocessing import prepare

logger = logging.getLogger(__name__)

KIND = "planecycle_linear"
SPLITS = ("train", "val", "test")
_RESERVED = ("image", "split")


@dataclass
class Manifest:
    """The rows of a labelled manifest: absolute image paths, (N, K) 0/1 labels, split per row."""

    path: Path
    images: list[Path]
    labels: list[str]
    targets: np.ndarray
    splits: list[str]

    def rows(self, split: str) -> np.ndarray:
        return np.array([i for i, s in enumerate(self.splits) if s == split], dtype=int)


def read_manifest(path: Path | str, labels: Sequence[str] | None = None) -> Manifest:
    """Read and check a manifest; ValueError naming the file and row (1 = the header) of the first problems."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: cannot read the manifest ({exc})") from None
    if "image" not in header:
        raise ValueError(f"{path}: the manifest needs an 'image' column (has {header})")
    labels = list(labels) if labels else [c for c in header if c not in _RESERVED]
    missing = [c for c in labels if c not in header]
    if not labels or missing:
        raise ValueError(f"{path}: label columns {missing or '(none)'} are not in the header {header}")
    problems, images, targets, splits = [], [], [], []
    for row_number, row in enumerate(rows, start=2):
        image = (row.get("image") or "").strip()
        where = path.parent / image
        if not image:
            problems.append(f"row {row_number}: empty image")
        elif not where.exists():
            problems.append(f"row {row_number}: image {image} not found")
        split = (row.get("split") or "train").strip() or "train"
        if split not in SPLITS:
            problems.append(f"row {row_number}: split must be one of {SPLITS}, got {split!r}")
        values = []
        for label in labels:
            text = (row.get(label) or "").strip()
            if text not in ("0", "1"):
                problems.append(f"row {row_number}: {label} must be 0 or 1, got {text!r}")
            values.append(1 if text == "1" else 0)
        images.append(where.resolve())
        targets.append(values)
        splits.append(split)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"{path}: " + "; ".join(problems[:5]) + more)
    targets = np.asarray(targets, dtype=int).reshape(len(rows), len(labels))
    train = np.array([s == "train" for s in splits])
    for k, label in enumerate(labels):
        if len(set(targets[train, k])) < 2:
            raise ValueError(f"{path}: label {label} needs both 0 and 1 among the train rows")
    return Manifest(path=path, images=images, labels=labels, targets=targets, splits=splits)


@torch.inference_mode()
def lifted_embeddings(model: AnyMC3DModel, images: Sequence[Path], recipe: PreprocessConfig,
                      device: torch.device) -> np.ndarray:
    """(N, C) case embeddings v (with the zero query: the mean lifted patch token) of each image, computed once."""
    rows = []
    for i, image_path in enumerate(images):
        slices, _ = prepare(read_image(image_path), recipe, image_path)  # (S, M, M)
        rows.append(model([slices[None].to(device)]).pooled[0].float().cpu().numpy())
        logger.info("lifted features %d/%d: %s", i + 1, len(images), image_path.name)
    return np.stack(rows).astype(np.float64)


def platt(logits: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """Platt scaling (a, b) of one finding's logits on a held-out split; (1, 0) when it cannot be fitted."""
    from sklearn.linear_model import LogisticRegression

    if len(set(targets)) < 2:
        logger.warning("Platt calibration skipped: the val split has one class only")
        return 1.0, 0.0
    fitted = LogisticRegression(C=1e4, max_iter=2000).fit(logits.reshape(-1, 1), targets)
    a, b = float(fitted.coef_[0, 0]), float(fitted.intercept_[0])
    if not (a > 0 and math.isfinite(b)):
        logger.warning("Platt calibration skipped: fitted slope %.3g is not positive", a)
        return 1.0, 0.0
    return a, b


def _auroc(scores: np.ndarray, targets: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(targets, scores)) if len(set(targets)) == 2 else None


@dataclass
class FitResult:
    """What fitting gave: the plugin path and per-split, per-label AUROC (None where a split has one class)."""

    path: Path
    counts: dict[str, int]
    auroc: dict[str, dict[str, float | None]] = field(default_factory=dict)


def fit_lifted(manifest: Path | str, backbone: Path | str, out: Path | str, *, labels: Sequence[str] | None = None,
               variant: str = "pcg", cycle: Sequence[str] | str = ("HW", "DW", "DH", "HW"),
               input_size: int | None = None, device: str = "cpu", c: float = 1.0,
               name: str | None = None) -> FitResult:
    """Fit and save a ``planecycle_linear`` plugin (see the module docstring); ValueError for bad input."""
    data = read_manifest(manifest, labels)
    lifting = PlaneCycleConfig(variant=variant, cycle=cycle)
    loaded = load_backbone(backbone)
    recipe = PreprocessConfig(input_size=input_size or loaded.spec.img_size)
    if recipe.input_size % loaded.spec.patch_size:
        raise ValueError(f"input_size: {recipe.input_size} is not a multiple of the patch size {loaded.spec.patch_size}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for, but no CUDA GPU is available")
    device = torch.device(device)
    vit = loaded.model.to(device).eval().requires_grad_(False)
    head = TaskPlugin(vit.embed_dim, len(data.labels))
    with torch.no_grad():
        head.task_pool.query.zero_()  # uniform a_s: v = mean of all lifted patch tokens
    model = AnyMC3DModel(vit, head.to(device), [None], kind=KIND, **lifting.to_dict())
    features = lifted_embeddings(model, data.images, recipe, device)  # (N, C)

    train = data.rows("train")
    fitted = MeanTokenHead(vit.embed_dim, len(data.labels)).fit(features[train], data.targets[train], c=c)
    with torch.no_grad():
        head.head.weight.copy_(fitted.head.weight)
        head.head.bias.copy_(fitted.head.bias)
    logits = features @ fitted.head.weight.detach().double().numpy().T + fitted.head.bias.detach().double().numpy()
    val = data.rows("val")
    calibration = [platt(logits[val, k], data.targets[val, k]) if len(val) else (1.0, 0.0)
                   for k in range(len(data.labels))]

    lora = LoraSettings()
    add_adapter(vit, "lifted_zero", lora)  # B = 0: the backbone as trained ("training-free")
    zero_lora = adapter_state(vit, "lifted_zero")
    remove_adapter(vit, "lifted_zero")
    out = Path(out)
    config = PluginConfig(
        name=name or out.stem.split(".")[0], labels=data.labels, task="multilabel", backbone=loaded.spec,
        backbone_fingerprint=loaded.fingerprint, preprocessing=[recipe], lora=lora, kind=KIND,
        encoder=lifting.to_dict(), calibration_a=[a for a, _ in calibration],
        calibration_b=[b for _, b in calibration],
        description=(f"Lifted-feature plugin: PlaneCycle ({lifting.variant}, {','.join(lifting.cycle)}) mean "
                     f"patch token, logistic regression on {len(train)} cases of {data.path.name}"),
    )
    save_plugin(out, config, head.cpu(), [zero_lora])
    counts = {s: len(data.rows(s)) for s in SPLITS}
    auroc = {s: {label: _auroc(logits[data.rows(s), k], data.targets[data.rows(s), k])
                 for k, label in enumerate(data.labels)} for s in SPLITS if counts[s]}
    return FitResult(path=out, counts=counts, auroc=auroc)

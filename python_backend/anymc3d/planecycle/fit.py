"""``anymc3d fit-lifted``: a lifted-feature plugin (kind ``planecycle_linear``) fitted on a labelled manifest.

The backbone stays frozen and lifted (PlaneCycle, no gradients): each case's slice embeddings h_s (mean lifted patch
token of slice s) are computed once through :class:`anymc3d.model.AnyMC3DModel` with a zero task query, so the
pooled case embedding v is the plain mean of all the volume's lifted patch tokens (uniform a_s). The linear head is
fitted on v with scikit-learn's logistic regression (:meth:`MeanTokenHead.fit`), one per finding; with a ``val``
split the findings are calibrated on it as a trained plugin's are (:func:`anymc3d.calibration.calibrate`: Platt's
regularised targets, probability 0.5 at the F1-optimal raw score). The plugin keeps the zero query, so at prediction
time the head sees exactly what it was fitted on, and a zero LoRA (B = 0: the backbone used as trained) per view, so
the plugin file has the same members as every other kind.

Manifest: the one format of :func:`anymc3d.data.load_manifest`, single view (an ``image`` column), one 0/1 column per
finding, an optional ``split`` column (train / val / test; without it every row is a train row). Every row and image
is checked before any feature is computed.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from anymc3d.backbone import load_backbone
from anymc3d.calibration import Calibration, calibrate
from anymc3d.data import SPLITS, Manifest, ManifestError, load_manifest, with_splits
from anymc3d.evaluation import auroc
from anymc3d.lora import LoraSettings, adapter_state, add_adapter, remove_adapter
from anymc3d.model import AnyMC3DModel
from anymc3d.planecycle.config import PlaneCycleConfig
from anymc3d.planecycle.head import MeanTokenHead
from anymc3d.plugin import PluginConfig, TaskHead, save_plugin
from anymc3d.preprocess_config import PreprocessConfig
from anymc3d.preprocessing import prepare

logger = logging.getLogger(__name__)

KIND = "planecycle_linear"


def _lifted_manifest(path: Path | str, labels: Sequence[str] | None = None) -> Manifest:
    """A checked single-view, multi-label manifest with a split on every row (train where it has no split column);
    :class:`ManifestError` lists every problem, each naming its line."""
    manifest = load_manifest(path, labels=labels, task="multilabel")
    if len(manifest.views) != 1:
        raise ManifestError(manifest.path, [f"fit-lifted takes one view (an 'image' column), got {manifest.views}"])
    return with_splits(manifest, {c.row: c.split or "train" for c in manifest.cases})


def _rows(manifest: Manifest, split: str) -> np.ndarray:
    return np.array([i for i, c in enumerate(manifest.cases) if c.split == split], dtype=int)


@torch.inference_mode()
def lifted_embeddings(model: AnyMC3DModel, manifest: Manifest, recipe: PreprocessConfig,
                      device: torch.device) -> np.ndarray:
    """(N, C) case embeddings v (with the zero query: the mean lifted patch token) of each case, computed once."""
    rows = []
    for i, case in enumerate(manifest.cases):
        image_path = case.images[0]
        slices, _ = prepare(manifest.image(image_path), recipe, image_path)  # (S, M, M)
        rows.append(model([slices[None].to(device)]).pooled[0].float().cpu().numpy())
        logger.info("lifted features %d/%d: %s", i + 1, len(manifest.cases), image_path.name)
    return np.stack(rows).astype(np.float64)


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
    data = _lifted_manifest(manifest, labels)
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
    head = TaskHead(vit.embed_dim, len(data.labels))
    with torch.no_grad():
        head.task_pool.query.zero_()  # uniform a_s: v = mean of all lifted patch tokens
    model = AnyMC3DModel(vit, head.to(device), [None], kind=KIND, **lifting.to_dict())
    features = lifted_embeddings(model, data, recipe, device)  # (N, C)
    targets = data.targets(data.cases).astype(int)  # (N, K) 0/1

    train = _rows(data, "train")
    fitted = MeanTokenHead(vit.embed_dim, len(data.labels)).fit(features[train], targets[train], c=c)
    with torch.no_grad():
        head.head.weight.copy_(fitted.head.weight)
        head.head.bias.copy_(fitted.head.bias)
    logits = features @ fitted.head.weight.detach().double().numpy().T + fitted.head.bias.detach().double().numpy()
    val = _rows(data, "val")
    n = len(data.labels)
    cal = calibrate(logits[val], targets[val], "multilabel") if len(val) else Calibration([1.0] * n, [0.0] * n,
                                                                                          [0.5] * n, [0.0] * n)

    lora = LoraSettings()
    add_adapter(vit, "lifted_zero", lora)  # B = 0: the backbone as trained ("training-free")
    zero_lora = adapter_state(vit, "lifted_zero")
    remove_adapter(vit, "lifted_zero")
    out = Path(out)
    config = PluginConfig(
        name=name or out.stem.split(".")[0], labels=data.labels, task="multilabel", backbone=loaded.spec,
        backbone_fingerprint=loaded.fingerprint, preprocessing=[recipe], lora=lora, kind=KIND,
        encoder=lifting.to_dict(), calibration_a=cal.a, calibration_b=cal.b, thresholds=cal.thresholds,
        description=(f"Lifted-feature plugin: PlaneCycle ({lifting.variant}, {','.join(lifting.cycle)}) mean "
                     f"patch token, logistic regression on {len(train)} cases of {data.path.name}"),
    )
    save_plugin(out, config, head.cpu(), [zero_lora])
    counts = {s: len(_rows(data, s)) for s in SPLITS}
    per_split = {s: {label: auroc(targets[_rows(data, s), k], logits[_rows(data, s), k])
                 for k, label in enumerate(data.labels)} for s in SPLITS if counts[s]}
    return FitResult(path=out, counts=counts, auroc=per_split)

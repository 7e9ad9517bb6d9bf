"""``anymc3d eval``: a plugin's (or an ensemble's) calibrated probabilities on a manifest's cases and the
metrics report, with thresholds from validation, never from the evaluated cases."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from anymc3d.backbone import LoadedBackbone, load_backbone, spec_from_file
from anymc3d.data import Manifest, load_manifest, prepare_case
from anymc3d.evaluation import one_hot
from anymc3d.lora import add_adapter, remove_adapter
from anymc3d.model import AnyMC3DModel
from anymc3d.plugin import calibrated_logits, ensemble_members, probabilities
from anymc3d.training.batching import collate
from anymc3d.training.config import TrainingError


@torch.no_grad()
def predict_manifest(manifest: Manifest, cases, backbone: LoadedBackbone, plugins, device: str = "cpu",
                     chunk_size: int = 32, precision: str = "fp32") -> np.ndarray:
    """Calibrated probabilities (N, K) of ``cases`` under one plugin, or the mean calibrated logit of an
    ensemble (as ``predict --ensemble``), through :class:`AnyMC3DModel`; the backbone in ``precision``
    (:func:`anymc3d.device.resolve_precision`; cast in place), head and probabilities in fp32."""
    from anymc3d.device import resolve_precision
    from anymc3d.lora import load_adapter_state

    dev = torch.device(device)
    model = backbone.model.to(dev, resolve_precision(precision, dev))
    total = None
    for k, plugin in enumerate(plugins):
        config = plugin.config
        if config.backbone_fingerprint != backbone.fingerprint:
            raise TrainingError(f"{plugin.path}: plugin was trained on another backbone (weights "
                                f"{config.backbone_fingerprint[:12]} vs {backbone.fingerprint[:12]})")
        adapters = [f"_eval{k}_{v}" for v in range(len(config.views))]
        for name, state in zip(adapters, plugin.lora):
            add_adapter(model, name, config.lora)
            load_adapter_state(model, name, state)
        model.to(dtype=next(model.parameters()).dtype)  # the new adapters in the backbone's precision
        head = plugin.head.to(dev).eval()
        net = AnyMC3DModel(model, head, adapters, kind=config.kind, chunk_size=chunk_size)
        rows = []
        try:
            for case in cases:
                item = prepare_case(manifest, case, config.preprocessing)
                views, masks, _ = collate([item], len(adapters))
                out = net([v.to(dev) for v in views], masks=[m.to(dev) for m in masks])
                rows.append(calibrated_logits(out.logits.float(), config).cpu())
        finally:
            for name in adapters:
                remove_adapter(model, name)
        z = torch.cat(rows)
        total = z if total is None else total + z
    # float64: a float32 sigmoid is exactly 1.0 above ~17, and tied scores would cost the metrics their ranking
    return probabilities(total.double() / len(plugins), plugins[0].config.task).numpy()


def evaluate_plugin(manifest_path: Path | str, backbone: Path | str | LoadedBackbone, plugin: Path | str,
                    out: Path | str, device: str = "cpu", bootstrap: int = 1000, precision: str = "fp32") -> dict:
    """``anymc3d eval``: metrics of a plugin (or ``--folds`` ensemble folder) on a manifest's test split
    (every case when the manifest has no test split); Youden thresholds from validation (the plugin's
    training summary, or the manifest's val split), never from the evaluated cases."""
    from anymc3d.device import precision_name
    from anymc3d.evaluation import evaluate, write_report
    from anymc3d.plugin import load_plugin, read_training_summary

    members = ensemble_members(Path(plugin))
    plugins = [load_plugin(p) for p in members]
    config = plugins[0].config
    task = config.task
    labels = None if task == "multiclass" else list(config.labels)
    manifest = load_manifest(manifest_path, labels=labels, task=task)
    if manifest.labels != list(config.labels):
        raise TrainingError(f"{manifest_path}: labels {manifest.labels} differ from the plugin's {config.labels}")
    if not isinstance(backbone, LoadedBackbone):
        backbone = load_backbone(backbone, spec_from_file(backbone) or config.backbone)
    cases = manifest.subset("test") or ([] if any(c.split for c in manifest.cases) else manifest.cases)
    if not cases:
        raise TrainingError(f"{manifest_path}: the split column has no test cases to evaluate")
    probs = predict_manifest(manifest, cases, backbone, plugins, device, precision=precision)
    y = manifest.targets(cases)
    val_cases = manifest.subset("val")
    val_y = val_p = None
    if val_cases:
        val_y, val_p = (manifest.targets(val_cases),
                        predict_manifest(manifest, val_cases, backbone, plugins, device, precision=precision))
    metrics = evaluate(y, probs, config.labels, config.thresholds, val_y, val_p, bootstrap=bootstrap)
    summaries = [read_training_summary(p) for p in members]
    if val_cases is None or not val_cases:
        stored = [s.get("youden_thresholds_validation") if s else None for s in summaries]
        if len(plugins) == 1 and stored[0]:
            from anymc3d.evaluation import at_threshold

            yk = one_hot(y, probs.shape[1])
            for k, label in enumerate(config.labels):
                t = stored[0][k]
                metrics["per_label"][label]["youden_threshold_from_validation"] = t
                metrics["per_label"][label]["at_youden"] = None if t is None else at_threshold(yk[:, k], probs[:, k], t)
    metrics.update({"plugin": [str(p) for p in members], "manifest": str(manifest.path),
                    "manifest_sha256": manifest.sha256, "evaluated_split": "test" if manifest.subset("test") else "all",
                    "precision": precision_name(next(backbone.model.parameters()).dtype)})
    write_report(metrics, y, probs, Path(out))
    return metrics

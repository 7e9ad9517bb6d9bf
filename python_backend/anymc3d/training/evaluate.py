"""``anymc3d eval``: a plugin's (or an ensemble's) calibrated probabilities on a manifest's cases and the
metrics report, with thresholds from validation, never from the evaluated cases."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

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


def _volumes(cases, desc: str):
    """``cases`` with a bar on stderr, one tick per volume, so that a long pass shows progress within seconds."""
    import sys

    from tqdm import tqdm

    return tqdm(cases, desc=desc, unit="volume", file=sys.stderr, leave=False, mininterval=1.0)


@torch.no_grad()
def predict_manifest(manifest: Manifest, cases, backbone: LoadedBackbone, plugins, device: str = "cpu",
                     chunk_size: int = 32, precision: str = "fp32") -> np.ndarray:
    """Calibrated probabilities (N, K) of ``cases`` under one plugin, or the mean calibrated logit of an
    ensemble (as ``predict --ensemble``), through :class:`AnyMC3DModel`; the backbone in ``precision``
    (:func:`anymc3d.device.resolve_precision`; cast in place), head and probabilities in fp32."""
    from anymc3d.device import place_backbone, resolve_precision
    from anymc3d.lora import load_adapter_state

    dev = torch.device(device)
    dtype = resolve_precision(precision, dev)
    model = place_backbone(backbone.model, dev, dtype)
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
        place_backbone(model, dev, dtype)  # the new adapters in the backbone's precision
        head = plugin.head.to(dev).eval()
        net = AnyMC3DModel(model, head, adapters, kind=config.kind, chunk_size=chunk_size)
        rows = []
        try:
            for case in _volumes(cases, f"eval, plugin {k + 1} of {len(plugins)}"):
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


def localisation_report(manifest: Manifest, cases, backbone: LoadedBackbone, plugin_path: Path,
                        methods: Optional[Sequence[str]] = None, device: str = "cpu", deletion: bool = True) -> dict:
    """Whether the plugin's heatmaps point at the finding, per method (``anymc3d.localisation``), on the
    evaluated cases that have a lesion mask and a positive label (the map of that label is measured; the mask's
    finding is the first positive label of a multi-label case). ``methods``: default every method of the kind."""
    import logging

    from anymc3d.engine import Engine
    from anymc3d.localisation import measure_case, slice_space_spacing, summarise
    from anymc3d.preprocessing import PreprocessConfig, prepare

    log = logging.getLogger(__name__)
    engine = Engine(backbone, device=device)
    name = engine.add_plugin(plugin_path)
    config = engine.plugins[name].plugin.config
    methods = list(methods or engine.plugins[name].model.encoder.heatmap_methods)
    per_case = []
    with_mask = [c for c in cases if c.mask is not None and np.asarray(c.target).any()]
    try:
        for i, case in enumerate(with_mask):
            target = np.asarray(case.target)
            label = config.labels[int(target) if target.ndim == 0 else int(np.flatnonzero(target)[0])]
            views, geometries = zip(*(prepare(manifest.image(p), r, source=p)
                                      for p, r in zip(case.images, config.preprocessing)))
            recipe = PreprocessConfig(**{**config.preprocessing[0].to_dict(), "intensity": "none"})
            lesion = (prepare(manifest.image(case.mask), recipe, source=case.mask)[0] > 0.5).numpy()
            if not lesion.any():
                continue
            spacing = slice_space_spacing(geometries[0], lesion.shape)
            entry = measure_case(engine, name, list(views), lesion, spacing, methods, label, deletion)
            per_case.append({"image": str(case.images[0]), "label": label, "methods": entry})
            log.info("localisation %d/%d: %s %s", i + 1, len(with_mask), case.images[0].name,
                     " ".join(f"{m}={'hit' if e['hit'] else 'miss'}" for m, e in entry.items()))
    finally:
        engine.remove_plugin(name)
    return {"cases": len(per_case), "methods": {m: summarise([c["methods"][m] for c in per_case]) for m in methods},
            "per_case": per_case,
            "measures": "hit: the map's maximum within one patch of the lesion; mass share of the lesion against its "
                        "volume share (1x = a uniform map); deletion area: mean probability as the top-ranked 0-10 % "
                        "of voxels are set to the case's median (lower: the map found the evidence)"}


def evaluate_plugin(manifest_path: Path | str, backbone: Path | str | LoadedBackbone, plugin: Path | str,
                    out: Path | str, device: str = "cpu", bootstrap: int = 1000,
                    heatmap_methods: Optional[Sequence[str]] = None, localisation: bool = True,
                    record: Optional[str] = None, precision: str = "fp32", record_evaluation: bool = False) -> dict:
    """``anymc3d eval``: metrics of a plugin (or ``--folds`` ensemble folder) on a manifest's test split
    (every case when the manifest has no test split); Youden thresholds from validation (the plugin's
    training summary, or the manifest's val split), never from the evaluated cases.

    With a mask column, also whether each heatmap method points at the lesion (:func:`localisation_report`, one
    plugin only); ``record`` (a description of the task) writes the result into the plugin's model card, so that
    ``--heatmap-method auto`` opens its best method. ``record_evaluation`` writes the metrics' summary
    (:func:`anymc3d.evaluation.evaluation_card`) into the plugin's model card, so that the plugin file carries its
    held-out evaluation (one plugin only); both in one atomic rewrite of the plugin, after the report is written."""
    from anymc3d.device import backbone_dtype, precision_name
    from anymc3d.evaluation import evaluate, write_report
    from anymc3d.plugin import load_plugin

    members = ensemble_members(Path(plugin))
    if record_evaluation and len(members) != 1:
        raise TrainingError(f"{plugin}: --record-evaluation records one plugin's evaluation, not an ensemble's")
    plugins = [load_plugin(p) for p in members]
    config = plugins[0].config
    manifest = _plugin_manifest(manifest_path, config)
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
    if not val_cases:
        _stored_youden(metrics, members, config.labels, y, probs)
    metrics.update({"plugin": [str(p) for p in members], "manifest": str(manifest.path),
                    "manifest_sha256": manifest.sha256, "evaluated_split": "test" if manifest.subset("test") else "all",
                    "precision": precision_name(backbone_dtype(backbone.model))})
    if localisation and len(plugins) == 1 and any(c.mask is not None for c in cases):
        metrics["localisation"] = localisation_report(manifest, cases, backbone, members[0], heatmap_methods, device)
    write_report(metrics, y, probs, Path(out))
    _record_card(members[0], metrics, record, record_evaluation, bootstrap)
    return metrics


def _plugin_manifest(manifest_path: Path | str, config) -> Manifest:
    """The manifest read for the plugin's task; TrainingError naming it when its labels are not the plugin's."""
    labels = None if config.task == "multiclass" else list(config.labels)
    manifest = load_manifest(manifest_path, labels=labels, task=config.task)
    if manifest.labels != list(config.labels):
        raise TrainingError(f"{manifest_path}: labels {manifest.labels} differ from the plugin's {config.labels}")
    return manifest


def _record_card(plugin: Path, metrics: dict, record: Optional[str], record_evaluation: bool, bootstrap: int) -> None:
    """Into the plugin's model card: with ``record`` (a description of the task) the measured localisation, with
    ``record_evaluation`` the held-out evaluation; one rewrite of the plugin."""
    from anymc3d.evaluation import evaluation_card
    from anymc3d.localisation import model_card
    from anymc3d.plugin import record_card

    entries = {}
    localisation = metrics.get("localisation")
    if record and localisation and localisation["cases"]:
        entries["localisation"] = model_card(localisation["methods"], record)
    if record_evaluation:
        entries["evaluation"] = evaluation_card(metrics, bootstrap)
    if entries:
        record_card(plugin, **entries)


def _stored_youden(metrics: dict, members: list, labels, y: np.ndarray, probs: np.ndarray) -> None:
    """Without a val split: a single plugin's Youden thresholds stored from its training's validation, and the
    metrics at them, added per label."""
    from anymc3d.evaluation import at_threshold
    from anymc3d.plugin import read_training_summary

    summaries = [read_training_summary(p) for p in members]
    stored = [s.get("youden_thresholds_validation") if s else None for s in summaries]
    if len(members) == 1 and stored[0]:
        yk = one_hot(y, probs.shape[1])
        for k, label in enumerate(labels):
            t = stored[0][k]
            metrics["per_label"][label]["youden_threshold_from_validation"] = t
            metrics["per_label"][label]["at_youden"] = None if t is None else at_threshold(yk[:, k], probs[:, k], t)

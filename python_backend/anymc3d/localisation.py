"""Whether a heatmap points at the finding: the pointing game, the map's mass on the lesion and a deletion curve.

Every measure takes the map and the lesion mask on one voxel grid (the model's slice space, where ``anymc3d eval``
prepares both with the plugin's own recipe), with that grid's voxel spacing in mm:

* **pointing game**: the map's maximum lies inside the lesion, or within ``tolerance_mm`` (one patch) of it;
* **mass share**: the map's mass (negative values count as 0) inside the lesion, against the lesion's share of
  the voxels: a uniform map scores exactly the volume share, so ``mass_ratio`` 1 is chance;
* **deletion curve**: the finding's probability as the map's top-ranked voxels are replaced by the case's median,
  and the curve's area over the deleted fraction (lower: the map found what the decision rests on).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np
from scipy import ndimage

#: deleted fractions of the deletion curve (area by the trapezoid rule over [0, max])
DELETION_FRACTIONS = (0.0, 0.02, 0.05, 0.1)


def upsample(heatmap: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A map on a coarser grid (e.g. patches) onto ``shape`` by nearest neighbour: each patch value covers its
    pixels exactly, so no mass moves between patches."""
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if heatmap.shape == tuple(shape):
        return heatmap
    index = [np.minimum((np.arange(n) * heatmap.shape[a]) // n, heatmap.shape[a] - 1) for a, n in enumerate(shape)]
    return heatmap[np.ix_(*index)]


def slice_space_spacing(geometry, shape: Sequence[int]) -> tuple[float, float, float]:
    """mm per voxel of an (S, H, W) slice-space array prepared with ``geometry`` (a ``SliceGeometry``)."""
    oriented = [geometry.spacing[i] * geometry.oriented_size[k] for k, i in enumerate(geometry.axis_map)]  # extent
    numpy_axes = [2, 1, 0]  # oriented IJK axis k is numpy axis 2 - k
    first = numpy_axes[geometry.oriented_slice_axis]
    order = [first] + [a for a in (0, 1, 2) if a != first]
    extents = [oriented[2 - a] for a in order]
    return tuple(float(e / n) for e, n in zip(extents, shape))


@dataclass
class Localisation:
    """One map on one case with a lesion."""

    hit: bool                 # maximum inside the lesion or within the tolerance
    distance_mm: float        # from the maximum to the nearest lesion voxel (0 inside)
    mass_share: float         # the map's (non-negative) mass inside the lesion / its total mass
    volume_share: float       # lesion voxels / all voxels: what a uniform map scores
    mass_ratio: float         # mass_share / volume_share (1: no better than uniform)

    def to_dict(self) -> dict:
        return asdict(self)


def localise(heatmap: np.ndarray, lesion: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
             tolerance_mm: float = 0.0) -> Localisation:
    """Pointing game and mass share of ``heatmap`` (any grid that divides into ``lesion``'s) for one lesion."""
    lesion = np.asarray(lesion) > 0
    if not lesion.any():
        raise ValueError("the lesion mask is empty: localisation needs a case with a lesion")
    values = np.clip(upsample(heatmap, lesion.shape), 0.0, None)
    peak = np.unravel_index(int(np.argmax(values)), values.shape)
    distance = float(ndimage.distance_transform_edt(~lesion, sampling=spacing)[peak])
    total = float(values.sum())
    mass = float(values[lesion].sum() / total) if total > 0 else 0.0
    volume = float(lesion.mean())
    return Localisation(hit=bool(total > 0 and distance <= tolerance_mm), distance_mm=distance, mass_share=mass,
                        volume_share=volume, mass_ratio=mass / volume)


def deletion_curve(predict: Callable[[np.ndarray], float], volume: np.ndarray, heatmap: np.ndarray,
                   fractions: Sequence[float] = DELETION_FRACTIONS, fill: Optional[float] = None
                   ) -> tuple[list[float], float]:
    """The probability ``predict(volume')`` as the top ``fractions`` of voxels by ``heatmap`` are set to ``fill``
    (default: the volume's median), and the curve's area by the trapezoid rule, divided by the largest fraction
    (a mean probability over the curve). Ties in the map are broken by voxel order (stable sort)."""
    volume = np.asarray(volume)
    fill = float(np.median(volume)) if fill is None else float(fill)
    order = np.argsort(-upsample(heatmap, volume.shape).ravel(), kind="stable")
    probs = []
    for f in fractions:
        deleted = volume.copy().ravel()
        deleted[order[:int(round(f * deleted.size))]] = fill
        probs.append(float(predict(deleted.reshape(volume.shape))))
    x = np.asarray(fractions, dtype=np.float64)
    y = np.asarray(probs)
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / (x[-1] - x[0])) if len(x) > 1 else probs[0]
    return probs, area


def summarise(per_case: Sequence[dict]) -> dict:
    """Per-method summary of per-case entries (``Localisation.to_dict()`` plus optional ``deletion_area``)."""
    if not per_case:
        return {"cases": 0}
    out = {"cases": len(per_case), "hit_rate": float(np.mean([c["hit"] for c in per_case])),
           "median_distance_mm": float(np.median([c["distance_mm"] for c in per_case])),
           "mean_mass_share": float(np.mean([c["mass_share"] for c in per_case])),
           "mean_volume_share": float(np.mean([c["volume_share"] for c in per_case])),
           "median_mass_ratio": float(np.median([c["mass_ratio"] for c in per_case]))}
    out["mass_over_volume_share"] = out["mean_mass_share"] / out["mean_volume_share"]
    areas = [c["deletion_area"] for c in per_case if c.get("deletion_area") is not None]
    if areas:
        out["mean_deletion_area"] = float(np.mean(areas))
    return out


def measure_case(engine, plugin: str, views: Sequence, lesion: np.ndarray, spacing: Sequence[float],
                 methods: Sequence[str], label: Optional[str] = None, deletion: bool = True,
                 fractions: Sequence[float] = DELETION_FRACTIONS) -> dict[str, dict]:
    """Localisation of each heatmap method of an attached plugin on one case with a lesion.

    Args:
        engine: an :class:`~anymc3d.engine.Engine` with ``plugin`` attached.
        views: the case's preprocessed slices, one (S_v, M, M) tensor per view (the plugin's own recipe).
        lesion: (S, M, M) lesion mask of view 0 in the same slice space.
        spacing: mm per voxel of that space (:func:`slice_space_spacing`); the pointing game's tolerance is one
            patch: the backbone's patch size times the larger in-plane spacing.
        label: the finding whose map is measured (default: the plugin's first label).
    """
    import torch

    config = engine.plugins[plugin].plugin.config
    label = label or config.labels[0]
    k = config.labels.index(label)
    tolerance = engine.backbone.spec.patch_size * max(spacing[1:])

    def probability(volume: np.ndarray) -> float:
        slices = [torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)), *views[1:]]
        return float(engine.predict_slices(slices, plugin).probabilities[k])

    out = {}
    for method in methods:
        pred = engine.predict_slices(list(views), plugin, heatmap=method)
        heat = pred.finding_heatmaps[label] if pred.finding_heatmaps else pred.heatmap
        entry = localise(heat, lesion, spacing, tolerance).to_dict()
        entry["probability"] = float(pred.probabilities[k])
        if deletion:
            entry["deletion_curve"], entry["deletion_area"] = deletion_curve(
                probability, np.asarray(views[0]), heat, fractions)
        out[method] = entry
    return out


#: what a plugin's model card keeps of each method's summary
CARD_KEYS = ("cases", "hit_rate", "mass_over_volume_share", "median_distance_mm", "mean_deletion_area")


def model_card(summaries: dict[str, dict], task: str) -> dict:
    """The ``localisation`` entry of a plugin's model card from per-method :func:`summarise` results: the
    best method has the highest hit rate, then the highest mass over volume share."""
    measured = {m: {k: s[k] for k in CARD_KEYS if k in s} for m, s in summaries.items() if s.get("cases")}
    if not measured:
        raise ValueError("no method was measured on a case with a lesion")
    best = max(measured, key=lambda m: (measured[m]["hit_rate"], measured[m]["mass_over_volume_share"]))
    return {"task": task, "measured": measured, "best": best}

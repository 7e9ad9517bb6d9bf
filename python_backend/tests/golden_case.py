"""The fixed case whose outputs were saved from the engine before the model-module refactor
(tests/data/golden_engine.npz, written by ``python tests/golden_case.py`` at commit becc5d1's engine).

Deterministic: load-bearing backbones from a seed, a random plugin from a seed, a synthetic CT volume from
a seed. test_golden.py recomputes every output with today's code and compares at fp32 tolerance.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from anymc3d.backbone import BackboneSpec, LoadedBackbone, create_backbone, fingerprint, make_load_bearing
from anymc3d.demo import random_plugin
from anymc3d.plugin import LoadedPlugin, TaskHead
from anymc3d.synthetic import make_ct_volume

GOLDEN = Path(__file__).parent / "data" / "golden_engine.npz"
SPECS = {
    "dinov2": BackboneSpec("dinov2_vits14_reg", img_size=56, depth=3, embed_dim=96, num_heads=3),
    "dinov3": BackboneSpec("dinov3_vits16", img_size=64, depth=3, embed_dim=96, num_heads=3),
}
METHODS = ("attention", "rollout", "grad_rollout", "grad_last")


def golden_backbone(family: str) -> LoadedBackbone:
    spec = SPECS[family]
    model = make_load_bearing(create_backbone(spec), seed=3)
    return LoadedBackbone(model=model, spec=spec, fingerprint=fingerprint(model))


def golden_plugin(backbone: LoadedBackbone, views: int = 1) -> LoadedPlugin:
    names = ("image", "second")[:views]
    config, head, lora = random_plugin(backbone.model, backbone.spec, views=names, seed=5)
    fresh = TaskHead(head.embed_dim, head.num_classes, head.num_views)
    fresh.load_state_dict(head.state_dict())
    return LoadedPlugin(config=config, head=fresh, lora=lora)


def golden_volumes():
    first = make_ct_volume(size=(48, 40, 11), spacing=(0.9, 0.9, 2.0), lesion=True, seed=2)
    second = make_ct_volume(size=(40, 44, 9), spacing=(1.0, 1.0, 3.0), lesion=False, seed=4)
    return first, second


def compute(engine_factory) -> dict[str, np.ndarray]:
    """Every output of the fixed cases: probabilities, importance, embeddings and each heatmap method."""
    out: dict[str, np.ndarray] = {}
    first, second = golden_volumes()
    for family in SPECS:
        for views in (1, 2):
            backbone = golden_backbone(family)
            engine = engine_factory(backbone)
            name = engine.add_plugin(golden_plugin(backbone, views))
            images = [first, second][:views]
            for method in METHODS:
                pred = engine.predict_image(images, [name], heatmap=method).predictions[0]
                key = f"{family}_v{views}_{method}"
                out[f"{key}_logits"] = pred.logits
                out[f"{key}_probabilities"] = pred.probabilities
                out[f"{key}_embedding"] = pred.embedding
                for i, a in enumerate(pred.slice_importance):
                    out[f"{key}_importance{i}"] = a
                out[f"{key}_heatmap"] = pred.heatmap
                for label, m in pred.finding_heatmaps.items():
                    out[f"{key}_finding_{label}"] = m
    return out


if __name__ == "__main__":
    from anymc3d.engine import Engine

    torch.set_num_threads(2)
    np.savez_compressed(GOLDEN, **compute(lambda backbone: Engine(backbone, device="cpu", chunk_size=4)))
    print(GOLDEN, GOLDEN.stat().st_size)

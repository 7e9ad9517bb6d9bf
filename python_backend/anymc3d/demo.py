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

"""Shared fixtures: small backbones with load-bearing random weights (never timm's near-identity init)."""
from __future__ import annotations

import pytest
import torch

from anymc3d.backbone import BackboneSpec, LoadedBackbone, create_backbone, fingerprint, make_load_bearing

torch.set_num_threads(min(2, torch.get_num_threads()))

#: a small backbone per family: real DINOv2 / DINOv3 classes, fewer blocks, narrower
SMALL = {
    "dinov2": BackboneSpec("dinov2_vits14_reg", img_size=56, depth=3, embed_dim=96, num_heads=3),
    "dinov3": BackboneSpec("dinov3_vits16", img_size=64, depth=3, embed_dim=96, num_heads=3),
}


def small_backbone(family: str = "dinov2", seed: int = 0) -> LoadedBackbone:
    spec = SMALL[family]
    model = make_load_bearing(create_backbone(spec), seed)
    return LoadedBackbone(model=model, spec=spec, fingerprint=fingerprint(model))


@pytest.fixture(params=sorted(SMALL))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The CLI demo's files (backbone, plugin, volume), written once per session."""
    from anymc3d.demo import write_demo

    folder = tmp_path_factory.mktemp("demo")
    write_demo(folder)
    return folder


def interrupt_at_validation(monkeypatch, count: int):
    """Make the trainer's ``count``-th validation raise KeyboardInterrupt (a run killed mid-training); returns the
    original method, to put back for the resumed run."""
    from anymc3d.training.trainer import Trainer

    original, calls = Trainer._validate, {"n": 0}

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == count:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "_validate", interrupted)
    return original

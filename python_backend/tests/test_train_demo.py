"""The demo that learns: write_trained_demo trains a plugin on the lesion task, predicts a held-out case with a
lesion, and its gradient heatmap peaks on that lesion (seeded, deterministic on CPU)."""
from __future__ import annotations

import json

import pytest
from anymc3d.demo import write_trained_demo
from anymc3d.plugin import read_training_summary


def test_trained_demo_learns_and_points_at_the_lesion(tmp_path):
    report = write_trained_demo(tmp_path)
    print(json.dumps(report))
    assert json.loads((tmp_path / "trained" / "demo.json").read_text(encoding="utf-8")) == report
    assert report["validation_auroc"] >= 0.9
    held = report["heldout"]
    assert held["decision"] and held["probability"] > 0.5
    assert held["heatmap_max_distance_to_lesion_mm"] <= 10.0
    assert read_training_summary(tmp_path / "trained" / "lesion.anymc3d")["splits"]["val"]["cases"] == 9


pytestmark = pytest.mark.slow  # a training loop: left out of the quick tier

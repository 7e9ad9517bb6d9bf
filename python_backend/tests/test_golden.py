"""Refactors leave every output unchanged: the engine today against outputs saved from the engine before
the model-module refactor (tests/golden_case.py), fp32 on CPU."""
from __future__ import annotations

import numpy as np
import pytest

from golden_case import GOLDEN, compute

# Every output is a float32 computation over a few hundred terms: 1e-5 relative plus 1e-6 absolute is
# fp32 noise; any change of method (a different softmax, a lost LoRA, a wrong slice weight) is far above.
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def saved():
    return dict(np.load(GOLDEN))


@pytest.mark.parametrize("chunk_size", [4, 64])
def test_outputs_equal_the_saved_ones(saved, chunk_size):
    from anymc3d.engine import Engine

    now = compute(lambda backbone: Engine(backbone, device="cpu", chunk_size=chunk_size, precision="fp32"))
    assert sorted(now) == sorted(saved)
    for key, value in saved.items():
        np.testing.assert_allclose(now[key], value, rtol=RTOL, atol=ATOL, err_msg=key)


def test_the_saved_outputs_are_not_degenerate(saved):
    """The heatmaps vary across the volume and differ between methods, so the comparison above can fail."""
    for family in ("dinov2", "dinov3"):
        maps = [saved[f"{family}_v1_{m}_heatmap"] for m in ("attention", "rollout", "grad_rollout")]
        for m in maps:
            assert m.std() > 0.05 and m.max() == pytest.approx(1.0)
        assert not np.allclose(maps[0], maps[1], atol=0.05) and not np.allclose(maps[0], maps[2], atol=0.05)
        assert saved[f"{family}_v1_attention_importance0"].std() > 1e-3

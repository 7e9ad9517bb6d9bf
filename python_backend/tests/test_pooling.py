"""Task-query pooling equals a hand-computed softmax, ignores slice order and padding; multi-view pools twice."""
from __future__ import annotations

import numpy as np
import torch

from anymc3d.plugin import TaskHead
from anymc3d.pooling import TaskQueryPool


def test_pooling_equals_hand_computed_softmax():
    pool = TaskQueryPool(16)
    h = torch.randn(2, 7, 16)
    v, a = pool(h)
    hn, q = h.double().numpy(), pool.query.detach().double().numpy()
    scores = hn @ q / np.sqrt(16)
    expected_a = np.exp(scores - scores.max(1, keepdims=True))
    expected_a /= expected_a.sum(1, keepdims=True)
    np.testing.assert_allclose(a.detach().numpy(), expected_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v.detach().numpy(), np.einsum("bs,bsc->bc", expected_a, hn), rtol=1e-5, atol=1e-5)


def test_pooling_is_invariant_to_slice_permutation():
    pool = TaskQueryPool(32)
    torch.nn.init.normal_(pool.query, std=1.0)
    h = torch.randn(1, 20, 32)
    perm = torch.randperm(20)
    v, a = pool(h)
    vp, ap = pool(h[:, perm])
    torch.testing.assert_close(vp, v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ap, a[:, perm])
    assert a.std() > 0  # not a trivially uniform weighting


def test_padding_mask_excludes_padded_slices():
    pool = TaskQueryPool(8)
    h = torch.randn(1, 5, 8)
    padded = torch.cat([h, torch.randn(1, 3, 8) * 100], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    v, a = pool(h)
    vm, am = pool(padded, mask)
    torch.testing.assert_close(vm, v)
    assert torch.all(am[:, 5:] == 0)


def test_multi_view_pools_views_then_the_task_query():
    head = TaskHead(16, 3, num_views=2)
    views = [torch.randn(1, 6, 16), torch.randn(1, 9, 16)]
    logits = head(views)
    v0, a0 = head.view_pools[0](views[0])
    v1, a1 = head.view_pools[1](views[1])
    v, _ = head.task_pool(torch.stack([v0, v1], dim=1))
    torch.testing.assert_close(logits, head.head(v))
    _, importance = head.pool(views)
    assert [t.shape for t in importance] == [(1, 6), (1, 9)]

"""The one chunked forward (anymc3d.device.in_chunks) behind the slice encoders and the slice-wise PlaneCycle
baseline: a CUDA out-of-memory error halves the chunk and redoes it, with the same result as one pass."""
from __future__ import annotations

import torch

from anymc3d.device import in_chunks
from anymc3d.encoders import SliceEncoder
from conftest import small_backbone


def test_in_chunks_retries_at_half_size_without_duplicating_rows():
    sizes = []

    def step(start, stop):
        sizes.append(stop - start)
        if stop - start > 3:
            raise torch.cuda.OutOfMemoryError("simulated")
        return [list(range(start, stop))]

    (chunks,) = in_chunks(10, 8, step)
    assert sum(chunks, []) == list(range(10))
    assert sizes[:2] == [8, 4] and max(sizes[2:]) <= 2


def test_slice_encoder_features_survive_out_of_memory_with_identical_tokens():
    model = small_backbone("dinov2").model.eval()
    volume = torch.randn(1, 6, 3, 56, 56)
    with torch.no_grad():
        expected = SliceEncoder(model, chunk_size=6).features(volume, layers=[1])
        forward = model.forward_intermediates

        def failing(chunk, **kwargs):
            if chunk.shape[0] > 2:
                raise torch.cuda.OutOfMemoryError("simulated")
            return forward(chunk, **kwargs)

        model.forward_intermediates = failing
        got = SliceEncoder(model, chunk_size=6).features(volume, layers=[1])
    torch.testing.assert_close(got.patch_tokens, expected.patch_tokens, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.layers[1][0], expected.layers[1][0], rtol=1e-5, atol=1e-6)

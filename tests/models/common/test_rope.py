"""RoPE frequencies: Llama 3.1 scaling against Meta's formula."""

import pytest
import torch

from lockstep.models.common.rope import Llama3RopeScaling, inverse_frequencies


def test_llama3_rope_scaling_matches_meta_formula():
    import math

    scaling = Llama3RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )
    inv = inverse_frequencies(128, 500000.0, scaling)
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    for got, freq in zip(inv.tolist(), base.tolist(), strict=True):
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4:
            want = freq
        elif wavelen > 8192 / 1:
            want = freq / 8
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            want = (1 - smooth) * freq / 8 + smooth * freq
        assert got == pytest.approx(want, rel=1e-6)

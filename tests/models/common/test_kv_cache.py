"""The KV cache's positions and masks for a left-padded batch (RoPE only sees relative positions, so
a wrong offset would not show in the tokens: it is checked here directly)."""

import pytest
import torch

from lockstep.models.common.kv_cache import KVCache


def test_positions_and_masks_of_a_left_padded_batch():
    cache = KVCache(n_layers=1, pad_B=torch.tensor([2, 0]), max_len=5)
    positions, masks = cache.begin(4)  # the prompts: 2 pads + 2 tokens, and 4 tokens
    assert positions.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    allowed = masks.sdpa_mask[:, 0].int().tolist()
    assert allowed[0] == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]  # pads see only themselves
    assert allowed[1] == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    positions, masks = cache.begin(1)  # one decoding step
    assert positions.tolist() == [[2], [4]]
    assert masks.sdpa_mask[:, 0].int().tolist() == [[[0, 0, 1, 1, 1]], [[1, 1, 1, 1, 1]]]


def test_unpadded_prompt_is_plain_causal_and_the_cache_refuses_overflow():
    cache = KVCache(n_layers=1, pad_B=torch.tensor([0]), max_len=3)
    positions, masks = cache.begin(2)
    assert positions.tolist() == [[0, 1]] and masks.sdpa_mask is None  # SDPA's is_causal, as in training
    k = torch.arange(2.0).view(1, 1, 2, 1)
    keys, values = cache.layers[0].update(k, -k)
    assert keys.flatten().tolist() == [0.0, 1.0] and values.flatten().tolist() == [0.0, -1.0]
    cache.begin(1)
    keys, _ = cache.layers[0].update(torch.full((1, 1, 1, 1), 7.0), torch.zeros(1, 1, 1, 1))
    assert keys.flatten().tolist() == [0.0, 1.0, 7.0]
    with pytest.raises(ValueError, match="holds 3 tokens"):
        cache.begin(1)

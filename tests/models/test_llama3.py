import dataclasses

import pytest
import torch

from lockstep.models.common.init import full_value
from lockstep.models.common.masks import block_causal_mask, document_ids_from_tokens
from lockstep.models.common.rope import Llama3RopeScaling, inverse_frequencies
from lockstep.models.llama3 import LLAMA3_FLAVORS, Llama3
from tests.helpers import tiny_model

VOCAB = 97


def test_changing_a_future_token_leaves_past_logits_unchanged():
    model = tiny_model(VOCAB)
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 20] = (changed[:, 20] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_document_mask_isolates_documents():
    eos = VOCAB - 1
    model = tiny_model(VOCAB)
    tokens = torch.randint(0, VOCAB - 1, (1, 32), generator=torch.Generator().manual_seed(1))
    tokens[0, 11] = eos  # document 0 = positions 0..11, document 1 = 12..31
    changed = tokens.clone()
    changed[0, 3] = (changed[0, 3] + 1) % (VOCAB - 1)  # edit inside document 0
    with torch.no_grad():
        masked = [model(t, model.get_attention_masks(t, eos)) for t in (tokens, changed)]
        unmasked = [model(t) for t in (tokens, changed)]
    assert torch.allclose(masked[0][:, 12:], masked[1][:, 12:], atol=0, rtol=0)  # document 1 cannot see it
    assert not torch.allclose(unmasked[0][:, 12:], unmasked[1][:, 12:])  # without the mask it can
    assert not torch.allclose(masked[0][:, 3:12], masked[1][:, 3:12])


def test_deferred_masks_build_the_same_mask_inside_forward():
    """Pipelining passes only [B, S] document ids; each stage's forward builds the mask of its own
    microbatch, with the same logits as a mask built up front."""
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(2))
    eos = int(tokens[0, 5])
    deferred = model.get_attention_masks(tokens, eos, deferred=True)
    assert deferred.sdpa_mask is None and deferred.document_ids.shape == (2, 32)
    assert torch.equal(model(tokens, deferred), model(tokens, model.get_attention_masks(tokens, eos)))
    half = deferred.document_ids[1:]  # one microbatch's share, as the schedule splits it
    assert torch.equal(
        model(tokens[1:], type(deferred)(document_ids=half)),
        model(tokens[1:], model.get_attention_masks(tokens[1:], eos)),
    )


def test_document_ids_and_block_causal_mask():
    tokens = torch.tensor([[5, 9, 1, 4, 9, 9, 2]])
    doc_ids = document_ids_from_tokens(tokens, eos_id=9)
    assert doc_ids.tolist() == [[0, 0, 1, 1, 1, 2, 3]]
    mask = block_causal_mask(doc_ids)[0, 0]
    assert mask[4].tolist() == [False, False, True, True, True, False, False]
    assert mask[5].tolist() == [False] * 5 + [True, False]


def test_initial_values_depend_only_on_seed_and_name():
    model = tiny_model(VOCAB, seed=3)
    for name, param in model.named_parameters():
        assert torch.equal(param, full_value(name, param.shape, 3, model.init_for)), name
    other = tiny_model(VOCAB, seed=4)
    assert not torch.equal(model.layers["0"].attention.wq.weight, other.layers["0"].attention.wq.weight)
    # A deeper model shares the first layers' values: nothing depends on how many parameters came before.
    args = dataclasses.replace(model.args, n_layers=3)
    with torch.device("meta"):
        deeper = Llama3(args)
    deeper.init_weights(3, "cpu")
    assert torch.equal(deeper.layers["1"].feed_forward.w1.weight, model.layers["1"].feed_forward.w1.weight)


def test_flavor_shapes():
    assert LLAMA3_FLAVORS["8B"].ffn_hidden_dim == 14336
    assert LLAMA3_FLAVORS["70B"].ffn_hidden_dim == 28672
    assert LLAMA3_FLAVORS["405B"].ffn_hidden_dim == 53248
    assert LLAMA3_FLAVORS["1B"].ffn_hidden_dim == 8192
    assert LLAMA3_FLAVORS["3B"].ffn_hidden_dim == 8192
    debug = LLAMA3_FLAVORS["debug"]
    assert (debug.dim, debug.n_layers, debug.n_heads, debug.ffn_hidden_dim) == (256, 6, 16, 768)


def test_8b_parameter_count_on_meta():
    args = dataclasses.replace(LLAMA3_FLAVORS["8B"], vocab_size=128256)
    with torch.device("meta"):
        model = Llama3(args)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248


def test_num_flops_per_token_counts_matmuls_and_attention():
    model = tiny_model(VOCAB, seq_len=32)
    a = model.args
    dense = 6 * (sum(p.numel() for p in model.parameters()) - VOCAB * a.dim)
    assert model.num_flops_per_token(32) == dense + 12 * a.n_layers * a.dim * 32
    assert model.num_flops_per_token(64) > model.num_flops_per_token(32)


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


def test_gqa_forward_runs_and_backward_reaches_every_parameter():
    model = tiny_model(VOCAB)
    assert model.args.kv_heads < model.args.n_heads
    tokens = torch.randint(0, VOCAB, (2, 16))
    model(tokens).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

"""Llama 3: causality, document masks (built up front or deferred), initial values, FLOPs, GQA gradients."""

import dataclasses

import torch

from lockstep.models.common.init import full_value
from lockstep.models.llama3 import Llama3
from tests.helpers import tiny_model
from tests.models.causality import logits_around_a_changed_token

VOCAB = 97


def test_changing_a_future_token_leaves_past_logits_unchanged():
    model = tiny_model(VOCAB)
    a, b = logits_around_a_changed_token(model, VOCAB)
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


def test_num_flops_per_token_counts_matmuls_and_attention():
    model = tiny_model(VOCAB, seq_len=32)
    a = model.args
    dense = 6 * (sum(p.numel() for p in model.parameters()) - VOCAB * a.dim)
    assert model.num_flops_per_token(32) == dense + 12 * a.n_layers * a.dim * 32
    assert model.num_flops_per_token(64) > model.num_flops_per_token(32)


def test_gqa_forward_runs_and_backward_reaches_every_parameter():
    model = tiny_model(VOCAB)
    assert model.args.kv_heads < model.args.n_heads
    tokens = torch.randint(0, VOCAB, (2, 16))
    model(tokens).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

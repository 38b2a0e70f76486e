"""Llama 4 text: the block kinds (NoPE, chunked, QK-norm, MoE interleave), and Hugging Face parity
against transformers' Llama4ForCausalLM on a tiny random model whose sequence spans several attention
chunks and several temperature steps."""

import dataclasses

import pytest
import torch

from lockstep.models.common.moe import MoE
from lockstep.models.llama4 import LLAMA4_FLAVORS, hf_adapter
from tests.models.llama4.helpers import VOCAB, _meta, tiny_args, tiny_hf_llama4


def test_block_kinds_follow_the_published_pattern():
    """NoPE every fourth block (3, 7, ...: transformers' no_rope_layers, not torchtitan's 0, 4, ...),
    chunked attention and QK-norm on the RoPE blocks only, the temperature on the NoPE blocks only,
    MoE every interleave_moe_layer_step blocks (Maverick: the odd ones)."""
    maverick = _meta(LLAMA4_FLAVORS["17B-128E"])
    scout = _meta(LLAMA4_FLAVORS["17B-16E"])
    for name, block in maverick.layers.items():
        i, attention = int(name), block.attention
        assert attention.rope == (i % 4 != 3) == attention.chunked
        assert (attention.temperature is not None) == (i % 4 == 3)
        assert attention.l2_qk_norm_eps is None  # Maverick has no QK-norm
        assert hasattr(block, "moe") == (i % 2 == 1)
    assert all(hasattr(b, "moe") for b in scout.layers.values())
    assert [b.attention.l2_qk_norm_eps is not None for b in scout.layers.values()][:4] == [True, True, True, False]
    moe = scout.layers["0"].moe
    assert moe.score_before_experts and moe.router.score_func == "sigmoid" and moe.router.top_k == 1
    assert moe.shared_experts.w1.weight.shape == (8192, 5120) and moe.experts.w1.shape == (16, 8192, 5120)


def test_temperature_scales_queries_by_position_steps():
    temperature = (
        _meta(dataclasses.replace(LLAMA4_FLAVORS["debug"], vocab_size=VOCAB)).layers["3"].attention.temperature
    )
    q = torch.ones(1, 100, 2, 4)
    scaled = temperature(q, torch.arange(100))[0, :, 0, 0]
    assert torch.equal(scaled[:31], torch.ones(31))  # floor((p + 1) / 32) = 0 below position 31
    assert scaled[31] == scaled[62] > 1 and scaled[63] > scaled[62]
    torch.testing.assert_close(scaled[63], torch.tensor(1 + 0.1 * torch.log1p(torch.tensor(2.0)).item()))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_imported_model_gives_transformers_logits_and_round_trips(tied):
    hf, args = tiny_hf_llama4(tied)
    hf_state = hf.state_dict()
    assert hf_adapter.args_from_hf_config(hf.config.to_dict()) == args
    ours = _meta(args)
    ours.init_weights(0, "cpu")
    ours.load_state_dict(hf_adapter.from_hf(hf_state, args), strict=True)
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(tokens), hf(tokens).logits, rtol=0, atol=1e-5)
    back = hf_adapter.to_hf(ours.state_dict(), args)
    if tied:  # transformers lists the alias; its folder holds only the embedding
        hf_state = {k: v for k, v in hf_state.items() if k != "lm_head.weight"}
    assert back.keys() == hf_state.keys()
    assert all(torch.equal(back[k], hf_state[k]) for k in back)  # fused, transposed experts included
    again = hf_adapter.from_hf(back, args)
    assert again.keys() == {k for k in ours.state_dict() if not (tied and k == "output.weight")}
    assert all(torch.equal(again[k], ours.state_dict()[k]) for k in again)


def test_chunking_changes_the_logits_only_past_the_first_chunk():
    """The parity above is not vacuous: without chunks, the first chunk's logits stay and the rest move."""
    hf, args = tiny_hf_llama4()
    tokens = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(1))
    logits = []
    for chunk in (16, None):
        model = _meta(dataclasses.replace(args, attention_chunk_size=chunk))
        model.init_weights(0, "cpu")
        model.load_state_dict(hf_adapter.from_hf(hf.state_dict(), args))
        with torch.no_grad():
            logits.append(model.eval()(tokens))
    torch.testing.assert_close(logits[0][:, :16], logits[1][:, :16], rtol=0, atol=1e-6)
    assert (logits[0][:, 16:] - logits[1][:, 16:]).abs().max() > 1e-3


def test_every_parameter_learns_and_the_future_stays_unseen():
    model = _meta(tiny_args())
    model.init_weights(0, "cpu")
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    logits = model(tokens)
    changed = tokens.clone()
    changed[:, 30:] = (changed[:, 30:] + 1) % VOCAB
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[:, :30], logits[:, :30].detach(), rtol=0, atol=0)
    logits.float().logsumexp(-1).mean().backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not silent, silent
    assert [type(m) for m in model.moe_modules()] == [MoE, MoE]

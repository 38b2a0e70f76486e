"""Qwen3, dense and MoE: tied embeddings, QK-norm, causality, forced balance and FLOPs, Hugging Face parity."""

import pytest
import torch

from lockstep.models.qwen3 import Qwen3, hf_adapter
from tests.models.causality import logits_around_a_changed_token
from tests.models.qwen3.helpers import VOCAB, tiny, tiny_hf_qwen3


def test_tied_output_is_the_embedding_tensor_and_gets_both_gradients():
    model = tiny()
    assert model.output.weight is model.tok_embeddings.weight
    assert [n for n, _ in model.named_parameters()].count("tok_embeddings.weight") == 1
    assert "output.weight" not in dict(model.named_parameters())
    std = model.tok_embeddings.weight.std().item()  # 0.02, neither an embedding's 1 nor the output's dim^-0.5
    assert 0.018 < std < 0.02
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model(tokens).square().mean().backward()
    unused = [t for t in range(VOCAB) if t not in tokens]
    rows = model.tok_embeddings.weight.grad[unused]
    assert rows.abs().sum() > 0  # rows no token looked up still get the output projection's gradient
    untied = tiny(tie_embeddings=False)
    assert untied.output.weight is not untied.tok_embeddings.weight


def test_qk_norm_makes_logits_independent_of_the_q_and_k_scale():
    """QK-norm normalises q and k per head before RoPE: scaling wq and wk changes nothing."""
    model = tiny()
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(tokens)
        for layer in model.layers.values():
            layer.attention.wq.weight.mul_(3.0)
            layer.attention.wk.weight.mul_(0.5)
        torch.testing.assert_close(model(tokens), before, rtol=1e-4, atol=1e-4)


def test_past_logits_do_not_see_future_tokens_and_every_parameter_learns():
    for moe in (False, True):
        model = tiny(moe=moe)
        a, b = logits_around_a_changed_token(model, VOCAB)
        assert torch.equal(a[:, :20], b[:, :20])
        tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
        model(tokens).square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_forced_load_balance_and_flops():
    model = tiny(moe=True)
    model.set_force_load_balance(True)
    model(torch.randint(0, VOCAB, (2, 32)))  # 64 tokens x top-2 over 8 experts
    assert all(moe.tokens_per_expert.tolist() == [16.0] * 8 for moe in model.moe_modules())
    a = model.args
    weights = sum(p.numel() for p in model.parameters()) - VOCAB * a.dim
    idle = a.n_layers * 3 * a.dim * a.moe_inter_dim * (a.n_routed_experts - a.n_activated_experts)
    assert model.num_flops_per_token(32) == 6 * (weights - idle) + 12 * a.n_layers * a.n_heads * a.head_dim * 32
    tied = tiny()
    weights = sum(p.numel() for p in tied.parameters())  # the tied projection is a matmul: counted
    assert tied.num_flops_per_token(32) == 6 * weights + 12 * a.n_layers * a.n_heads * a.head_dim * 32


@pytest.mark.parametrize("moe, tied", [(False, True), (False, False), (True, False)], ids=["tied", "untied", "moe"])
def test_imported_model_gives_transformers_logits_and_round_trips(moe, tied):
    hf, args = tiny_hf_qwen3(moe, tied)
    hf_state = hf.state_dict()
    assert hf_adapter.args_from_hf_config(hf.config.to_dict()) == args
    with torch.device("meta"):
        ours = Qwen3(args)
    ours.init_weights(0, "cpu")
    ours.load_state_dict(hf_adapter.from_hf(hf_state, args), strict=True)
    assert (ours.output.weight is ours.tok_embeddings.weight) == tied
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(tokens), hf(tokens).logits, rtol=0, atol=1e-5)
    back = hf_adapter.to_hf(ours.state_dict(), args)
    if moe:  # the on-disk layout, one tensor per expert; transformers fuses them in memory
        assert "model.layers.3.mlp.experts.7.down_proj.weight" in back
        assert hf_adapter.from_hf(back, args).keys() == ours.state_dict().keys()
        back = {k: v for k, v in back.items() if ".mlp.experts." not in k}
        hf_state = {k: v for k, v in hf_state.items() if ".mlp.experts." not in k}
    assert back.keys() == hf_state.keys()
    assert all(torch.equal(back[k], hf_state[k]) for k in back)  # exact, the RoPE permutations included
    again = hf_adapter.from_hf(hf_adapter.to_hf(ours.state_dict(), args), args)
    assert again.keys() == ours.state_dict().keys()
    assert all(torch.equal(again[k], v) for k, v in ours.state_dict().items())

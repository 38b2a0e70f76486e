"""Qwen3, dense and MoE: published parameter counts, tied embeddings, QK-norm, Hugging Face parity."""

import dataclasses

import pytest
import torch

from lockstep.models.common.attention import HeadNorm
from lockstep.models.qwen3 import QWEN3_FLAVORS, QWEN3_MOE_FLAVORS, Qwen3, hf_adapter

VOCAB = 97

# Published sizes, from the model cards on huggingface.co/Qwen ("Number of Parameters" and
# "Number of Parameters (Non-Embedding)"; for the MoE models "Number of Activated Parameters"):
# (flavor, total, non-embedding or activated, the digits after the point they are given to).
DENSE_PUBLISHED = [
    ("0.6B", 0.6, 0.44, 2),  # Qwen3-0.6B: 0.6B, 0.44B non-embedding
    ("1.7B", 1.7, 1.4, 1),  # Qwen3-1.7B: 1.7B, 1.4B
    ("4B", 4.0, 3.6, 1),  # Qwen3-4B: 4.0B, 3.6B
    ("8B", 8.2, 6.95, 2),  # Qwen3-8B: 8.2B, 6.95B
    ("14B", 14.8, 13.2, 1),  # Qwen3-14B: 14.8B, 13.2B
    ("32B", 32.8, 31.2, 1),  # Qwen3-32B: 32.8B, 31.2B
]
MOE_PUBLISHED = [
    ("30B-A3B", 30.5, 29.9, 3.3, 1),  # Qwen3-30B-A3B: 30.5B total, 29.9B non-embedding, 3.3B activated
    ("235B-A22B", 235, 234, 22, 0),  # Qwen3-235B-A22B: 235B total, 234B non-embedding, 22B activated
]


def _meta(args) -> Qwen3:
    with torch.device("meta"):
        return Qwen3(args)


def _embedding_params(model: Qwen3) -> int:
    """The embedding, and the output projection unless it is the same tensor."""
    return sum(p.numel() for name, p in model.named_parameters() if name in ("tok_embeddings.weight", "output.weight"))


@pytest.mark.parametrize("flavor, total, non_embedding, digits", DENSE_PUBLISHED, ids=[f[0] for f in DENSE_PUBLISHED])
def test_dense_parameter_counts_match_the_model_cards(flavor, total, non_embedding, digits):
    model = _meta(QWEN3_FLAVORS[flavor])
    count = sum(p.numel() for p in model.parameters())  # a tied matrix counts once
    assert round(count / 1e9, 1) == total
    assert round((count - _embedding_params(model)) / 1e9, digits) == non_embedding
    assert (model.output.weight is model.tok_embeddings.weight) == (flavor in ("0.6B", "1.7B", "4B"))


@pytest.mark.parametrize(
    "flavor, total, non_embedding, activated, digits", MOE_PUBLISHED, ids=[f[0] for f in MOE_PUBLISHED]
)
def test_moe_parameter_counts_match_the_model_cards(flavor, total, non_embedding, activated, digits):
    args = QWEN3_MOE_FLAVORS[flavor]
    model = _meta(args)
    count = sum(p.numel() for p in model.parameters())
    idle_experts = args.n_routed_experts - args.n_activated_experts
    active = count - args.n_layers * 3 * args.dim * args.moe_inter_dim * idle_experts
    assert round(count / 1e9, digits) == total
    assert round((count - _embedding_params(model)) / 1e9, digits) == non_embedding
    # Activated, embeddings included: 3.353B and 22.19B; the 30B card cuts 3.35 to 3.3 rather than rounding.
    assert abs(active / 1e9 - activated) < 0.6 * 10**-digits


def test_flavors_have_qwen3_shapes():
    for table in (QWEN3_FLAVORS, QWEN3_MOE_FLAVORS):
        for name, args in table.items():
            assert (args.head_dim, args.rope_theta, args.norm_eps) == (128 if name != "debug" else 64, 1e6, 1e-6)
            assert args.vocab_size == (-1 if name == "debug" else 151936)  # debug: the tokenizer's
    assert QWEN3_FLAVORS["debug"].tie_embeddings and not QWEN3_MOE_FLAVORS["debug"].tie_embeddings
    assert QWEN3_FLAVORS["0.6B"].n_heads * QWEN3_FLAVORS["0.6B"].head_dim != QWEN3_FLAVORS["0.6B"].dim


def tiny(flavor: str = "debug", moe: bool = False, seed: int = 0, **changes) -> Qwen3:
    table = QWEN3_MOE_FLAVORS if moe else QWEN3_FLAVORS
    model = _meta(dataclasses.replace(table[flavor], vocab_size=VOCAB, max_seq_len=32, **changes))
    model.init_weights(seed, "cpu")
    return model


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


def test_head_norm_is_rms_norm_over_each_head():
    norm = HeadNorm(8, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 3, 4, 8)
    reference = torch.nn.RMSNorm(8, eps=1e-6)
    reference.weight.data.copy_(norm.weight.data)
    torch.testing.assert_close(norm(x), reference(x), rtol=1e-6, atol=1e-6)


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
        tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
        changed = tokens.clone()
        changed[:, 20] = (changed[:, 20] + 1) % VOCAB
        with torch.no_grad():
            a, b = model(tokens), model(changed)
        assert torch.equal(a[:, :20], b[:, :20])
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


def tiny_hf_qwen3(moe: bool, tied: bool, vocab_size: int = VOCAB, seed: int = 0):
    """A random transformers Qwen3 (or Qwen3-MoE) of the debug shape and its Qwen3Args; eager attention
    and experts, every weight random: the QK-norms and the router too (transformers starts them at ones
    and zeros, and ones would not show a wrong permutation)."""
    transformers = pytest.importorskip("transformers")
    table = QWEN3_MOE_FLAVORS if moe else QWEN3_FLAVORS
    args = dataclasses.replace(table["debug"], vocab_size=vocab_size, max_seq_len=64, tie_embeddings=tied)
    config = {k: v for k, v in hf_adapter.hf_config(args).items() if k not in ("architectures", "torch_dtype")}
    model_class = transformers.Qwen3MoeForCausalLM if moe else transformers.Qwen3ForCausalLM
    config_class = transformers.Qwen3MoeConfig if moe else transformers.Qwen3Config
    torch.manual_seed(seed)
    hf = model_class(config_class(**{k: v for k, v in config.items() if k != "model_type"})).eval()
    hf.set_attn_implementation("eager")
    if moe:
        hf.set_experts_implementation("eager")
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "gate.weight" in name or "experts" in name:
                p.normal_(0, 0.05)
    return hf, args


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


def test_a_moved_routing_bias_is_not_exported():
    model = tiny(moe=True)
    model.layers["1"].moe.expert_bias[3] = 0.5
    with pytest.raises(ValueError, match="layers.1.moe.expert_bias is not zero"):
        hf_adapter.to_hf(model.state_dict(), model.args)


def test_unsupported_hf_configs_are_refused():
    config = hf_adapter.hf_config(dataclasses.replace(QWEN3_FLAVORS["debug"], vocab_size=VOCAB))
    for change, fragment in (
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn'"),
        ({"use_sliding_window": True}, "sliding-window"),
    ):
        with pytest.raises(ValueError, match=fragment):
            hf_adapter.args_from_hf_config(config | change)
    moe = hf_adapter.hf_config(dataclasses.replace(QWEN3_MOE_FLAVORS["debug"], vocab_size=VOCAB))
    with pytest.raises(ValueError, match="dense blocks"):
        hf_adapter.args_from_hf_config(moe | {"mlp_only_layers": [0]})

"""Llama 4 text: published parameter counts, the block kinds (NoPE, chunked, QK-norm, MoE interleave),
and Hugging Face parity against transformers' Llama4ForCausalLM on a tiny random model whose sequence
spans several attention chunks and several temperature steps."""

import dataclasses

import pytest
import torch

from lockstep.models.common.moe import MoE
from lockstep.models.common.rope import Llama3RopeScaling
from lockstep.models.llama4 import LLAMA4_FLAVORS, Llama4, Llama4Args, hf_adapter
from lockstep.models.registry import model_spec
from lockstep.models.size import parameter_counts

transformers = pytest.importorskip("transformers")
VOCAB = 97

# Model cards (huggingface.co/meta-llama): Scout "17B activated, 109B total", Maverick "17B activated,
# 400B total". The totals include the vision encoder, which lockstep leaves out, so the text models
# count a little less: (flavor, total text parameters in billions, activated).
PUBLISHED = [("17B-16E", 109, 17), ("17B-128E", 400, 17)]


def _meta(args: Llama4Args) -> Llama4:
    with torch.device("meta"):
        return Llama4(args)


@pytest.mark.parametrize("flavor, total, activated", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_parameter_counts_match_the_model_cards(flavor, total, activated):
    args = LLAMA4_FLAVORS[flavor]
    model = _meta(args)
    count = sum(p.numel() for p in model.parameters())
    idle = args.n_moe_blocks * 3 * args.dim * args.moe_inter_dim * (args.n_routed_experts - args.n_activated_experts)
    assert round((count - idle) / 1e9) == activated  # 17.17B in both
    assert 0.98 * total <= count / 1e9 <= 1.01 * total  # Scout 107.8B of 109B, Maverick 400.7B of 400B
    counts = parameter_counts(model_spec("llama4"), args)  # what the trainer prints, from a few blocks
    assert counts["total"] == count and counts["active"] == count - idle


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


def tiny_args(tied: bool = False, **changes) -> Llama4Args:
    """The debug shape with chunks of 16 and temperature steps of 8, Scout's RoPE scaling shrunk, so a
    64-token sequence crosses four chunks and many temperature steps."""
    scaling = Llama3RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
    )
    return dataclasses.replace(
        LLAMA4_FLAVORS["debug"], vocab_size=VOCAB, max_seq_len=128, attention_chunk_size=16, floor_scale=8,
        rope_scaling=scaling, tie_embeddings=tied, seq_aux_loss_alpha=0.0, **changes,
    )  # fmt: skip


def tiny_hf_llama4(tied: bool = False, vocab_size: int = VOCAB, **changes):
    """A random transformers Llama4ForCausalLM of ``tiny_args``' shape (fp32, eager), and those args."""
    args = dataclasses.replace(tiny_args(tied, **changes), vocab_size=vocab_size)
    config = hf_adapter.hf_config(args)
    for key in ("architectures", "model_type", "torch_dtype"):
        config.pop(key)
    torch.manual_seed(5)
    hf = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**config)).eval()
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "experts" in name or "router" in name:
                p.normal_(0, 0.05)
    return hf, args


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


def test_per_expert_and_multimodal_folders_read_as_the_fused_text_model():
    """One tensor per expert (as quantised re-uploads store them) and the ``language_model.`` names of a
    Llama4ForConditionalGeneration folder, whose vision tower is skipped, give the same weights."""
    hf, args = tiny_hf_llama4()
    fused = hf.state_dict()
    expected = hf_adapter.from_hf(fused, args)
    per_expert = {}
    for name, value in fused.items():
        if name.endswith("experts.gate_up_proj"):
            prefix, hidden = name.removesuffix("gate_up_proj"), value.shape[2] // 2
            for e in range(value.shape[0]):
                per_expert[f"{prefix}{e}.gate_proj.weight"] = value[e, :, :hidden].T
                per_expert[f"{prefix}{e}.up_proj.weight"] = value[e, :, hidden:].T
        elif name.endswith("experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            per_expert |= {f"{prefix}{e}.down_proj.weight": value[e].T for e in range(value.shape[0])}
        else:
            per_expert[name] = value
    multimodal = {f"language_model.{k}": v for k, v in fused.items()} | {
        "vision_model.patch_embedding.weight": torch.ones(2)
    }
    for state in (per_expert, multimodal):
        got = hf_adapter.from_hf(state, args)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    nested = {"model_type": "llama4", "text_config": hf.config.to_dict()}
    assert hf_adapter.args_from_hf_config(nested) == args


def test_a_moved_routing_bias_is_not_exported_and_irregular_patterns_are_refused():
    model = _meta(tiny_args())
    model.init_weights(0, "cpu")
    model.layers["1"].moe.expert_bias[2] = 0.5
    with pytest.raises(ValueError, match="layers.1.moe.expert_bias is not zero"):
        hf_adapter.to_hf(model.state_dict(), model.args)
    config = hf_adapter.hf_config(tiny_args())
    with pytest.raises(ValueError, match="moe_layers"):
        hf_adapter.args_from_hf_config(config | {"moe_layers": [0, 3]})
    with pytest.raises(ValueError, match="NoPE"):
        hf_adapter.args_from_hf_config(config | {"no_rope_layers": [0, 1, 1, 1]})
    with pytest.raises(ValueError, match="RoPE type 'yarn'"):
        hf_adapter.args_from_hf_config(config | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


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

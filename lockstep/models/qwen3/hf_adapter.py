"""Qwen3 <-> Hugging Face ``Qwen3ForCausalLM`` (model_type ``qwen3``) and ``Qwen3MoeForCausalLM``
(``qwen3_moe``): parameter names, the RoPE layout, config.json.

RoPE: lockstep rotates interleaved pairs, Hugging Face rotates halves, so the rows of wq and wk are
permuted within each head (as for Llama 3), and so is the QK-norm weight: it scales each head's dims
before RoPE, so it follows its dims. Grouped experts are one tensor per expert on disk (and fused in
transformers' memory), as for DeepSeek-V3 (``lockstep.models.common.hf_source``).

Tied embeddings: a tied model holds one tensor, ``tok_embeddings.weight``, in checkpoints, and its
Hugging Face folder holds only ``model.embed_tokens.weight``, as transformers saves it; an
``output.weight`` given (a ``state_dict()`` lists the alias) still maps to ``lm_head.weight``.

Qwen3-MoE routers have no bias: lockstep's ``expert_bias`` (zero unless ``bias_update_speed`` moved
it) reads as zeros and is left out of exports, which refuse a bias that is not zero.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from lockstep.models.common.hf_source import (
    DECODER_TOP_NAMES,
    LAYER_NAME,
    ExpertsFromHF,
    HFSource,
    experts_source,
    experts_to_hf,
    refuse_moved_routing_bias,
    table_hf_name,
    whole,
)
from lockstep.models.common.rope import halves_to_interleaved, interleaved_to_halves
from lockstep.models.qwen3.args import Qwen3Args

_TOP = DECODER_TOP_NAMES
_BLOCK = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "moe.router.gate.weight": "mlp.gate.weight",
}
_EXPERTS = ("moe.experts.w1", "moe.experts.w3", "moe.experts.w2")
_BIAS = "moe.expert_bias"
_ROTATED = ("attention.wq.weight", "attention.wk.weight", "attention.q_norm.weight", "attention.k_norm.weight")


def _heads(name: str, args: Qwen3Args) -> int:
    """Heads along dim 0 of a RoPE-rotated tensor: wq's, wk's, or one (a QK-norm weight)."""
    if name.endswith("wq.weight"):
        return args.n_heads
    return args.kv_heads if name.endswith("wk.weight") else 1


def hf_name(name: str) -> str:
    return table_hf_name(name, _TOP, _BLOCK)


def to_hf(state: dict[str, torch.Tensor], args: Qwen3Args) -> dict[str, torch.Tensor]:
    """lockstep state dict (full tensors) -> Hugging Face Qwen3 / Qwen3-MoE state dict."""
    out = {}
    for name, value in state.items():
        match = LAYER_NAME.match(name)
        rest = match.group(2) if match else None
        if rest in _EXPERTS:
            out |= experts_to_hf(f"model.layers.{match.group(1)}.mlp.experts", name.rsplit(".", 1)[1], value)
        elif rest == _BIAS:
            refuse_moved_routing_bias(name, value, "Qwen3-MoE")
        else:
            out[hf_name(name)] = interleaved_to_halves(value, _heads(name, args)) if rest in _ROTATED else value
    return out


def from_hf(state: dict[str, torch.Tensor], args: Qwen3Args) -> dict[str, torch.Tensor]:
    """Hugging Face Qwen3 / Qwen3-MoE state dict -> lockstep state dict (rotary buffers are ignored;
    MoE blocks get a zero ``expert_bias``)."""
    reverse_top = {v: k for k, v in _TOP.items()}
    reverse_block = {v: k for k, v in _BLOCK.items()}
    out, experts = {}, ExpertsFromHF()
    for name, value in state.items():
        if name in reverse_top:
            out[reverse_top[name]] = value
            continue
        match = LAYER_NAME.match(name)
        if match is None:
            if "rotary_emb" in name:
                continue
            raise KeyError(f"unexpected Hugging Face parameter {name!r} for a Qwen3 model")
        layer, rest = match.group(1), match.group(2)
        if rest in reverse_block:
            ours = f"layers.{layer}.{reverse_block[rest]}"
            rotated = reverse_block[rest] in _ROTATED
            out[ours] = halves_to_interleaved(value, _heads(ours, args)) if rotated else value
        elif "rotary_emb" in rest:
            continue
        elif not (
            rest.startswith("mlp.experts.")
            and experts.add(f"layers.{layer}.moe.experts", rest.removeprefix("mlp.experts."), value)
        ):
            raise KeyError(f"unexpected Hugging Face parameter {name!r} for a Qwen3 model")
    out |= experts.result()
    if args.is_moe:
        out |= {f"layers.{i}.{_BIAS}": torch.zeros(args.n_routed_experts) for i in range(args.n_layers)}
    return out


def hf_source(name: str, shape: torch.Size, hf_names: Collection[str], args: Qwen3Args) -> HFSource:
    """How a rank reads its shard of `name`: wq, wk and the QK-norm weights go from halves back to
    interleaved pairs, a permutation within each head (blocks of head_dim rows); experts per expert
    (or fused); the routing bias, which Qwen3-MoE has not, reads as zeros."""
    match = LAYER_NAME.match(name)
    rest = match.group(2) if match else None
    if rest == _BIAS:
        return HFSource(())
    if rest in _EXPERTS:
        return experts_source(f"model.layers.{match.group(1)}.mlp.experts", name.rsplit(".", 1)[1], shape, hf_names)
    if name == "output.weight" and args.tie_embeddings:
        name = "tok_embeddings.weight"
    piece = whole(hf_name(name), shape)
    if rest in _ROTATED:
        head_dim = args.head_dim
        return HFSource((piece,), head_dim, lambda w: halves_to_interleaved(w, w.shape[0] // head_dim))
    return HFSource((piece,))


def hf_config(args: Qwen3Args, dtype: str = "float32") -> dict:
    """config.json for Qwen3ForCausalLM, or Qwen3MoeForCausalLM for an MoE flavor."""
    config = {
        "architectures": ["Qwen3MoeForCausalLM" if args.is_moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if args.is_moe else "qwen3",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "tie_word_embeddings": args.tie_embeddings,
        "torch_dtype": dtype,
    }
    if args.is_moe:
        config |= {
            "num_experts": args.n_routed_experts,
            "num_experts_per_tok": args.n_activated_experts,
            "moe_intermediate_size": args.moe_inter_dim,
            "norm_topk_prob": args.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "router_aux_loss_coef": args.seq_aux_loss_alpha,
        }
    return config


def args_from_hf_config(config: dict) -> Qwen3Args:
    """Qwen3Args for a Hugging Face Qwen3 or Qwen3-MoE config.json. Refused: RoPE scaling (YaRN and the
    like), sliding-window attention, and MoE models with dense blocks among the MoE ones."""
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) or rope.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"RoPE type {rope_type!r}: lockstep's Qwen3 has plain RoPE only")
    if config.get("use_sliding_window"):
        raise ValueError("sliding-window attention (use_sliding_window) is not supported")
    moe = config.get("model_type") == "qwen3_moe"
    if moe and (config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1):
        raise ValueError("Qwen3-MoE with dense blocks (mlp_only_layers, decoder_sparse_step > 1) is not supported")
    return Qwen3Args(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads"),
        head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        vocab_size=config["vocab_size"],
        ffn_hidden_dim=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=config.get("rope_theta", rope.get("rope_theta", 10000.0)),
        max_seq_len=config.get("max_position_embeddings", 40960),
        tie_embeddings=config.get("tie_word_embeddings", False),
        n_routed_experts=config.get("num_experts", config.get("num_local_experts")) if moe else 0,  # v5 renames it
        n_activated_experts=config["num_experts_per_tok"] if moe else 0,
        moe_inter_dim=config["moe_intermediate_size"] if moe else 0,
        norm_topk_prob=config.get("norm_topk_prob", False) if moe else True,
        seq_aux_loss_alpha=config.get("router_aux_loss_coef", 0.0) if moe else 0.0,
    )

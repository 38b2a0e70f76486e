"""DeepSeek-V3 <-> Hugging Face ``DeepseekV3ForCausalLM``.

Grouped expert weights [E, out, in] are split into the per-expert tensors of HF checkpoints
(``mlp.experts.{e}.gate_proj.weight``...) and concatenated back; the fused in-memory layout of
transformers (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj``) is read too. RoPE needs
no permutation: both sides rotate interleaved pairs (HF's ``rope_interleave=True``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import torch

from lockstep.models.common.hf_source import (
    DECODER_TOP_NAMES,
    LAYER_NAME,
    ExpertsFromHF,
    HFSource,
    experts_source,
    experts_to_hf,
    table_hf_name,
    whole,
)
from lockstep.models.common.rope import YarnRopeScaling
from lockstep.models.deepseek_v3.args import DeepSeekV3Args

_TOP = DECODER_TOP_NAMES
_BLOCK = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wq_a.weight": "self_attn.q_a_proj.weight",
    "attention.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attention.wq_b.weight": "self_attn.q_b_proj.weight",
    "attention.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attention.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attention.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "moe.router.gate.weight": "mlp.gate.weight",
    "moe.expert_bias": "mlp.gate.e_score_correction_bias",
    "moe.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "moe.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "moe.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_EXPERTS = ("moe.experts.w1", "moe.experts.w3", "moe.experts.w2")


def hf_name(name: str) -> str:
    return table_hf_name(name, _TOP, _BLOCK, " (grouped experts map to one tensor per expert)")


def to_hf(state: dict[str, torch.Tensor], args: DeepSeekV3Args) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        match = LAYER_NAME.match(name)
        if match and match.group(2) in _EXPERTS:
            out |= experts_to_hf(f"model.layers.{match.group(1)}.mlp.experts", name.rsplit(".", 1)[1], value)
        else:
            out[hf_name(name)] = value
    return out


def from_hf(state: dict[str, torch.Tensor], args: DeepSeekV3Args) -> dict[str, torch.Tensor]:
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
            raise KeyError(f"unexpected Hugging Face parameter {name!r}")
        layer, rest = match.group(1), match.group(2)
        if rest in reverse_block:
            out[f"layers.{layer}.{reverse_block[rest]}"] = value
        elif not (
            rest.startswith("mlp.experts.")
            and experts.add(f"layers.{layer}.moe.experts", rest.removeprefix("mlp.experts."), value)
        ):
            raise KeyError(f"unexpected Hugging Face parameter {name!r}")
    return out | experts.result()


def hf_source(name: str, shape: torch.Size, hf_names: Collection[str], args: DeepSeekV3Args) -> HFSource:
    """How a rank reads its shard of `name`: grouped experts per expert (or fused), see
    ``experts_source``; everything else is one Hugging Face tensor."""
    match = LAYER_NAME.match(name)
    if match is None or match.group(2) not in _EXPERTS:
        return HFSource((whole(hf_name(name), shape),))
    return experts_source(f"model.layers.{match.group(1)}.mlp.experts", name.rsplit(".", 1)[1], shape, hf_names)


def hf_config(args: DeepSeekV3Args, dtype: str = "float32") -> dict:
    if args.score_func != "sigmoid":
        raise ValueError("transformers' DeepseekV3 router uses sigmoid scores; this flavor uses softmax")
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.inter_dim,
        "moe_intermediate_size": args.moe_inter_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_heads,
        "n_shared_experts": args.n_shared_experts,
        "n_routed_experts": args.n_routed_experts,
        "routed_scaling_factor": args.route_scale,
        "kv_lora_rank": args.kv_lora_rank,
        "q_lora_rank": args.q_lora_rank or None,
        "qk_rope_head_dim": args.qk_rope_head_dim,
        "v_head_dim": args.v_head_dim,
        "qk_nope_head_dim": args.qk_nope_head_dim,
        "n_group": args.n_expert_groups,
        "topk_group": args.n_limited_groups,
        "num_experts_per_tok": args.n_activated_experts,
        "first_k_dense_replace": args.n_dense_layers,
        "norm_topk_prob": args.norm_topk_prob,
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta,
        **({"rope_scaling": _hf_yarn(args.rope_scaling)} if args.rope_scaling is not None else {}),
        "rope_interleave": True,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "hidden_act": "silu",
        "torch_dtype": dtype,
    }


def _hf_yarn(scaling: YarnRopeScaling) -> dict:
    return {"type": "yarn", "rope_type": "yarn", **dataclasses.asdict(scaling)}


def _yarn_from_hf(config: dict) -> YarnRopeScaling | None:
    """rope_scaling (DeepSeek's config.json) or rope_parameters (as newer transformers save it), if YaRN."""
    for entry in (config.get("rope_scaling"), config.get("rope_parameters")):
        kind = (entry or {}).get("rope_type") or (entry or {}).get("type")
        if kind in (None, "default"):
            continue
        if kind != "yarn":
            raise ValueError(f"rope scaling {kind!r}: DeepSeek-V3 takes yarn or none")
        fields = {f.name for f in dataclasses.fields(YarnRopeScaling)}
        return YarnRopeScaling(**{k: v for k, v in entry.items() if k in fields and v is not None})
    return None


def args_from_hf_config(config: dict) -> DeepSeekV3Args:
    rope = config.get("rope_parameters") or {}
    return DeepSeekV3Args(
        rope_scaling=_yarn_from_hf(config),
        dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_dense_layers=config["first_k_dense_replace"],
        n_heads=config["num_attention_heads"], vocab_size=config["vocab_size"],
        max_seq_len=config.get("max_position_embeddings", 4096), norm_eps=config.get("rms_norm_eps", 1e-6),
        q_lora_rank=config.get("q_lora_rank") or 0, kv_lora_rank=config["kv_lora_rank"],
        qk_nope_head_dim=config["qk_nope_head_dim"], qk_rope_head_dim=config["qk_rope_head_dim"],
        v_head_dim=config["v_head_dim"], rope_theta=config.get("rope_theta", rope.get("rope_theta", 10000.0)),
        inter_dim=config["intermediate_size"], moe_inter_dim=config["moe_intermediate_size"],
        n_routed_experts=config["n_routed_experts"], n_shared_experts=config["n_shared_experts"],
        n_activated_experts=config["num_experts_per_tok"], n_expert_groups=config["n_group"],
        n_limited_groups=config["topk_group"], route_scale=config["routed_scaling_factor"],
        norm_topk_prob=config.get("norm_topk_prob", True),
    )  # fmt: skip

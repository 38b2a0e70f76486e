"""Llama 4 text <-> Hugging Face ``Llama4ForCausalLM`` (model_type ``llama4_text``): parameter names,
the experts' layout, config.json. The text model of a ``Llama4ForConditionalGeneration`` folder
(model_type ``llama4``: the published Scout and Maverick) is read too, its vision tower left out.

RoPE: transformers' Llama 4 rotates interleaved pairs (complex multiplication), as lockstep does, so
wq and wk keep their row order (unlike Llama 3 and Qwen3). Experts: transformers stores each MoE
block's experts fused and transposed, ``gate_up_proj`` [E, dim, 2 x hidden] (gate first) and
``down_proj`` [E, hidden, dim], where lockstep holds w1, w3 [E, hidden, dim] and w2 [E, dim, hidden];
exports write that layout, imports read it or one tensor per expert (``experts.{e}.gate_proj.weight``).

The router has no bias in transformers: lockstep's ``expert_bias`` (zero unless bias_update_speed
moved it) reads as zeros and is left out of exports, which refuse a bias that is not zero.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from lockstep.models.common.hf_source import (
    DECODER_TOP_NAMES,
    LAYER_NAME,
    ExpertsFromHF,
    HFPiece,
    HFSource,
    experts_source,
    hf_rope_table,
    hf_rope_type,
    llama3_scaling_from_hf,
    llama3_scaling_to_hf,
    refuse_moved_routing_bias,
    table_hf_name,
    whole,
)
from lockstep.models.llama4.args import Llama4Args

_TOP = DECODER_TOP_NAMES
_BLOCK = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "feed_forward.gate_proj.weight",
    "feed_forward.w3.weight": "feed_forward.up_proj.weight",
    "feed_forward.w2.weight": "feed_forward.down_proj.weight",
    "moe.router.gate.weight": "feed_forward.router.weight",
    "moe.shared_experts.w1.weight": "feed_forward.shared_expert.gate_proj.weight",
    "moe.shared_experts.w3.weight": "feed_forward.shared_expert.up_proj.weight",
    "moe.shared_experts.w2.weight": "feed_forward.shared_expert.down_proj.weight",
}
_EXPERTS = ("moe.experts.w1", "moe.experts.w3", "moe.experts.w2")
FUSED_ON_EXPORT = (("moe.experts.w1", "moe.experts.w3"),)
"""Converted together (lockstep.checkpoint.hf.export_units): one gate_up_proj is made of both."""
_BIAS = "moe.expert_bias"
_MULTIMODAL_TEXT = "language_model."
"""The text model's prefix in a Llama4ForConditionalGeneration folder."""
_MULTIMODAL_OTHER = ("vision_model.", "multi_modal_projector.")


def hf_name(name: str) -> str:
    return table_hf_name(name, _TOP, _BLOCK)


def _experts_prefix(layer: str) -> str:
    return f"model.layers.{layer}.feed_forward.experts"


def to_hf(state: dict[str, torch.Tensor], args: Llama4Args) -> dict[str, torch.Tensor]:
    """lockstep state dict (full tensors) -> Hugging Face Llama4ForCausalLM state dict."""
    out, gate_up = {}, {}
    for name, value in state.items():
        match = LAYER_NAME.match(name)
        rest = match.group(2) if match else None
        if rest in _EXPERTS:
            weight, prefix = name.rsplit(".", 1)[1], _experts_prefix(match.group(1))
            if weight == "w2":
                out[f"{prefix}.down_proj"] = value.transpose(1, 2).contiguous()
            else:
                gate_up.setdefault(prefix, {})[weight] = value
        elif rest == _BIAS:
            refuse_moved_routing_bias(name, value, "Llama 4")
        elif name == "output.weight" and args.tie_embeddings:
            continue
        else:
            out[hf_name(name)] = value
    for prefix, pair in gate_up.items():
        out[f"{prefix}.gate_up_proj"] = torch.cat([pair["w1"], pair["w3"]], dim=1).transpose(1, 2).contiguous()
    return out


def from_hf(state: dict[str, torch.Tensor], args: Llama4Args) -> dict[str, torch.Tensor]:
    """Hugging Face Llama 4 state dict (text-only, or the text model of a multimodal folder) -> lockstep
    state dict; MoE blocks get a zero ``expert_bias``."""
    reverse_top = {v: k for k, v in _TOP.items()}
    reverse_block = {v: k for k, v in _BLOCK.items()}
    out, per_expert = {}, ExpertsFromHF()
    for name, value in state.items():
        if name.startswith(_MULTIMODAL_OTHER):
            continue
        name = name.removeprefix(_MULTIMODAL_TEXT)
        if name in reverse_top:
            out[reverse_top[name]] = value
            continue
        match = LAYER_NAME.match(name)
        if match is None:
            raise KeyError(f"unexpected Hugging Face parameter {name!r} for a Llama 4 model")
        layer, rest = match.group(1), match.group(2)
        experts = f"layers.{layer}.moe.experts"
        if rest in reverse_block:
            out[f"layers.{layer}.{reverse_block[rest]}"] = value
        elif rest == "feed_forward.experts.gate_up_proj":
            w1, w3 = value.transpose(1, 2).chunk(2, dim=1)
            out[f"{experts}.w1"], out[f"{experts}.w3"] = w1.contiguous(), w3.contiguous()
        elif rest == "feed_forward.experts.down_proj":
            out[f"{experts}.w2"] = value.transpose(1, 2).contiguous()
        elif not (
            rest.startswith("feed_forward.experts.")
            and per_expert.add(experts, rest.removeprefix("feed_forward.experts."), value)
        ):
            raise KeyError(f"unexpected Hugging Face parameter {name!r} for a Llama 4 model")
    out |= per_expert.result()
    out |= {
        f"layers.{i}.{_BIAS}": torch.zeros(args.n_routed_experts) for i in range(args.n_layers) if args.is_moe_block(i)
    }
    return out


def hf_source(name: str, shape: torch.Size, hf_names: Collection[str], args: Llama4Args) -> HFSource:
    """How a rank reads its shard of `name`: one Hugging Face tensor of the same shape, except the
    experts (fused and transposed, a box of gate_up_proj or down_proj read into a transposed view; or
    one tensor per expert) and the routing bias, which reads as zeros. The text model of a multimodal
    folder is read under its ``language_model.`` prefix."""
    prefix = _MULTIMODAL_TEXT if any(n.startswith(_MULTIMODAL_TEXT) for n in hf_names) else ""
    match = LAYER_NAME.match(name)
    rest = match.group(2) if match else None
    if rest == _BIAS:
        return HFSource(())
    if rest in _EXPERTS:
        weight, experts = name.rsplit(".", 1)[1], prefix + _experts_prefix(match.group(1))
        if f"{experts}.gate_up_proj" not in hf_names:
            return experts_source(experts, weight, shape, hf_names)
        count, rows, cols = shape
        if weight == "w2":  # [E, dim, hidden] from down_proj [E, hidden, dim]
            return HFSource(
                (HFPiece(f"{experts}.down_proj", (count, cols, rows), (0, 0, 0), tuple(shape), (0, 0, 0), True),)
            )
        start = rows if weight == "w3" else 0  # [E, hidden, dim] from gate_up_proj [E, dim, 2 x hidden]
        fused = HFPiece(
            f"{experts}.gate_up_proj", (count, cols, 2 * rows), (0, 0, 0), tuple(shape), (0, 0, start), True
        )
        return HFSource((fused,))
    if name == "output.weight" and args.tie_embeddings:
        name = "tok_embeddings.weight"
    return HFSource((whole(prefix + hf_name(name), shape),))


def hf_config(args: Llama4Args, dtype: str = "float32") -> dict:
    """config.json for Llama4ForCausalLM (model_type llama4_text)."""
    return {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "hidden_size": args.dim,
        "intermediate_size": args.moe_inter_dim,
        "intermediate_size_mlp": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": llama3_scaling_to_hf(args.rope_scaling),
        "hidden_act": "silu",
        "attention_bias": False,
        "num_local_experts": args.n_routed_experts,
        "num_experts_per_tok": args.n_activated_experts,
        "interleave_moe_layer_step": args.interleave_moe_layer_step,
        "moe_layers": [i for i in range(args.n_layers) if args.is_moe_block(i)],
        "no_rope_layers": [int(args.uses_rope(i)) for i in range(args.n_layers)],
        "attention_chunk_size": args.attention_chunk_size,
        "use_qk_norm": args.use_qk_norm,
        "attn_temperature_tuning": args.attn_temperature_tuning,
        "floor_scale": args.floor_scale,
        "attn_scale": args.attn_scale,
        "router_aux_loss_coef": args.seq_aux_loss_alpha,
        "tie_word_embeddings": args.tie_embeddings,
        "torch_dtype": dtype,
    }


def _pattern(values: list[int], n_layers: int, name: str) -> int:
    """The interval of a regular every-k-th pattern over the layers (k-1, 2k-1, ...), which is what
    lockstep's args express; anything else is refused."""
    for k in range(1, n_layers + 2):
        if values == [i for i in range(n_layers) if (i + 1) % k == 0]:
            return k
    raise ValueError(f"{name} {values} is not every k-th layer (k-1, 2k-1, ...), which lockstep's Llama 4 expresses")


def args_from_hf_config(config: dict) -> Llama4Args:
    """Llama4Args for a Hugging Face Llama 4 config.json: text-only (llama4_text), or the text_config of a
    multimodal one (llama4). Refused: RoPE other than plain or Llama 3 scaling, and MoE or NoPE layers
    that are not every k-th layer."""
    if config.get("model_type") == "llama4":
        config = config.get("text_config") or {}
    n_layers = config["num_hidden_layers"]
    rope_type = hf_rope_type(config)
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"RoPE type {rope_type!r}: lockstep's Llama 4 has plain RoPE and Llama 3 scaling only")
    step = config.get("interleave_moe_layer_step", 1)
    if config.get("moe_layers") is not None:
        step = _pattern(list(config["moe_layers"]), n_layers, "moe_layers")
    interval = config.get("no_rope_layer_interval", 4)
    if config.get("no_rope_layers"):
        nope = [i for i, uses in enumerate(config["no_rope_layers"][:n_layers]) if not uses]
        interval = 0 if not nope else _pattern(nope, n_layers, "the NoPE layers (no_rope_layers)")
    return Llama4Args(
        dim=config["hidden_size"],
        n_layers=n_layers,
        n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads"),
        head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        vocab_size=config["vocab_size"],
        ffn_hidden_dim=config.get("intermediate_size_mlp", 16384),
        moe_inter_dim=config.get("intermediate_size", 8192),
        n_routed_experts=config.get("num_local_experts", 16),
        n_activated_experts=config.get("num_experts_per_tok", 1),
        interleave_moe_layer_step=step,
        norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=config.get("rope_theta", hf_rope_table(config).get("rope_theta", 500000.0)),
        rope_scaling=llama3_scaling_from_hf(config),
        max_seq_len=config.get("max_position_embeddings", 8192),
        nope_layer_interval=interval,
        attention_chunk_size=config.get("attention_chunk_size", 8192),
        use_qk_norm=bool(config.get("use_qk_norm", True)),
        attn_temperature_tuning=bool(config.get("attn_temperature_tuning", True)),
        floor_scale=config.get("floor_scale", 8192),
        attn_scale=config.get("attn_scale", 0.1),
        tie_embeddings=config.get("tie_word_embeddings", False),
        seq_aux_loss_alpha=config.get("router_aux_loss_coef", 0.0),
    )

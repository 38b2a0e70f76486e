"""Llama 3 <-> Hugging Face ``LlamaForCausalLM``: parameter names, the q/k RoPE layout, config.json.

lockstep (like Meta's reference code) rotates interleaved pairs (x0, x1), (x2, x3), ... of each head;
Hugging Face rotates halves (x0, x_{d/2}), ... So the rows of wq and wk are permuted within each head
on the way out and back on the way in; the two layouts compute identical attention.

Tied embeddings (Llama 3.2 1B and 3B): a tied model holds one tensor, ``tok_embeddings.weight``, in
checkpoints, and its Hugging Face folder holds only ``model.embed_tokens.weight``, as transformers saves
it; an ``output.weight`` given (a ``state_dict()`` lists the alias) still maps to ``lm_head.weight``.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from lockstep.models.common.hf_source import (
    DECODER_TOP_NAMES,
    LAYER_NAME,
    HFSource,
    hf_rope_table,
    llama3_scaling_from_hf,
    llama3_scaling_to_hf,
    table_hf_name,
    whole,
)
from lockstep.models.common.rope import halves_to_interleaved, interleaved_to_halves
from lockstep.models.llama3.args import Llama3Args

_TO_HF = DECODER_TOP_NAMES
_LAYER_TO_HF = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_FROM_HF = {v: k for k, v in _TO_HF.items()}
_LAYER_FROM_HF = {v: k for k, v in _LAYER_TO_HF.items()}


def hf_name(name: str) -> str:
    return table_hf_name(name, _TO_HF, _LAYER_TO_HF)


def to_hf(state: dict[str, torch.Tensor], args: Llama3Args) -> dict[str, torch.Tensor]:
    """lockstep state dict (full tensors) -> Hugging Face Llama state dict."""
    out = {}
    for name, value in state.items():
        if name.endswith("attention.wq.weight"):
            value = interleaved_to_halves(value, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            value = interleaved_to_halves(value, args.kv_heads)
        out[hf_name(name)] = value
    return out


def from_hf(state: dict[str, torch.Tensor], args: Llama3Args) -> dict[str, torch.Tensor]:
    """Hugging Face Llama state dict -> lockstep state dict (rotary buffers and the like are ignored)."""
    out = {}
    for name, value in state.items():
        if name in _FROM_HF:
            out[_FROM_HF[name]] = value
            continue
        match = LAYER_NAME.match(name)
        if match is None or match.group(2) not in _LAYER_FROM_HF:
            if "rotary_emb" in name:
                continue
            raise KeyError(f"unexpected Hugging Face parameter {name!r} for a Llama model")
        ours = f"layers.{match.group(1)}.{_LAYER_FROM_HF[match.group(2)]}"
        if ours.endswith("attention.wq.weight"):
            value = halves_to_interleaved(value, args.n_heads)
        elif ours.endswith("attention.wk.weight"):
            value = halves_to_interleaved(value, args.kv_heads)
        out[ours] = value
    return out


def hf_source(name: str, shape: torch.Size, hf_names: Collection[str], args: Llama3Args) -> HFSource:
    """How a rank reads its shard of `name`: the rows of one Hugging Face tensor; wq and wk also go
    from halves back to interleaved pairs, a permutation within each head, hence per block of
    head_dim rows. A tied model's output projection is read from the embedding."""
    if name == "output.weight" and args.tie_embeddings:
        name = "tok_embeddings.weight"
    piece = whole(hf_name(name), shape)
    if name.endswith(("attention.wq.weight", "attention.wk.weight")):
        return HFSource((piece,), args.head_dim, lambda w: halves_to_interleaved(w, w.shape[0] // args.head_dim))
    return HFSource((piece,))


def hf_config(args: Llama3Args, dtype: str = "float32") -> dict:
    """config.json for LlamaForCausalLM with this architecture."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
        "rope_scaling": llama3_scaling_to_hf(args.rope_scaling),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": args.tie_embeddings,
        "torch_dtype": dtype,
    }


def args_from_hf_config(config: dict) -> Llama3Args:
    """Llama3Args for a Hugging Face LlamaForCausalLM config.json."""
    scaling = hf_rope_table(config)
    theta = config.get("rope_theta", scaling.get("rope_theta", 10000.0))
    return Llama3Args(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads"),
        vocab_size=config["vocab_size"],
        norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=llama3_scaling_from_hf(config),
        max_seq_len=config.get("max_position_embeddings", 8192),
        ffn_hidden_size=config["intermediate_size"],
        tie_embeddings=config.get("tie_word_embeddings", False),
    )

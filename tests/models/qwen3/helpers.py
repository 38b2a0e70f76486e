"""Tiny Qwen3 models for the tests: ours on meta or initialised, and a random transformers one."""

import dataclasses

import pytest
import torch

from lockstep.models.qwen3 import QWEN3_FLAVORS, QWEN3_MOE_FLAVORS, Qwen3, hf_adapter

VOCAB = 97


def _meta(args) -> Qwen3:
    with torch.device("meta"):
        return Qwen3(args)


def tiny(flavor: str = "debug", moe: bool = False, seed: int = 0, **changes) -> Qwen3:
    table = QWEN3_MOE_FLAVORS if moe else QWEN3_FLAVORS
    model = _meta(dataclasses.replace(table[flavor], vocab_size=VOCAB, max_seq_len=32, **changes))
    model.init_weights(seed, "cpu")
    return model


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

"""Tiny Llama 4 models for the tests: ours on meta, args whose sequence spans several attention chunks
and temperature steps, and a random transformers Llama4ForCausalLM of that shape."""

import dataclasses

import pytest
import torch

from lockstep.models.common.rope import Llama3RopeScaling
from lockstep.models.llama4 import LLAMA4_FLAVORS, Llama4, Llama4Args, hf_adapter

transformers = pytest.importorskip("transformers")
VOCAB = 97


def _meta(args: Llama4Args) -> Llama4:
    with torch.device("meta"):
        return Llama4(args)


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

"""Llama 3 flavors: the published shapes and the 8B parameter count."""

import dataclasses

import torch

from lockstep.models.llama3 import LLAMA3_FLAVORS, Llama3


def test_flavor_shapes():
    assert LLAMA3_FLAVORS["8B"].ffn_hidden_dim == 14336
    assert LLAMA3_FLAVORS["70B"].ffn_hidden_dim == 28672
    assert LLAMA3_FLAVORS["405B"].ffn_hidden_dim == 53248
    assert LLAMA3_FLAVORS["1B"].ffn_hidden_dim == 8192
    assert LLAMA3_FLAVORS["3B"].ffn_hidden_dim == 8192
    debug = LLAMA3_FLAVORS["debug"]
    assert (debug.dim, debug.n_layers, debug.n_heads, debug.ffn_hidden_dim) == (256, 6, 16, 768)


def test_8b_parameter_count_on_meta():
    args = dataclasses.replace(LLAMA3_FLAVORS["8B"], vocab_size=128256)
    with torch.device("meta"):
        model = Llama3(args)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248

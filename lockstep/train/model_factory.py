"""Build a model: meta device, then the model transformations in their fixed order, then
materialise and initialise from the root seed (so any layout starts from identical weights)."""

from __future__ import annotations

import torch
from torch import nn

from lockstep.config.sections import ActivationCheckpointConfig, CompileConfig, ModelConfig
from lockstep.models.registry import model_args
from lockstep.parallel.activation_checkpoint import apply_activation_checkpointing
from lockstep.parallel.compile import apply_compile


def build_model(
    model: ModelConfig,
    activation_checkpoint: ActivationCheckpointConfig,
    compile_config: CompileConfig,
    vocab_size: int,
    seq_len: int,
    root_seed: int,
    device: torch.device,
) -> nn.Module:
    spec, args = model_args(model, vocab_size, seq_len)
    with torch.device("meta"):
        module = spec.build(args, model.attention)
    apply_activation_checkpointing(module.layers, activation_checkpoint)
    apply_compile(module.layers, compile_config)
    module.init_weights(root_seed, device)
    return module

"""Activation checkpointing per transformer block: full, every N-th block, or selective by op.

The block's ``forward`` is replaced on the instance rather than wrapping the module, so parameter
names (and hence seeded initial values, sharding plans and checkpoints) stay the same whether AC
is on or off. preserve_rng_state, determinism_check and debug go straight to torch's checkpoint.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lockstep.config.sections import ActivationCheckpointConfig
from lockstep.parallel.canonical_linear import tree_of_products

_aten = torch.ops.aten
SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    torch._higher_order_ops.flex_attention,
    tree_of_products._opoverload,
}
"""Selective AC keeps the outputs of these (the expensive ops) and recomputes everything else: the
matmuls, every attention kernel (FlexAttention's too, as SDPA's), and debug.deterministic's chunked
linears as one operator (their output, not the chunks' partial products)."""


def _save_matmuls_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_save_matmuls_policy)


def _checkpoint_forward(block: nn.Module, ac: ActivationCheckpointConfig, selective_ops: bool) -> None:
    original_forward = block.forward
    extra = {"context_fn": _selective_context} if selective_ops else {}

    @functools.wraps(original_forward)
    def forward(*args, **kwargs):
        return checkpoint(
            original_forward,
            *args,
            use_reentrant=False,
            preserve_rng_state=ac.preserve_rng_state,
            determinism_check=ac.determinism_check,
            debug=ac.debug,
            **extra,
            **kwargs,
        )

    block.forward = forward


def apply_activation_checkpointing(blocks: nn.ModuleDict, ac: ActivationCheckpointConfig) -> None:
    """Checkpoint the given transformer blocks as the AC section says (mode none: nothing)."""
    if ac.mode == "none":
        return
    every = int(ac.selective_ac_option) if ac.mode == "selective" and ac.selective_ac_option != "op" else 1
    for index, block in enumerate(blocks.values()):
        if index % every == 0:
            _checkpoint_forward(block, ac, selective_ops=ac.mode == "selective" and ac.selective_ac_option == "op")

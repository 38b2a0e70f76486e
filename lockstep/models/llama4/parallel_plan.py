"""Llama 4's tensor/sequence-parallel plan (Megatron-style, see lockstep.models.common.parallel_plan):
attention heads split as Llama 3's (its QK-norm has no weight, its temperature none either, so nothing
is shared across heads), dense SwiGLU blocks split, MoE blocks (shared expert included) whole on every
tensor-parallel rank (their experts are split by expert parallelism instead), the output projection
split by vocabulary."""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

from lockstep.models.common.parallel_plan import (
    check_divides,
    feed_forward_plan,
    grouped_query_attention_plan,
    moe_plan,
    root_plan,
)


def tensor_parallel_plan(model: nn.Module, loss_parallel: bool = True) -> dict[str, ParallelStyle]:
    """`loss_parallel`: the logits come back as a vocab-sharded DTensor (else as whole plain tensors)."""
    plan = root_plan(loss_parallel)
    for name, layer in model.layers.items():
        block = f"layers.{name}"
        plan |= grouped_query_attention_plan(block, layer.attention)
        plan |= feed_forward_plan(block) if hasattr(layer, "feed_forward") else moe_plan(block)
    return plan


def check_tensor_parallel_degree(args, degree: int) -> str | None:
    """Why `degree` cannot split this model's heads and dense blocks, or None if it can."""
    sizes = (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads))
    if args.n_moe_blocks < args.n_layers:
        sizes += (("ffn_hidden_dim", args.ffn_hidden_dim),)
    return check_divides(degree, sizes)

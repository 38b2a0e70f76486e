"""Qwen3's tensor/sequence-parallel plan (Megatron-style, see lockstep.models.common.parallel_plan):
attention heads split as Llama's, the QK-norm weights (shared by all heads) with their gradient summed
over the ranks, dense SwiGLU blocks split, MoE blocks whole on every tensor-parallel rank (their
experts are split by expert parallelism instead), the output projection, and a tied embedding with
it, split by vocabulary."""

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
    """Why `degree` cannot split this model's heads (and dense features), or None if it can."""
    sizes = (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads))
    if not args.is_moe:
        sizes += (("ffn_hidden_dim", args.ffn_hidden_dim),)
    return check_divides(degree, sizes)

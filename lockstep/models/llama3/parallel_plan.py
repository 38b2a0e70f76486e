"""Llama 3's tensor/sequence-parallel plan (Megatron-style, see lockstep.models.common.parallel_plan),
declared once, applied by lockstep.parallel: heads and the SwiGLU split, the residual stream sequence
sharded, the output projection split by vocabulary."""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

from lockstep.models.common.parallel_plan import (
    check_divides,
    feed_forward_plan,
    grouped_query_attention_plan,
    root_plan,
)


def tensor_parallel_plan(model: nn.Module, loss_parallel: bool = True) -> dict[str, ParallelStyle]:
    """`loss_parallel`: the logits come back as a vocab-sharded DTensor (else as whole plain tensors)."""
    plan = root_plan(loss_parallel)
    for name, layer in model.layers.items():
        plan |= grouped_query_attention_plan(f"layers.{name}", layer.attention) | feed_forward_plan(f"layers.{name}")
    return plan


def check_tensor_parallel_degree(args, degree: int) -> str | None:
    """Why `degree` cannot split this model's heads and features, or None if it can."""
    return check_divides(
        degree, (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads), ("ffn hidden dim", args.ffn_hidden_dim))
    )

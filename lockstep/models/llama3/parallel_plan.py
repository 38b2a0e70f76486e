"""Llama 3's tensor/sequence-parallel plan (Megatron-style), declared once, applied by lockstep.parallel.

Between blocks the residual stream is sharded over the sequence (Shard(1)); each attention and
feed-forward input is all-gathered, q/k/v and w1/w3 are split by output features (heads), wo and w2
by input features, whose partial sums are reduce-scattered back to sequence shards. Norms run on
sequence shards. The output projection is split by vocabulary: with loss parallelism the logits stay
sharded over it (a DTensor, Shard(-1)) and the cross-entropy runs on the shards under torch's
``loss_parallel()``, so no rank holds [B, S, vocab]; without it they are all-gathered whole (Replicate).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)


def tensor_parallel_plan(model: nn.Module, loss_parallel: bool = True) -> dict[str, ParallelStyle]:
    """`loss_parallel`: the logits come back as a vocab-sharded DTensor (else as whole plain tensors)."""
    plan: dict[str, ParallelStyle] = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    for name in model.layers:
        block = f"layers.{name}"
        plan |= {
            f"{block}.attention_norm": SequenceParallel(),
            f"{block}.attention": PrepareModuleInput(
                input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
            ),
            f"{block}.attention.wq": ColwiseParallel(),
            f"{block}.attention.wk": ColwiseParallel(),
            f"{block}.attention.wv": ColwiseParallel(),
            f"{block}.attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            f"{block}.ffn_norm": SequenceParallel(),
            f"{block}.feed_forward": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            ),
            f"{block}.feed_forward.w1": ColwiseParallel(),
            f"{block}.feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            f"{block}.feed_forward.w3": ColwiseParallel(),
        }
    return plan


def check_tensor_parallel_degree(args, degree: int) -> str | None:
    """Why `degree` cannot split this model's heads and features, or None if it can."""
    sizes = (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads), ("ffn hidden dim", args.ffn_hidden_dim))
    for what, size in sizes:
        if size % degree:
            return f"tensor_parallel_degree {degree} does not divide {what} = {size}"
    return None

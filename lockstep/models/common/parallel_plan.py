"""Pieces of the tensor/sequence-parallel plans (Megatron-style) that the model families share,
declared once; each family's ``parallel_plan.py`` assembles its own from them, and lockstep.parallel
applies it.

Between blocks the residual stream is sharded over the sequence (Shard(1)); each attention and
feed-forward input is all-gathered, q/k/v and w1/w3 are split by output features (heads), wo and w2
by input features, whose partial sums are reduce-scattered back to sequence shards. Norms run on
sequence shards. The output projection is split by vocabulary: with loss parallelism the logits stay
sharded over it (a DTensor, Shard(-1)) and the cross-entropy runs on the shards under torch's
``loss_parallel()``, so no rank holds [B, S, vocab]; without it they are all-gathered whole (Replicate).
A tied embedding is split by vocabulary like the output projection it shares its weight with
(lockstep.parallel.tensor_parallel ties the two again afterwards).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
)


def root_plan(loss_parallel: bool) -> dict[str, ParallelStyle]:
    """The embedding, the final norm and the output projection. `loss_parallel`: the logits come back
    as a vocab-sharded DTensor (else as whole plain tensors)."""
    return {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }


def grouped_query_decoder_plan(model: nn.Module, loss_parallel: bool = True) -> dict[str, ParallelStyle]:
    """The plan of a decoder of ``GroupedQueryAttention`` blocks whose feed-forward is a dense SwiGLU
    (split) or an MoE (whole on every rank): Llama 3, Qwen3, Llama 4. `loss_parallel`: the logits come
    back as a vocab-sharded DTensor (else as whole plain tensors)."""
    plan = root_plan(loss_parallel)
    for name, layer in model.layers.items():
        block = f"layers.{name}"
        plan |= grouped_query_attention_plan(block, layer.attention)
        plan |= feed_forward_plan(block) if hasattr(layer, "feed_forward") else moe_plan(block)
    return plan


def grouped_query_attention_plan(block: str, attention: nn.Module) -> dict[str, ParallelStyle]:
    """``GroupedQueryAttention`` (lockstep.models.common.attention) of block `block`, with its norm:
    heads split; a QK-norm weight, which every head shares, gets its gradient summed over the ranks."""
    plan: dict[str, ParallelStyle] = {
        f"{block}.attention_norm": SequenceParallel(),
        f"{block}.attention": PrepareModuleInput(
            input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
        ),
        f"{block}.attention.wq": ColwiseParallel(),
        f"{block}.attention.wk": ColwiseParallel(),
        f"{block}.attention.wv": ColwiseParallel(),
        f"{block}.attention.wo": RowwiseParallel(output_layouts=Shard(1)),
    }
    if attention.q_norm is not None:
        plan[f"{block}.attention.q_norm.share"] = HeadShareGradient()
        plan[f"{block}.attention.k_norm.share"] = HeadShareGradient()
    return plan


def feed_forward_plan(block: str) -> dict[str, ParallelStyle]:
    """The dense SwiGLU of block `block`, with its norm."""
    return {
        f"{block}.ffn_norm": SequenceParallel(),
        f"{block}.feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        f"{block}.feed_forward.w1": ColwiseParallel(),
        f"{block}.feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        f"{block}.feed_forward.w3": ColwiseParallel(),
    }


def moe_plan(block: str) -> dict[str, ParallelStyle]:
    """The MoE of block `block`, with its norm: the whole block on every TP rank (its experts are split
    by expert parallelism instead): gather its input, keep this rank's sequence shard of its output."""
    return {f"{block}.ffn_norm": SequenceParallel(), f"{block}.moe": WholeOnEveryRank()}


class AllReduceGradient(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (Megatron's "f")."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class HeadShareGradient(ParallelStyle):
    """On a ``SharedAcrossHeads``: the tensor it broadcasts to this rank's heads gets the gradient of all
    heads (the sum over this rank's heads, all-reduced over the group)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        group = device_mesh.get_group()
        module.forward = lambda x, heads: AllReduceGradient.apply(x, group).expand(-1, -1, heads, -1)
        return module


class WholeOnEveryRank(ParallelStyle):
    """Gather the sequence-sharded input, run the module replicated, return the local sequence shard."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        gather = PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        )
        shard = PrepareModuleOutput(output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),))
        return shard._apply(gather._apply(module, device_mesh), device_mesh)


def check_divides(degree: int, sizes: tuple[tuple[str, int], ...]) -> str | None:
    """Why `degree` cannot split one of the named sizes, or None."""
    for what, size in sizes:
        if size % degree:
            return f"tensor_parallel_degree {degree} does not divide {what} = {size}"
    return None

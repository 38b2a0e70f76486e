"""DeepSeek-V3's tensor/sequence-parallel plan: attention heads are split (q and kv up-projections
column-parallel, output row-parallel), dense blocks like Llama's, MoE blocks computed whole on every
tensor-parallel rank (their experts are split by expert parallelism instead).

MLA's low-rank down-projections (wq_a, wkv_a) and their norms stay plain replicated modules: the
column-parallel up-projections after them all-reduce their input gradients, so those modules get the
full gradient on every rank. The one exception is the RoPE part of the key, which all heads share and
no column-parallel layer consumes: ``SharedKeyRopeGradient`` all-reduces its gradient explicitly.
The output projection is split by vocabulary as in Llama's plan: with loss parallelism the logits stay
vocab-sharded for ``loss_parallel()``, without it they are gathered whole.
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


class _AllReduceGradient(torch.autograd.Function):
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


class SharedKeyRopeGradient(ParallelStyle):
    """On wkv_a: its output is [kv latent | key RoPE part]; the RoPE part's gradient is all-reduced."""

    def __init__(self, rope_dim: int) -> None:
        super().__init__()
        self.rope_dim = rope_dim

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        group, rope_dim = device_mesh.get_group(), self.rope_dim

        def hook(mod, args, output):
            latent, rope = output.split([output.shape[-1] - rope_dim, rope_dim], dim=-1)
            return torch.cat([latent, _AllReduceGradient.apply(rope, group)], dim=-1)

        module.register_forward_hook(hook)
        return module


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
    rope_dim = model.args.qk_rope_head_dim
    for name, layer in model.layers.items():
        block = f"layers.{name}"
        attention = layer.attention
        plan |= {
            f"{block}.attention_norm": SequenceParallel(),
            f"{block}.attention": PrepareModuleInput(
                input_layouts=(Shard(1), None, None),
                desired_input_layouts=(Replicate(), None, None),
                use_local_output=True,  # the replicated down-projections take plain tensors
            ),
            f"{block}.attention.{'wq' if hasattr(attention, 'wq') else 'wq_b'}": ColwiseParallel(),
            f"{block}.attention.wkv_a": SharedKeyRopeGradient(rope_dim),
            f"{block}.attention.wkv_b": ColwiseParallel(),
            f"{block}.attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            f"{block}.ffn_norm": SequenceParallel(),
        }
        if hasattr(layer, "feed_forward"):
            plan |= {
                f"{block}.feed_forward": PrepareModuleInput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                ),
                f"{block}.feed_forward.w1": ColwiseParallel(),
                f"{block}.feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
                f"{block}.feed_forward.w3": ColwiseParallel(),
            }
        else:  # the whole MoE block on every TP rank: gather its input, keep this rank's sequence shard of its output
            plan[f"{block}.moe"] = _WholeOnEveryRank()
    return plan


class _WholeOnEveryRank(ParallelStyle):
    """Gather the sequence-sharded input, run the module replicated, return the local sequence shard."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        gather = PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        )
        shard = PrepareModuleOutput(output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),))
        return shard._apply(gather._apply(module, device_mesh), device_mesh)


def check_tensor_parallel_degree(args, degree: int) -> str | None:
    for what, size in (("n_heads", args.n_heads), ("inter_dim", args.inter_dim)):
        if size % degree:
            return f"tensor_parallel_degree {degree} does not divide {what} = {size}"
    return None

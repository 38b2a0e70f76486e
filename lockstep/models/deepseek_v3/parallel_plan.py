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
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from lockstep.models.common.parallel_plan import (
    AllReduceGradient,
    check_divides,
    feed_forward_plan,
    moe_plan,
    root_plan,
)


class SharedKeyRopeGradient(ParallelStyle):
    """On wkv_a: its output is [kv latent | key RoPE part]; the RoPE part's gradient is all-reduced."""

    def __init__(self, rope_dim: int) -> None:
        super().__init__()
        self.rope_dim = rope_dim

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        group, rope_dim = device_mesh.get_group(), self.rope_dim

        def hook(mod, args, output):
            latent, rope = output.split([output.shape[-1] - rope_dim, rope_dim], dim=-1)
            return torch.cat([latent, AllReduceGradient.apply(rope, group)], dim=-1)

        module.register_forward_hook(hook)
        return module


def tensor_parallel_plan(model: nn.Module, loss_parallel: bool = True) -> dict[str, ParallelStyle]:
    """`loss_parallel`: the logits come back as a vocab-sharded DTensor (else as whole plain tensors)."""
    plan = root_plan(loss_parallel)
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
        }
        if hasattr(layer, "feed_forward"):
            plan |= feed_forward_plan(block)
        else:  # the whole MoE block on every TP rank (its experts are split by expert parallelism)
            plan |= moe_plan(block)
    return plan


def check_tensor_parallel_degree(args, degree: int) -> str | None:
    return check_divides(degree, (("n_heads", args.n_heads), ("inter_dim", args.inter_dim)))

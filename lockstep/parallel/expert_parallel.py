"""Expert parallelism over the "dp_shard" mesh axis: each rank holds E/ep of every MoE block's experts
(a DTensor Shard(0) of the grouped weights) and exchanges tokens with all-to-all.

The MoE block stays single-device code: it sorts its tokens by expert and calls ``experts.compute``;
``apply_expert_parallel`` swaps that method for one that sends each expert's tokens to the rank that
holds it, runs the local experts, and sends the results back. Both all-to-alls are autograd-aware and
move tokens in a fixed (source rank, expert, token) order, so dispatch and combine are deterministic.

FSDP ignores the expert weights, so its mixed-precision policy does not cast them: the local experts
are cast here to the dtype of the tokens they receive (bf16 under FSDP's bf16 policy), as FSDP would
cast its own parameters. The parameters and their AdamW state stay fp32, and the cast's backward
hands fp32 gradients to them.

With canonical reductions the local experts run once per source rank: each source rank's tokens are
one microbatch (EP borrows the FSDP axis, whose ranks hold the consecutive microbatches of one
micro-step), so each call computes exactly that microbatch's expert outputs and weight gradients, as
one process would, and the per-source weight gradients are summed in the canonical pairwise tree
over source ranks as they arrive (``_SharedCast``), a node of the tree over the global microbatch
index. The calls share one cast of each weight and the tree holds O(log ep) gradients, so memory does
not grow with the degree. Otherwise one
call takes all received tokens (one larger GEMM per expert; the sums then mix microbatches).

Host syncs: the all-to-alls need their split sizes as Python ints, so each forward (and each
activation-checkpoint recompute) makes exactly one device-to-host transfer, of 2 x ep integers.
Everything else (the regrouping permutation included) is built on the device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.nn.functional import all_to_all_single
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from lockstep.parallel.canonical import ArrivalTree


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, per_source: bool = False) -> list[nn.Parameter]:
    """Shard the experts of every MoE block of `model` over `ep_mesh`; returns the expert parameters
    (FSDP must leave them alone: they are already split over the same ranks). `per_source`: run the
    local experts once per source rank, weight gradients summed in canonical order."""
    expert_params = []
    for layer in model.layers.values():
        experts = getattr(getattr(layer, "moe", None), "experts", None)
        if experts is None:
            continue
        num_experts = experts.w1.shape[0]
        if num_experts % ep_mesh.size():
            raise ValueError(f"expert_parallel_degree {ep_mesh.size()} does not divide {num_experts} experts")
        for name in ("w1", "w2", "w3"):
            sharded = nn.Parameter(distribute_tensor(getattr(experts, name), ep_mesh, [Shard(0)]))
            setattr(experts, name, sharded)
            expert_params.append(sharded)
        experts.compute = functools.partial(_expert_parallel_compute, experts.compute, ep_mesh.get_group(), per_source)
    return expert_params


def _expert_parallel_compute(
    local_compute: Callable[..., torch.Tensor],
    group: dist.ProcessGroup,
    per_source: bool,
    x_sorted: torch.Tensor,
    counts: torch.Tensor,
    w1: DTensor,
    w2: DTensor,
    w3: DTensor,
) -> torch.Tensor:
    """x_sorted [T, dim]: this rank's token slots grouped by (global) expert; counts [E]: slots per expert."""
    ep = dist.get_world_size(group)
    send_counts = counts.view(ep, counts.shape[0] // ep)  # [destination rank, its local expert]
    recv_counts = torch.empty_like(send_counts)  # [source rank, my local expert]
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    # The layer's one host transfer: the all-to-alls take their split sizes as Python ints.
    input_splits, output_splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()
    num_received = sum(output_splits)
    received = all_to_all_single(
        x_sorted.new_empty(num_received, x_sorted.shape[1]), x_sorted, output_splits, input_splits, group
    )
    if per_source:  # received is (source rank, local expert)-major: one call per source rank
        shared = [_SharedCast(w.to_local(), x_sorted.dtype, ep) for w in (w1, w2, w3)]
        outputs = [
            local_compute(tokens, recv_counts[source], *(w.for_source(source) for w in shared))
            for source, tokens in enumerate(received.split(output_splits))
        ]
        back = torch.cat(outputs)
        return all_to_all_single(x_sorted.new_empty(x_sorted.shape), back, input_splits, output_splits, group)
    # Received slots are grouped (source rank, local expert); the experts want (local expert, source rank).
    expert_major_position = _regrouped_positions(recv_counts, num_received)
    source_major_position = _regrouped_positions(recv_counts.t(), num_received)
    weights = [w.to_local().to(x_sorted.dtype) for w in (w1, w2, w3)]
    local_out = local_compute(received[source_major_position], recv_counts.sum(0), *weights)
    back = local_out[expert_major_position]
    return all_to_all_single(x_sorted.new_empty(x_sorted.shape), back, input_splits, output_splits, group)


class _SharedCast:
    """One local expert weight, cast once to the compute dtype and handed to each source rank's call.

    Every call reads the same cast tensor (a view), so what the calls save for backward is one copy of
    the weight, whatever the degree. Each call's weight gradient is cast to fp32 as it arrives (exact:
    the cast is what one process's backward does for its microbatch) and fed to an ``ArrivalTree`` over
    the source ranks, the canonical tree of the microbatches those ranks hold; the call whose gradient
    completes the tree hands the total to the fp32 weight, the others hand nothing. Autograd runs the
    calls' backwards in reverse, so the tree holds at most log2(ep) + 1 partial sums."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, sources: int) -> None:
        self.weight = weight
        with torch.no_grad():
            self.cast = weight.to(dtype)
        self.tree = ArrivalTree(sources)

    def for_source(self, source: int) -> torch.Tensor:
        return SourceWeight.apply(self.weight, self, source)


class SourceWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, shared: _SharedCast, source: int) -> torch.Tensor:
        ctx.shared, ctx.source = shared, source
        return shared.cast.view_as(shared.cast)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        tree = ctx.shared.tree
        tree.add(ctx.source, grad.to(ctx.shared.weight.dtype))
        return (tree.result() if tree.arrived == tree.count else None), None, None


def _regrouped_positions(counts_AB: torch.Tensor, total: int) -> torch.Tensor:
    """Slots laid out in blocks (a, b), row-major, block (a, b) holding counts_AB[a, b] slots: for each
    slot, its position once the blocks are laid out (b, a) instead, each block's slots kept in order.
    `total` (the sum of the counts, known on the host) lets repeat_interleave skip its own sync."""
    rows, cols = counts_AB.shape
    counts = counts_AB.reshape(-1)
    start = torch.cumsum(counts, 0) - counts  # where block (a, b) starts now
    counts_BA = counts_AB.t().reshape(-1)
    start_after = (torch.cumsum(counts_BA, 0) - counts_BA).view(cols, rows).t().reshape(-1)  # ... and after
    block = torch.repeat_interleave(counts, output_size=total)  # the block of every slot
    return torch.arange(total, device=counts.device) - start[block] + start_after[block]

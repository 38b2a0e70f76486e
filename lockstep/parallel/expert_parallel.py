"""Expert parallelism over the "dp_shard" mesh axis: each rank holds E/ep of every MoE block's experts
(a DTensor Shard(0) of the grouped weights) and exchanges tokens with all-to-all.

The MoE block stays single-device code: it sorts its tokens by expert and calls ``experts.compute``;
``apply_expert_parallel`` swaps that method for one that sends each expert's tokens to the rank that
holds it, runs the local experts, and sends the results back. Both all-to-alls are autograd-aware and
move tokens in a fixed (source rank, expert, token) order, so dispatch and combine are deterministic.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.nn.functional import all_to_all_single
from torch.distributed.tensor import Shard, distribute_tensor


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> list[nn.Parameter]:
    """Shard the experts of every MoE block of `model` over `ep_mesh`; returns the expert parameters
    (FSDP must leave them alone: they are already split over the same ranks)."""
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
        experts.compute = functools.partial(_expert_parallel_compute, experts.compute, ep_mesh.get_group())
    return expert_params


def _expert_parallel_compute(local_compute, group, x_sorted, counts, w1, w2, w3) -> torch.Tensor:
    """x_sorted: this rank's token slots grouped by (global) expert; counts [E]: slots per expert."""
    ep = dist.get_world_size(group)
    local_experts = counts.shape[0] // ep
    send_counts = counts.view(ep, local_experts)  # [destination rank, its local expert]
    recv_counts = torch.empty_like(send_counts)  # [source rank, my local expert]
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    input_splits, output_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
    received = all_to_all_single(
        x_sorted.new_empty(sum(output_splits), x_sorted.shape[1]), x_sorted, output_splits, input_splits, group
    )
    # Received slots are grouped (source rank, local expert); the experts want (local expert, source rank).
    by_expert = _source_major_to_expert_major(recv_counts)
    local_out = local_compute(received[by_expert], recv_counts.sum(0), w1.to_local(), w2.to_local(), w3.to_local())
    back = local_out[torch.argsort(by_expert)]
    return all_to_all_single(x_sorted.new_empty(x_sorted.shape), back, input_splits, output_splits, group)


def _source_major_to_expert_major(recv_counts: torch.Tensor) -> torch.Tensor:
    """Permutation of received slot positions: from (source, expert) blocks to (expert, source) blocks."""
    sources, experts = recv_counts.shape
    starts = torch.cumsum(recv_counts.reshape(-1), 0) - recv_counts.reshape(-1)
    starts = starts.view(sources, experts)
    pieces = [
        torch.arange(int(starts[s, e]), int(starts[s, e] + recv_counts[s, e]), device=recv_counts.device)
        for e in range(experts)
        for s in range(sources)
    ]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=recv_counts.device)

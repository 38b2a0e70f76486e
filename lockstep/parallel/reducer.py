"""Sums over the mesh axes that hold partial results after backward, in canonical order when asked.

After backward each rank holds gradients summed over its own microbatches (and, under FSDP, over its
shard group). What is left: the replicate axis (DDP, or the replicas of HSDP) for gradients; the
whole data-parallel axis for the loss; the pipeline axis for the loss (only the last stage has it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from lockstep.config.job import ParallelDims
from lockstep.parallel.canonical import combine_nodes, tree_all_reduce
from lockstep.parallel.node_levels import AxisLevels
from lockstep.parallel.parallelize import BuiltModel
from lockstep.parallel.replicate import ReplicaGradientSum


def _group(mesh: DeviceMesh | None, axis: str, size: int):
    return mesh.get_group(axis) if mesh is not None and size > 1 else None


class CrossRankReducer:
    def __init__(
        self,
        mesh: DeviceMesh | None,
        *,
        dims: ParallelDims,
        layout_invariant_reductions: bool,
        levels: dict[str, AxisLevels] | None = None,
    ) -> None:
        """`levels`: the data-parallel axes split by node (``data_parallel_levels``), for two-level sums."""
        self.layout_invariant_reductions = layout_invariant_reductions
        self.replicate_levels = (levels or {}).get("dp_replicate")
        self.replicate_group = _group(mesh, "dp_replicate", dims.dp_replicate)
        self.dp_group = _group(mesh, "dp", dims.dp)
        self.pp_group = _group(mesh, "pp", dims.pp)

    def sum_counts(self, counts: list[int], device: torch.device) -> list[int]:
        """Integer counts summed over the data-parallel ranks, each rank passing its own (exact in any
        order): the step's valid tokens from every rank's own samples, in one small all-reduce."""
        if self.dp_group is None:
            return list(counts)
        total = torch.tensor(counts, dtype=torch.int64, device=device)
        dist.all_reduce(total, group=self.dp_group)
        return total.tolist()

    def _sum(self, flat: torch.Tensor, group) -> torch.Tensor:
        if self.layout_invariant_reductions:
            return tree_all_reduce(flat, group)
        dist.all_reduce(flat, group=group)
        return flat

    def replica_gradient_sum(
        self, model: BuiltModel, bucket_mb: float, fsdp_syncs_once: bool
    ) -> ReplicaGradientSum | None:
        """The replicate-axis gradient sum, hooked on the tensors that hold each final gradient: the
        parameters themselves (FSDP's are its shards). FSDP-managed ones are final after their
        micro-step's reduce-scatter, except in pipeline stages that sync once after the last
        microbatch (`fsdp_syncs_once`: the tree is not kept on the shards); everything else
        accumulates every microbatch."""
        if self.replicate_group is None:
            return None
        replica_sum = ReplicaGradientSum(
            self.replicate_group, layout_invariant_reductions=self.layout_invariant_reductions, bucket_bytes=int(bucket_mb * 2**20),
            levels=self.replicate_levels,
        )  # fmt: skip
        unmanaged = {id(p) for p in model.unmanaged_params}
        params = [p for part in model.parts for p in part.parameters()]
        synced_once = bool(model.fsdp_modules) and model.pipeline is not None and fsdp_syncs_once
        replica_sum.watch([p for p in params if id(p) not in unmanaged], per_microbatch=not synced_once)
        replica_sum.watch([p for p in params if id(p) in unmanaged], per_microbatch=True)
        return replica_sum

    def global_loss(self, loss: torch.Tensor, node_levels: list[list[int]] | None = None) -> torch.Tensor:
        """This rank's share of the loss -> the global batch's loss, on every rank. Stages other than
        the last contribute 0, so the pipeline sum adds exact zeros. With `node_levels` (one list per
        data-parallel rank) `loss` holds one value per node of this rank's block, and all ranks' nodes
        are combined in canonical order."""
        if self.dp_group is not None and node_levels is not None:
            loss = _combine_all_nodes(loss, node_levels, self.dp_group)
        elif self.dp_group is not None:
            loss = self._sum(loss.reshape(1), self.dp_group)
        if self.pp_group is not None:
            dist.all_reduce(loss, group=self.pp_group)
        return loss.reshape(())


def _combine_all_nodes(loss: torch.Tensor, node_levels: list[list[int]], group) -> torch.Tensor:
    width = max(len(levels) for levels in node_levels)
    padded = torch.zeros(width, dtype=loss.dtype, device=loss.device)
    padded[: loss.numel()] = loss
    gathered = torch.empty(len(node_levels) * width, dtype=loss.dtype, device=loss.device)
    dist.all_gather_single(gathered, padded, group=group)
    rows = gathered.view(len(node_levels), width)
    nodes = [rows[rank, i].reshape(1) for rank, levels in enumerate(node_levels) for i in range(len(levels))]
    return combine_nodes(nodes, [level for levels in node_levels for level in levels])


def agreed_problem(problem: str | None, group: dist.ProcessGroup | None = None) -> str | None:
    """The first problem any rank of `group` found (each may check only its own share), or None, the same on
    every rank: so that all take the same decision, and none goes on alone into a collective the others
    left."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return problem
    found: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(found, problem, group=group)
    return next((p for p in found if p), None)


def any_rank_flag(flag: bool, device: torch.device) -> torch.Tensor:
    """1 on every rank if `flag` is True on any, else 0 (so all ranks stop after the same step); left
    on the device, for the caller to read with the step's other values in one transfer."""
    box = torch.tensor([float(flag)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return box.reshape(())

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
from lockstep.parallel.canonical import local_tensor, tree_all_reduce


def _group(mesh: DeviceMesh | None, axis: str, size: int):
    return mesh.get_group(axis) if mesh is not None and size > 1 else None


class CrossRankReducer:
    def __init__(self, mesh: DeviceMesh | None, dims: ParallelDims, canonical: bool) -> None:
        self.canonical = canonical
        self.replicate_group = _group(mesh, "dp_replicate", dims.dp_replicate)
        self.dp_group = _group(mesh, "dp", dims.dp)
        self.pp_group = _group(mesh, "pp", dims.pp)

    def _sum(self, flat: torch.Tensor, group) -> torch.Tensor:
        if self.canonical:
            return tree_all_reduce(flat, group)
        dist.all_reduce(flat, group=group)
        return flat

    def sum_replicas(self, grads: list[torch.Tensor]) -> None:
        """Sum gradients over the replicate axis, in place, through one flat buffer."""
        if self.replicate_group is None:
            return
        local = [local_tensor(g) for g in grads]
        flat = self._sum(torch.cat([t.reshape(-1) for t in local]), self.replicate_group)
        for t, piece in zip(local, flat.split([t.numel() for t in local]), strict=True):
            t.copy_(piece.view_as(t))

    def global_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """This rank's share of the loss -> the global batch's loss, on every rank. Stages other than
        the last contribute 0, so the pipeline sum adds exact zeros."""
        if self.dp_group is not None:
            loss = self._sum(loss.reshape(1), self.dp_group)
        if self.pp_group is not None:
            dist.all_reduce(loss, group=self.pp_group)
        return loss.reshape(())


def any_rank_flag(flag: bool, device: torch.device) -> torch.Tensor:
    """1 on every rank if `flag` is True on any, else 0 (so all ranks stop after the same step); left
    on the device, for the caller to read with the step's other values in one transfer."""
    box = torch.tensor([float(flag)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return box.reshape(())

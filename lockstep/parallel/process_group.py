"""Start and stop torch.distributed from the environment that torchrun (or SLURM via torchrun) sets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int
    ranks_per_node: int = 1
    """LOCAL_WORLD_SIZE: torchrun numbers a node's ranks consecutively, so rank // ranks_per_node is the
    node. The canonical reductions keep their slow-link traffic to a node's partial sums by it."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> WorldInfo:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them; one process without them."""
    return WorldInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        ranks_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))),
    )


def init_process_group(
    world: WorldInfo, device: torch.device, single: bool = False, timeout: timedelta = timedelta(minutes=10)
) -> None:
    """gloo on CPU, NCCL on CUDA; nothing for a single process, unless `single` asks for a group of one
    (FSDP's mixed precision runs over a mesh, even of one rank).

    On CUDA the process first makes its GPU (LOCAL_RANK unless `device` names one) the current device:
    otherwise every rank of a node would put NCCL's communicator, and any CUDA work that names no
    device, on GPU 0. ``device_id`` then binds the communicator to that GPU when the group is created
    (NCCL's eager init) instead of at the first collective, which would have to guess the device."""
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", world.local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if dist.is_initialized() or (world.world_size == 1 and not single):
        return
    if world.world_size == 1:  # no torchrun, no rendezvous: an in-memory store
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        rank=world.rank,
        world_size=world.world_size,
        timeout=timeout,
        device_id=device if cuda else None,
    )


def destroy_process_group(barrier: bool = True) -> None:
    """Tear down cleanly: gloo otherwise sometimes aborts at interpreter exit. After a failure pass
    barrier=False: a peer that died or failed elsewhere would never arrive, and the barrier would hold
    this rank for the whole collective timeout instead of letting it exit (and torchrun tear down)."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()

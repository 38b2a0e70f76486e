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

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> WorldInfo:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them; one process without them."""
    return WorldInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def init_process_group(world: WorldInfo, device: torch.device) -> None:
    """gloo on CPU, NCCL on CUDA; nothing for a single process."""
    if world.world_size == 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.world_size, timeout=timedelta(minutes=10))


def destroy_process_group(barrier: bool = True) -> None:
    """Tear down cleanly: gloo otherwise sometimes aborts at interpreter exit. After a failure pass
    barrier=False: a peer that died or failed elsewhere would never arrive, and the barrier would hold
    this rank for the whole collective timeout instead of letting it exit (and torchrun tear down)."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()

"""After each optimizer step: the auxiliary-loss-free expert-bias update of every MoE block, from the
step's token counts summed over data-parallel ranks, and the per-layer load statistics for metrics.

Nothing here waits for the device: the statistics stay a tensor (``MoEStats``) until someone reads
them, which costs one host sync for all layers; a trainer reads them only on the steps it logs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lockstep.models.common.moe import MoE


@dataclass(frozen=True)
class MoEStats:
    """One step's load statistics of this rank's MoE layers, on the device."""

    layers: list[str]
    """Layer names ("layers.N"), in layer order."""
    values: torch.Tensor
    """[layers, len(MoE.LOAD_STATS)] fp32."""

    def as_floats(self) -> dict[str, float]:
        """{"moe/<layer>/<stat>": value}, with one device-to-host transfer for all layers."""
        rows = self.values.tolist() if self.layers else []
        return {
            f"moe/{layer}/{stat}": value
            for layer, row in zip(self.layers, rows, strict=True)
            for stat, value in zip(MoE.LOAD_STATS, row, strict=True)
        }


def moe_blocks(parts: list[nn.Module]) -> list[tuple[str, nn.Module]]:
    """(layer name, MoE module) of this rank's stages, in layer order."""
    found = []
    for part in parts:
        for name, layer in part.layers.items():
            if hasattr(layer, "moe"):
                found.append((f"layers.{name}", layer.moe))
    return found


def move_expert_biases(blocks: list[tuple[str, nn.Module]], speed: float, dp_group) -> MoEStats:
    """Sum every block's counts over the data-parallel ranks (integers in fp32: exact in any order) and
    move the biases, without a host sync; returns the statistics, still on the device."""
    if not blocks:
        return MoEStats([], torch.zeros(0, len(MoE.LOAD_STATS)))
    counts = torch.stack([moe.tokens_per_expert for _, moe in blocks])
    if dp_group is not None:
        dist.all_reduce(counts, group=dp_group)
    values = torch.stack([moe.update_expert_bias(c, speed) for (_, moe), c in zip(blocks, counts, strict=True)])
    return MoEStats([name for name, _ in blocks], values)


def pool_over_stages(stats: dict[str, float], stage_group) -> dict[str, float]:
    """Every pipeline stage's MoE statistics on every rank (each stage holds its own layers)."""
    if stage_group is None:
        return stats
    pooled: list[dict] = [{} for _ in range(dist.get_world_size(stage_group))]
    dist.all_gather_object(pooled, stats, group=stage_group)
    return {k: v for part in pooled for k, v in sorted(part.items())}

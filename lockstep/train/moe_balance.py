"""After each optimizer step: the auxiliary-loss-free expert-bias update of every MoE block, from the
step's token counts summed over data-parallel ranks, and the per-layer load statistics for metrics."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def moe_blocks(parts: list[nn.Module]) -> list[tuple[str, nn.Module]]:
    """(layer name, MoE module) of this rank's stages, in layer order."""
    found = []
    for part in parts:
        for name, layer in part.layers.items():
            if hasattr(layer, "moe"):
                found.append((f"layers.{name}", layer.moe))
    return found


def update_expert_biases(blocks: list[tuple[str, nn.Module]], speed: float, dp_group) -> dict[str, float]:
    """Sum every block's counts over the data-parallel ranks (integers in fp32: exact in any order),
    move the biases, and return {"moe/<layer>/<stat>": value}."""
    if not blocks:
        return {}
    counts = torch.stack([moe.tokens_per_expert for _, moe in blocks])
    if dp_group is not None:
        dist.all_reduce(counts, group=dp_group)
    stats = {}
    for (name, moe), global_counts in zip(blocks, counts, strict=True):
        for key, value in moe.update_expert_bias(global_counts, speed).items():
            stats[f"moe/{name}/{key}"] = value
    return stats


def pool_over_stages(stats: dict[str, float], stage_group) -> dict[str, float]:
    """Every pipeline stage's MoE statistics on every rank (each stage holds its own layers)."""
    if stage_group is None:
        return stats
    pooled: list[dict] = [{} for _ in range(dist.get_world_size(stage_group))]
    dist.all_gather_object(pooled, stats, group=stage_group)
    return {k: v for part in pooled for k, v in sorted(part.items())}

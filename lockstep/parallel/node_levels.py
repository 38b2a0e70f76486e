"""Canonical reductions in two levels: inside a node, then across nodes, so that the slow links carry
what a hierarchical ring carries and no more.

A flat canonical reduce-scatter (one all-to-all over the axis, then the tree over source ranks) sends
almost all of a rank's bytes to other nodes: with G ranks per node, (W - G) of its W chunks. NCCL's
hierarchical algorithms reduce inside the node first and send only the node's partial sums out. The
canonical tree allows the same, because a node's ranks hold a subtree of it:

- the axis ranks of one node are consecutive in axis order (the mesh puts the data-parallel axes
  outside tensor parallelism, and torchrun numbers a node's ranks consecutively); the largest power
  of two g that divides their count splits them into aligned runs of g, and an aligned run of 2^k
  leaves is a node of the canonical tree over any count (``canonical_nodes``);
- so the tree over W = n x g sources equals the tree over the n run sums of the trees over each run's
  g sources (``tree_reduce_rows`` over W rows is the binary counter of W's digits, which are n's digits
  shifted by log2 g: each of its runs is a whole number of g-runs);
- level 1 (the inner group, one node's run of g ranks): an all-to-all inside the node and the tree
  over the g sources, leaving each rank the run's sum of 1/g of the buffer;
- level 2 (the outer group, the ranks at the same position of every run): an all-to-all of that 1/g
  between the n runs and the tree over the n run sums.

Every element is summed by the tree over the W sources in rank order, whatever n and g are: the bits do
not depend on the node count, the ranks per node or the layout. Per rank, a reduce-scatter of S bytes
sends S (g-1)/g inside the node and S/g (n-1)/n between nodes: a hierarchical ring's bytes per link
class. An all-reduce is that reduce-scatter plus the two all-gathers in reverse, twice the bytes.

Where an axis's ranks on a node are not consecutive runs of one size (a hand-made process group), the
reduction is the flat one (one all-to-all), still canonical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from lockstep.config.job import ParallelDims


def _all_gather(output: torch.Tensor, mine: torch.Tensor, group: dist.ProcessGroup) -> None:
    """torch 2.13 deprecates all_gather_into_tensor for all_gather_single (same arguments); older torch has
    only the former. Looked up at each call, so a counter that wraps torch.distributed sees it."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, mine, group=group)


def tree_reduce_rows_(rows: torch.Tensor) -> torch.Tensor:
    """``tree_reduce_rows`` in place: the same additions of the same operands, so the same bits, written
    into the rows themselves instead of fresh halves. Returns a view of row 0, which holds the total."""
    count, start, total = rows.shape[0], 0, None
    if count == 0:
        raise ValueError("tree_reduce_rows_ of no rows")
    for bit in reversed(range(count.bit_length())):
        if count >> bit & 1:
            run = rows[start : start + (1 << bit)]
            while run.shape[0] > 1:
                run[0::2].add_(run[1::2])
                run = run[0::2]
            total = run[0] if total is None else total.add_(run[0])
            start += 1 << bit
    return total


@dataclass(frozen=True)
class AxisLevels:
    """One mesh axis's process group split into this rank's two levels."""

    @staticmethod
    def flat(group: dist.ProcessGroup) -> AxisLevels:
        """One level: the whole group as the outer one (one all-to-all)."""
        return AxisLevels(group=group, inner=None, outer=group, inner_size=1, outer_size=dist.get_world_size(group))

    group: dist.ProcessGroup
    inner: dist.ProcessGroup | None
    """This rank's run of g consecutive axis ranks on its node (None when g is 1)."""
    outer: dist.ProcessGroup | None
    """The axis ranks at this rank's position in every run, in axis order (None when there is one run)."""
    inner_size: int
    outer_size: int


def run_length(ranks: list[int], ranks_per_node: int) -> int:
    """g for one axis group (global ranks in axis order): the largest power of two dividing the length of
    the runs of consecutive ranks that share a node, or 1 when the runs are not all of one length."""
    nodes = [rank // ranks_per_node for rank in ranks]
    runs, start = [], 0
    for i in range(1, len(nodes) + 1):
        if i == len(nodes) or nodes[i] != nodes[start]:
            runs.append(i - start)
            start = i
    if len(set(runs)) != 1 or len(set(nodes)) != len(runs):  # a node must hold one run
        return 1
    return runs[0] & -runs[0]


def axis_levels(mesh: DeviceMesh, axis: str, ranks_per_node: int) -> AxisLevels:
    """This rank's two levels of `axis`, as the axis unflattened into (runs, run length) by DeviceMesh
    (which creates the groups of every rank; all ranks call it, in the same order)."""
    dim = mesh.mesh_dim_names.index(axis)
    size = mesh.mesh.shape[dim]
    slices = [row.tolist() for row in mesh.mesh.movedim(dim, -1).reshape(-1, size)]
    lengths = {run_length(ranks, ranks_per_node) for ranks in slices}
    g = lengths.pop() if len(lengths) == 1 else 1
    n = size // g
    group = mesh.get_group(axis)
    if g == 1 or n == 1:
        inner, outer = (group if n == 1 < g else None), (group if g == 1 < n else None)
        return AxisLevels(group=group, inner=inner, outer=outer, inner_size=g, outer_size=n)
    split = mesh._unflatten(axis, (n, g), (f"{axis}_runs", f"{axis}_in_run"))
    return AxisLevels(
        group=group, inner=split.get_group(f"{axis}_in_run"), outer=split.get_group(f"{axis}_runs"),
        inner_size=g, outer_size=n,
    )  # fmt: skip


def reduce_scatter_levels(output: torch.Tensor, flat: torch.Tensor, levels: AxisLevels) -> None:
    """Canonical reduce-scatter of `flat` ([W x chunk], chunk i for axis rank i, FSDP's layout) into
    `output` (this rank's chunk), in two levels. `flat` is overwritten (it becomes a receive buffer):
    one extra buffer of its size and one of 1/g of it, whatever the degree."""
    g, n = levels.inner_size, levels.outer_size
    chunk = output.numel()
    by_run = flat.view(n, g, chunk)
    if levels.inner is not None:
        if n == 1:
            send, received = flat, torch.empty_like(flat)
        else:  # [g, n, chunk]: what inner peer p needs, together
            send, received = by_run.transpose(0, 1).contiguous().view(-1), flat
        dist.all_to_all_single(received, send, group=levels.inner)
        del send
        run_sums = tree_reduce_rows_(received.view(g, n * chunk))  # this run's sums of chunks (k, p), all k
    else:
        run_sums = flat
    if levels.outer is not None:
        received = torch.empty_like(run_sums)
        dist.all_to_all_single(received, run_sums, group=levels.outer)
        run_sums = tree_reduce_rows_(received.view(n, chunk))
    output.copy_(run_sums.view_as(output))


def all_reduce_levels(flat: torch.Tensor, levels: AxisLevels) -> torch.Tensor:
    """Canonical all-reduce of a 1-D buffer whose length is a multiple of W, in place: the reduce-scatter
    in two levels, then the all-gathers in reverse. Here the chunks are assigned position-major (rank at
    position p of run k owns chunk p x n + k), which needs no transposed copy."""
    received = torch.empty_like(flat)
    first = levels.inner if levels.inner is not None else levels.outer
    dist.all_to_all_single(received, flat, group=first)
    return finish_all_reduce_levels(flat, received, levels)


def finish_all_reduce_levels(flat: torch.Tensor, received: torch.Tensor, levels: AxisLevels) -> torch.Tensor:
    """The rest of ``all_reduce_levels`` once its first all-to-all (inside the node, or across nodes when
    a node holds one rank of the axis) has delivered `received`; may start that all-to-all early (async)."""
    g, n = levels.inner_size, levels.outer_size
    chunk = flat.numel() // (g * n)
    if levels.inner is None:
        mine = tree_reduce_rows_(received.view(n, chunk)).contiguous()
        _all_gather(flat, mine, group=levels.outer)
        return flat
    part = tree_reduce_rows_(received.view(g, n * chunk))  # this position's block, summed over the run
    if levels.outer is not None:
        across = torch.empty_like(part)
        dist.all_to_all_single(across, part.contiguous(), group=levels.outer)
        mine = tree_reduce_rows_(across.view(n, chunk)).contiguous()
        part = received[: n * chunk]  # row 0, free again: the block summed over every run
        _all_gather(part, mine, group=levels.outer)
    _all_gather(flat, part.contiguous(), group=levels.inner)
    return flat


def data_parallel_levels(mesh: DeviceMesh | None, dims: ParallelDims, ranks_per_node: int) -> dict[str, AxisLevels]:
    """The node levels of each data-parallel axis the canonical reductions sum over (FSDP's shard axis,
    the replicate axis), keyed by axis; created on every rank in the same order."""
    if mesh is None:
        return {}
    sizes = {"dp_shard": dims.dp_shard, "dp_replicate": dims.dp_replicate}
    return {axis: axis_levels(mesh, axis, ranks_per_node) for axis, size in sizes.items() if size > 1}


def levels_record(levels: dict[str, AxisLevels]) -> dict[str, dict[str, int]]:
    """For env.json: each summed axis's run length inside a node and the number of runs across nodes."""
    return {axis: {"in_node": lv.inner_size, "across_nodes": lv.outer_size} for axis, lv in levels.items()}

"""Reductions with one fixed summation order, whatever the number of ranks.

Floating-point addition is not associative, so a gradient summed as ((g0+g1)+g2)+g3 in one process
and as (g0+g2)+(g1+g3) across two ranks differs in the last bits. lockstep defines the gradient
of a step as a pairwise tree over the *global* microbatch index, ((g0+g1)+(g2+g3)), and computes
exactly that tree in every layout:

- within a rank, a binary-counter accumulator (``TreeSum``) adds microbatch results as they come,
  keeping at most log2(m)+1 partial sums;
- microbatches are placed so that every partial sum is a complete subtree of the global tree
  (lockstep.data.loader.placement): a contiguous block per rank when the rank sums its own tree
  first, or strided over the FSDP shard ranks when each micro-step is reduce-scattered at once and
  the tree over micro-steps is kept on the shards;
- across ranks, ``tree_all_reduce`` (all-to-all, a local tree per chunk, all-gather) finishes the
  tree in rank order, identically on every rank (``all_reduce(SUM)`` fixes no order beyond two
  operands).

See docs/layout-invariance.md.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from lockstep.parallel.node_levels import AxisLevels, all_reduce_levels, reduce_scatter_levels, tree_reduce_rows_


class TreeSum:
    """Pairwise sum of a stream of equally shaped tensor lists, in binary-counter order.

    After 2^k items the result is the complete pairwise tree over them; otherwise the remaining
    partial sums are combined from the largest (oldest) to the smallest.
    """

    def __init__(self) -> None:
        self._stack: list[tuple[int, list[torch.Tensor]]] = []

    def add(self, tensors: list[torch.Tensor], level: int = 0) -> None:
        """Add the next item: one leaf, or (``level`` k) the finished sum of the next 2^k leaves. Fed
        aligned blocks in order, the result is bitwise that of feeding their leaves one by one."""
        item = tensors
        while self._stack and self._stack[-1][0] == level:
            _, left = self._stack.pop()
            torch._foreach_add_(left, item)
            level, item = level + 1, left
        self._stack.append((level, item))

    def numel(self) -> int:
        """Elements held on this rank by the partial sums (a DTensor counts its local shard)."""
        return sum(local_tensor(t).numel() for _, item in self._stack for t in item)

    def result(self) -> list[torch.Tensor]:
        if not self._stack:
            raise ValueError("TreeSum.result() before any add()")
        _, total = self._stack[0]
        for _, item in self._stack[1:]:
            torch._foreach_add_(total, item)
        return total


class ArrivalTree:
    """The canonical tree over `count` leaves (``tree_reduce_rows``' order) fed in any order: a leaf, or a
    finished node, is added to its sibling as soon as both are here (left operand first, as the tree
    adds them), and the binary-counter runs are added left to right once all have arrived. Fed in
    order it holds at most log2(count) + 1 partial sums; fed in reverse (as autograd runs backward) as
    many when the count is a power of two, and somewhat more otherwise (10 for 63 leaves, against 6.98)."""

    def __init__(self, count: int) -> None:
        self.count, self.arrived = count, 0
        self._runs: list[tuple[int, int]] = []  # (start, size) by the count's binary digits, largest first
        start = 0
        for bit in reversed(range(count.bit_length())):
            if count >> bit & 1:
                self._runs.append((start, 1 << bit))
                start += 1 << bit
        self._nodes: dict[tuple[int, int], torch.Tensor] = {}

    def add(self, index: int, leaf: torch.Tensor) -> None:
        run_start, run_size = next(run for run in self._runs if run[0] <= index < run[0] + run[1])
        start, size, node = index, 1, leaf
        while size < run_size:
            sibling = run_start + ((start - run_start) ^ size)
            other = self._nodes.pop((sibling, size), None)
            if other is None:
                break
            node = other + node if sibling < start else node + other
            start, size = min(start, sibling), size * 2
        self._nodes[(start, size)] = node
        self.arrived += 1

    def result(self) -> torch.Tensor:
        if self.arrived != self.count:
            raise RuntimeError(f"ArrivalTree.result() after {self.arrived} of {self.count} leaves")
        total = self._nodes[self._runs[0]]
        for run in self._runs[1:]:
            total = total + self._nodes[run]
        return total


def canonical_nodes(start: int, count: int) -> list[int]:
    """The levels of the nodes of the canonical tree that tile the block [start, start + count) of
    leaves, in order: greedily the largest run of 2^k leaves that starts at a multiple of 2^k and fits.
    Every such run is a node of the tree over any total count (TreeSum forms it), so a rank that sums
    these nodes, and feeds every rank's nodes in order to ``TreeSum`` at their levels, gets the tree."""
    levels, position, end = [], start, start + count
    while position < end:
        level = 0
        while position % (2 << level) == 0 and position + (2 << level) <= end:
            level += 1
        levels.append(level)
        position += 1 << level
    return levels


def combine_nodes(nodes: list[torch.Tensor], levels: list[int]) -> torch.Tensor:
    """The canonical sum of consecutive nodes (all ranks' ``canonical_nodes``, in order)."""
    total = TreeSum()
    for node, level in zip(nodes, levels, strict=True):
        total.add([node], level=level)
    return total.result()[0]


def tree_reduce_rows(rows: torch.Tensor) -> torch.Tensor:
    """The canonical tree over dim 0, for any length: the order ``TreeSum`` adds the rows in. For a
    power of two the pairwise tree ((r0+r1)+(r2+r3)); otherwise the pairwise trees of the runs given by
    the length's binary digits (6 = 4 + 2: rows 0-3, rows 4-5), largest first, added left to right.
    ``tree_reduce_rows_`` on a copy (the same additions, so the same bits), leaving `rows` as they are."""
    if rows.shape[0] == 0:
        raise ValueError("tree_reduce_rows of no rows")
    return tree_reduce_rows_(rows.clone()).clone()


def tree_all_reduce(
    flat: torch.Tensor, group: dist.ProcessGroup | None = None, levels: AxisLevels | None = None
) -> torch.Tensor:
    """Sum a 1-D tensor over the ranks of `group` as the canonical tree in rank order (``tree_reduce_rows``:
    any world size); the result is bitwise the same on every rank.

    Built as a reduce-scatter (all-to-all, then each rank finishes the tree for its chunk) followed
    by an all-gather: every element is summed in the same order as a one-process tree, and the bytes
    moved are those of a ring all-reduce (an all-gather of whole buffers would move D times more).
    With `levels` (the group's node levels) both run inside the node first and across nodes second
    (``all_reduce_levels``): a hierarchical ring's bytes per link class."""
    group = levels.group if levels is not None else group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if world == 1:
        return flat
    levels = levels or AxisLevels.flat(group)
    numel = flat.numel()
    padded = torch.zeros(-(-numel // world) * world, dtype=flat.dtype, device=flat.device)
    padded[:numel] = flat
    return all_reduce_levels(padded, levels)[:numel]


class GradientTree:
    """Sums each parameter's per-microbatch gradients in binary-counter tree order as autograd produces
    them, whoever drives the backward passes (the trainer's loop or a pipeline schedule).

    A post-accumulate-grad hook moves every fresh ``.grad`` into the parameter's ``TreeSum`` and
    clears it (with one microbatch, and no nodes kept apart, the tree of one leaf is the gradient itself,
    so the hook only counts its size); when the step's last microbatch arrives it puts the tree's total back into ``.grad``,
    so what runs next (FSDP's reduce-scatter, the cross-replica sum, the optimizer) sees one sum in
    canonical order. Under FSDP the watched tensors are the sharded parameters, into which FSDP
    reduce-scatters every micro-step's gradient (pipeline stages included) and then calls the same
    hooks (``watch_sharded``: the tree lives on the shards).
    """

    def __init__(self) -> None:
        self._watched: set[int] = set()
        self._trees: dict[torch.Tensor, tuple[TreeSum, list[int]]] = {}
        self._nodes: dict[torch.Tensor, list[torch.Tensor]] = {}
        self._node_sizes: list[int] | None = None
        self._microbatches = 0
        self._held_numel = 0
        self.peak_held_numel = 0
        """Most gradient elements the partial sums held at once on this rank in the last step (the
        final sums, which become ``.grad``, included): the accumulation's memory cost."""

    def watch(self, params) -> None:
        for p in params:
            if p.requires_grad and id(p) not in self._watched:
                self._watched.add(id(p))
                p.register_post_accumulate_grad_hook(self._on_gradient)

    def watch_sharded(self, fsdp_modules: list[nn.Module]) -> None:
        """Watch each FSDP module's sharded parameters. FSDP runs their post-accumulate-grad hooks
        itself, right after it writes a reduce-scattered gradient shard (in its reduce-scatter
        stream, so the tree's additions are ordered before the optimizer reads ``.grad``). With
        gradient sync on at every micro-step, the per-rank tree then holds shards only."""
        for module in fsdp_modules:
            self.watch(sharded_parameters(module))

    def begin_step(self, num_microbatches: int, node_levels: list[int] | None = None) -> None:
        """`node_levels`: this rank's block is not one node of the canonical tree but these nodes
        (``canonical_nodes``), each kept apart for the sum across replicas (``nodes``); ``.grad`` then
        holds the first."""
        self._trees.clear()
        self._nodes.clear()
        self._microbatches = num_microbatches
        self._node_sizes = [1 << level for level in node_levels] if node_levels and len(node_levels) > 1 else None
        self._held_numel = self.peak_held_numel = 0

    def nodes(self, param: torch.Tensor) -> list[torch.Tensor] | None:
        """The sums of this rank's nodes for `param` (one per node level given to begin_step), or None."""
        return self._nodes.get(param)

    def _on_gradient(self, param: torch.Tensor) -> None:
        if self._microbatches == 1 and self._node_sizes is None:  # a tree of one leaf: the gradient itself
            self._held_numel += local_tensor(param.grad).numel()
            self.peak_held_numel = max(self.peak_held_numel, self._held_numel)
            return
        tree, count = self._trees.setdefault(param, (TreeSum(), [0]))
        self._held_numel -= tree.numel()
        tree.add([param.grad])
        self._held_numel += tree.numel()
        self.peak_held_numel = max(self.peak_held_numel, self._held_numel)
        count[0] += 1
        if self._node_sizes is None:
            param.grad = tree.result()[0] if count[0] == self._microbatches else None
            return
        done = self._nodes.setdefault(param, [])
        if count[0] == sum(self._node_sizes[: len(done) + 1]):  # this node's last leaf
            done.append(tree.result()[0])
            self._trees[param] = (TreeSum(), count)
        param.grad = done[0] if count[0] == self._microbatches else None

    def check_complete(self) -> None:
        """Every parameter that got gradients got one per microbatch (else the tree would be wrong); with
        one microbatch there is no tree to spoil, and autograd accumulates a second gradient itself."""
        partial = [count[0] for _, count in self._trees.values() if count[0] != self._microbatches]
        if partial:
            raise RuntimeError(
                f"{len(partial)} parameters got {sorted(set(partial))} gradients this step, expected one per "
                f"microbatch ({self._microbatches}); the canonical gradient tree cannot be formed"
            )


def sharded_parameters(fsdp_module: nn.Module) -> list[nn.Parameter]:
    """The parameters an FSDP module manages itself (not its submodules'), as sharded DTensors."""
    state = fsdp_module._get_fsdp_state()
    return [fp.sharded_param for group in state._fsdp_param_groups for fp in group.fsdp_params]


def shard_block_loss(losses: torch.Tensor, shard_group: dist.ProcessGroup) -> torch.Tensor:
    """The loss of this replica's block from the per-micro-step losses [K] of every shard rank, placed
    strided (shard s had block microbatch k * S + s at micro-step k): gathered, put back in block
    order and summed as a pairwise tree, so it is the same subtree as a rank that held the block.

    Shard rank 0 returns it and the others return 0: the data-parallel loss sum that follows (a tree
    over dp ranks, whose lowest levels pair the shard ranks of one replica) then adds exact zeros,
    the way pipeline stages other than the last contribute 0."""
    shards = dist.get_world_size(shard_group)
    gathered = torch.empty(shards * losses.numel(), dtype=losses.dtype, device=losses.device)
    dist.all_gather_single(gathered, losses.contiguous(), group=shard_group)
    total = tree_reduce_rows(gathered.view(shards, -1).t().reshape(-1))
    return total if dist.get_rank(shard_group) == 0 else torch.zeros_like(total)


class TreeReduceScatter(ReduceScatter):
    """FSDP2's gradient reduce-scatter as the canonical tree over source ranks in rank order, in two
    levels (inside the node, then across nodes: ``reduce_scatter_levels``) when `levels` are given for
    FSDP's shard group, else as one all-to-all and the tree. Force-sum needs no PREMUL_SUM/AVG (which
    gloo lacks)."""

    def __init__(self, levels: AxisLevels | None = None) -> None:
        self.levels = levels

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        levels = self.levels
        if levels is None or levels.group is not group:
            levels = AxisLevels.flat(group)
        reduce_scatter_levels(output_tensor.view(-1), input_tensor.view(-1), levels)
        return None


def full_value(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this rank (a DTensor is gathered), safe to read raw bytes from.

    ``full_tensor()`` may return an AsyncCollectiveTensor whose data is only complete once a torch op
    runs on it; reading its bytes (numpy, hashing) before that sees an unfinished buffer, so wait here.
    """
    if isinstance(t, DTensor):
        t = t.full_tensor()
    if isinstance(t, AsyncCollectiveTensor):
        t = t.wait()
    return t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _fp64_squares(t: torch.Tensor) -> torch.Tensor:
    """The fp64 squares of `t` in one fresh tensor: converted once and squared in place (an fp32 or
    bf16 value's square is exact in fp64, so this is bit for bit ``t.double().square()`` with one
    gradient-sized allocation instead of two)."""
    squares = t.double()
    if squares is t:  # already fp64: .double() returned the gradient itself
        squares = t.clone()
    return squares.mul_(squares)


def squared_norm_fp64(grad: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of squares of a full gradient in fp64: per row (dim 0), then over rows. A DTensor's rows
    are gathered first, so where the shard boundaries fall cannot change the result. `scratch` (fp64,
    at least grad's size) holds a contiguous plain gradient's squares instead of a fresh tensor: its
    start has a fresh tensor's alignment and layout, so the sums are the same bits."""
    if scratch is None or isinstance(grad, DTensor) or not grad.is_contiguous():  # .double() keeps strides
        squares = _fp64_squares(grad)
    else:
        squares = scratch[: grad.numel()].view(grad.shape).copy_(grad)
        squares.mul_(squares)
    rows = squares.sum(dim=tuple(range(1, squares.ndim))) if squares.ndim > 1 else squares
    if isinstance(rows, DTensor):
        rows = rows.full_tensor()
    return rows.sum()


def grad_norm_fp64(
    named_grads: dict[str, torch.Tensor], all_names: list[str], stage_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """L2 norm over all parameters of the model (all pipeline stages): a vector of per-parameter fp64
    squared norms in the model's fixed name order, summed, sqrt, fp32. Each pipeline stage fills its
    own slots and the stages add their vectors: every slot has one non-zero term, so that sum is exact.

    A parameter's squared norm is the sum of its full vector of fp64 row sums (dim 0; a vector's
    elements), exactly as for an unsharded gradient. Sharded gradients do not gather rows one parameter
    at a time: each rank writes its local row sums into a zero vector of the full rows of every
    parameter, and ``sum_over_shards`` adds those vectors with one all-reduce per sharded mesh axis. A
    row held by one rank gets exactly one non-zero term, so the sum rebuilds it bit for bit."""
    device = next(iter(named_grads.values())).device
    sharded = {name: _without_partial(g) for name, g in named_grads.items() if isinstance(g, DTensor)}
    totals = sum_over_shards(list(sharded.values()), [_local_row_sums(g) for g in sharded.values()])
    # a fresh tensor: same alignment, so same sum, as unsharded
    values = {name: rows.clone().sum() for name, rows in zip(sharded, totals, strict=True)}
    plain = [grad for name, grad in named_grads.items() if name not in sharded]
    # One fp64 buffer, the largest gradient's size, holds each plain gradient's squares in turn.
    scratch = torch.empty(max((g.numel() for g in plain), default=0), dtype=torch.float64, device=device)
    for name, grad in named_grads.items():
        if name not in sharded:
            values[name] = squared_norm_fp64(grad, scratch)
    if unknown := values.keys() - set(all_names):
        raise KeyError(f"gradients of parameters the model does not name: {sorted(unknown)}")
    zero = torch.zeros((), dtype=torch.float64, device=device)  # another stage's slot
    squares = torch.stack([values.get(name, zero) for name in all_names])  # one write, not one per slot
    if stage_group is not None and dist.get_world_size(stage_group) > 1:
        dist.all_reduce(squares, group=stage_group)
    return squares.sum().sqrt().float()


def _without_partial(t: DTensor) -> DTensor:
    """`t` with pending (Partial) sums reduced: squares are not linear. Only tensor-parallel gradients
    of replicated parameters can be Partial; they are few and this costs one collective each."""
    if not any(p.is_partial() for p in t.placements):
        return t
    return t.redistribute(placements=[Replicate() if p.is_partial() else p for p in t.placements])


def _local_row_sums(grad: DTensor) -> torch.Tensor:
    """This rank's share of the fp64 row sums of `grad`'s full value: its local rows' sums (over the
    columns it holds) placed at their global row index, zeros elsewhere."""
    local = grad.to_local()
    squares = _fp64_squares(local)
    rows = squares.sum(dim=tuple(range(1, squares.ndim))) if squares.ndim > 1 else squares
    offset, _ = shard_box(grad)
    full = torch.zeros(grad.shape[0] if grad.ndim else 1, dtype=torch.float64, device=local.device)
    full[offset[0] : offset[0] + rows.numel()] = rows.reshape(-1) if grad.ndim else rows.reshape(1)
    return full


def _is_sharding(placement: Placement) -> bool:
    return isinstance(placement, (Shard, _StridedShard))


def shard_box(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global offset, shape) of the part of `t` this rank holds. A DTensor's local shard is a box of the
    global tensor (FSDP's strided shard over tensor parallelism included; DCP relies on the same)."""
    if isinstance(t, DTensor):
        local_shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return tuple(offset), tuple(local_shape)
    return (0,) * t.ndim, tuple(t.shape)


def sum_over_shards(tensors: list[DTensor], parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each ``parts[i]`` (this rank's contribution for ``tensors[i]``, a tensor of a shape every rank
    agrees on) over the ranks holding the distinct shards of ``tensors[i]``, with a fixed number of
    collectives: one all-reduce per (mesh, mesh axis that shards any of the tensors), of all the parts
    on that mesh in one flat buffer, whatever the number of tensors.

    Along an axis a tensor is replicated on, only coordinate 0 contributes (the others are zeroed), so
    each shard counts once. Axes that shard none of a mesh's tensors are not reduced: every rank there
    already has the whole sum. The caller makes the sum exact (one non-zero term per element, or
    integers), so the backend's reduction order cannot matter."""
    by_mesh: dict[DeviceMesh, list[int]] = {}
    for i, t in enumerate(tensors):
        if any(_is_sharding(p) for p in t.placements):
            by_mesh.setdefault(t.device_mesh, []).append(i)
    out = list(parts)
    for mesh, indices in by_mesh.items():
        axes = sorted({axis for i in indices for axis, p in enumerate(tensors[i].placements) if _is_sharding(p)})
        coordinate = mesh.get_coordinate()
        pieces = []
        for i in indices:
            replica = any(coordinate[a] != 0 and not _is_sharding(tensors[i].placements[a]) for a in axes)
            pieces.append(torch.zeros_like(parts[i]).reshape(-1) if replica else parts[i].reshape(-1))
        flat = torch.cat(pieces)
        for axis in axes:
            dist.all_reduce(flat, group=mesh.get_group(axis))
        for i, piece in zip(indices, flat.split([parts[i].numel() for i in indices]), strict=True):
            out[i] = piece.view(parts[i].shape)
    return out


def clip_(grads: list[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale grads by min(1, max_norm / (norm + 1e-6)), computed in fp32 the same way everywhere: as torch
    evaluates a Python float over a tensor, a reciprocal then a multiply (two roundings; it can differ in the
    last bit from one fp32 division, but it is the same in every layout)."""
    coefficient = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    local = [local_tensor(g) for g in grads]
    torch._foreach_mul_(local, coefficient.to(local[0].dtype))

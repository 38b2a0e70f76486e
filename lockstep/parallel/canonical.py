"""Reductions with one fixed summation order, whatever the number of ranks.

Floating-point addition is not associative, so a gradient summed as ((g0+g1)+g2)+g3 in one process
and as (g0+g2)+(g1+g3) across two ranks differs in the last bits. lockstep defines the gradient
of a step as a pairwise tree over the *global* microbatch index, ((g0+g1)+(g2+g3)), and computes
exactly that tree in every layout:

- within a rank, a binary-counter accumulator (``TreeSum``) adds microbatch results as they come,
  keeping at most log2(m)+1 partial sums;
- each data-parallel rank holds a contiguous, power-of-two block of microbatches, so its local
  tree is a complete subtree of the global one;
- across ranks, ``tree_all_reduce`` all-gathers the per-rank subtotals and finishes the tree in
  rank order on every rank (``all_reduce(SUM)`` fixes no order beyond two operands).

See docs/layout-invariance.md.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class TreeSum:
    """Pairwise sum of a stream of equally shaped tensor lists, in binary-counter order.

    After 2^k items the result is the complete pairwise tree over them; otherwise the remaining
    partial sums are combined from the largest (oldest) to the smallest.
    """

    def __init__(self) -> None:
        self._stack: list[tuple[int, list[torch.Tensor]]] = []

    def add(self, tensors: list[torch.Tensor]) -> None:
        level, item = 0, tensors
        while self._stack and self._stack[-1][0] == level:
            _, left = self._stack.pop()
            torch._foreach_add_(left, item)
            level, item = level + 1, left
        self._stack.append((level, item))

    def result(self) -> list[torch.Tensor]:
        if not self._stack:
            raise ValueError("TreeSum.result() before any add()")
        _, total = self._stack[0]
        for _, item in self._stack[1:]:
            torch._foreach_add_(total, item)
        return total


def tree_reduce_rows(rows: torch.Tensor) -> torch.Tensor:
    """Pairwise tree over dim 0 (length a power of two): ((r0+r1)+(r2+r3))..."""
    while rows.shape[0] > 1:
        rows = rows[0::2] + rows[1::2]
    return rows[0]


def tree_all_reduce(flat: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum a 1-D tensor over the ranks of `group` as a pairwise tree in rank order; the result is
    bitwise the same on every rank. The world size must be a power of two."""
    world = dist.get_world_size(group)
    if world == 1:
        return flat
    gathered = torch.empty(world * flat.numel(), dtype=flat.dtype, device=flat.device)
    dist.all_gather_single(gathered, flat.contiguous(), group=group)
    return tree_reduce_rows(gathered.view(world, -1))


def grad_norm_fp64(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of full gradients: fp64 sum of squares per tensor, summed in list order, sqrt, fp32.
    Depends only on the gradient values and their order, never on the layout that produced them."""
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device)
    for g in grads:
        total = total + g.double().square().sum()
    return total.sqrt().float()


def clip_(grads: list[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale grads by min(1, max_norm / (norm + 1e-6)), computed in fp32 the same way everywhere."""
    coefficient = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coefficient.to(grads[0].dtype))

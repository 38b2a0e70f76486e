"""Reductions with one fixed summation order, whatever the number of ranks.

Floating-point addition is not associative, so a gradient summed as ((g0+g1)+g2)+g3 in one process
and as (g0+g2)+(g1+g3) across two ranks differs in the last bits. lockstep defines the gradient
of a step as a pairwise tree over the *global* microbatch index, ((g0+g1)+(g2+g3)), and computes
exactly that tree in every layout:

- within a rank, a binary-counter accumulator (``TreeSum``) adds microbatch results as they come,
  keeping at most log2(m)+1 partial sums;
- each data-parallel rank holds a contiguous, power-of-two block of microbatches, so its local
  tree is a complete subtree of the global one;
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
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
from torch.distributed.tensor import DTensor


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
    bitwise the same on every rank. The world size must be a power of two.

    Built as a reduce-scatter (all-to-all, then each rank finishes the tree for its chunk) followed
    by an all-gather: every element is summed in the same order as a one-process tree, and the bytes
    moved are those of a ring all-reduce (an all-gather of whole buffers would move D times more)."""
    world = dist.get_world_size(group)
    if world == 1:
        return flat
    numel = flat.numel()
    chunk = -(-numel // world)
    padded = torch.zeros(world * chunk, dtype=flat.dtype, device=flat.device)
    padded[:numel] = flat
    received = torch.empty_like(padded)
    dist.all_to_all_single(received, padded, group=group)
    reduced = tree_reduce_rows(received.view(world, chunk))
    gathered = torch.empty_like(padded)
    dist.all_gather_into_tensor(gathered, reduced, group=group)
    return gathered[:numel]


class GradientTree:
    """Sums each parameter's per-microbatch gradients in binary-counter tree order as autograd produces
    them, whoever drives the backward passes (the trainer's loop or a pipeline schedule).

    A post-accumulate-grad hook moves every fresh ``.grad`` into the parameter's ``TreeSum`` and
    clears it; when the step's last microbatch arrives it puts the tree's total back into ``.grad``,
    so what runs next (FSDP's reduce-scatter, the cross-replica sum, the optimizer) sees one sum in
    canonical order. Under FSDP the watched tensors are the unsharded parameters that autograd
    accumulates into, found after FSDP gathers them (``watch_when_gathered``).
    """

    def __init__(self) -> None:
        self._watched: set[int] = set()
        self._trees: dict[torch.Tensor, tuple[TreeSum, list[int]]] = {}
        self._microbatches = 0

    def watch(self, params) -> None:
        for p in params:
            if p.requires_grad and id(p) not in self._watched:
                self._watched.add(id(p))
                p.register_post_accumulate_grad_hook(self._on_gradient)

    def watch_when_gathered(self, fsdp_modules: list[nn.Module]) -> None:
        """Watch each FSDP module's unsharded parameters, which exist from its first all-gather on
        (FSDP's pre-forward hook runs first: it is registered with prepend=True)."""
        for module in fsdp_modules:
            module.register_forward_pre_hook(lambda m, args: self.watch(unsharded_parameters(m)))

    def begin_step(self, num_microbatches: int) -> None:
        self._trees.clear()
        self._microbatches = num_microbatches

    def _on_gradient(self, param: torch.Tensor) -> None:
        tree, count = self._trees.setdefault(param, (TreeSum(), [0]))
        tree.add([param.grad])
        count[0] += 1
        param.grad = tree.result()[0] if count[0] == self._microbatches else None

    def check_complete(self) -> None:
        """Every parameter that got gradients got one per microbatch (else the tree would be wrong)."""
        partial = [count[0] for _, count in self._trees.values() if count[0] != self._microbatches]
        if partial:
            raise RuntimeError(
                f"{len(partial)} parameters got {sorted(set(partial))} gradients this step, expected one per "
                f"microbatch ({self._microbatches}); the canonical gradient tree cannot be formed"
            )


def unsharded_parameters(fsdp_module: nn.Module) -> list[nn.Parameter]:
    """The parameters an FSDP module's forward uses (its gathered, unsharded ones)."""
    state = fsdp_module._get_fsdp_state()
    return [fp.unsharded_param for group in state._fsdp_param_groups for fp in group.fsdp_params]


class TreeReduceScatter(ReduceScatter):
    """FSDP2's gradient reduce-scatter as all-to-all plus a local pairwise tree over source ranks in
    rank order: canonical, and with force-sum no PREMUL_SUM/AVG (which gloo lacks) is needed."""

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        received = torch.empty_like(input_tensor)
        dist.all_to_all_single(received, input_tensor, group=group)
        output_tensor.copy_(tree_reduce_rows(received.view(group.size(), -1)))
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


def squared_norm_fp64(grad: torch.Tensor) -> torch.Tensor:
    """Sum of squares of a full gradient in fp64: per row (dim 0), then over rows. A DTensor's rows
    are gathered first, so where the shard boundaries fall cannot change the result."""
    squares = grad.double().square()
    rows = squares.sum(dim=tuple(range(1, squares.ndim))) if squares.ndim > 1 else squares
    if isinstance(rows, DTensor):
        rows = rows.full_tensor()
    return rows.sum()


def grad_norm_fp64(
    named_grads: dict[str, torch.Tensor], all_names: list[str], stage_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """L2 norm over all parameters of the model (all pipeline stages): a vector of per-parameter fp64
    squared norms in the model's fixed name order, summed, sqrt, fp32. Each pipeline stage fills its
    own slots and the stages add their vectors: every slot has one non-zero term, so that sum is exact."""
    device = next(iter(named_grads.values())).device
    squares = torch.zeros(len(all_names), dtype=torch.float64, device=device)
    for i, name in enumerate(all_names):
        if name in named_grads:
            squares[i] = squared_norm_fp64(named_grads[name])
    if stage_group is not None and dist.get_world_size(stage_group) > 1:
        dist.all_reduce(squares, group=stage_group)
    return squares.sum().sqrt().float()


def clip_(grads: list[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale grads by min(1, max_norm / (norm + 1e-6)), computed in fp32 the same way everywhere."""
    coefficient = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    local = [local_tensor(g) for g in grads]
    torch._foreach_mul_(local, coefficient.to(local[0].dtype))

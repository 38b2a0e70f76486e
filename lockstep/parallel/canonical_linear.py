"""Linear layers whose sums over a split dimension follow one fixed tree, whatever the tensor-parallel degree.

A matmul's inner dimension is summed in an order its kernel picks, and the order changes with the
inner dimension's size. Tensor parallelism splits exactly that dimension in two places: a
row-parallel layer (``wo``, ``w2``) splits its input features, and the input gradient of a
column-parallel layer (``wq``, ``w1``, the output projection ...) sums over its split output
features. Splitting the *other* dimensions (output columns, token rows) is harmless: on the CPU at
one thread those give bitwise the same numbers as the unsplit matmul (measured, and assumed here).

So under ``debug.deterministic`` these sums are defined once: the split dimension is cut into a fixed
number C of equal chunks (the largest tensor-parallel degree the model allows), each chunk's product
is one batch of a batched matmul (over contiguous copies, so every layout hands the kernel the same
per-chunk shapes and strides), and the C partial products are summed in the canonical tree (C is a
power of two, so the pairwise tree). A rank holding C/tp consecutive chunks sums them locally, a node of that
tree, and the ranks finish the tree with ``tree_all_reduce`` (rank order) instead of an
``all_reduce(SUM)``. Tensor-parallel degree 1 computes the same chunks, so TP 1, 2 and 4 give the
same bits. The price: C small matmuls instead of one, and the activations around these layers are
whole on every tensor-parallel rank (no sequence parallelism, no loss parallelism).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from lockstep.models.common.attention import SharedAcrossHeads
from lockstep.parallel.canonical import TreeSum, tree_all_reduce
from lockstep.parallel.node_levels import tree_reduce_rows_


@torch.library.custom_op("lockstep::tree_of_products", mutates_args=())
def tree_of_products(left: torch.Tensor, right: torch.Tensor, chunks: int, whole: bool) -> torch.Tensor:
    """sum_c left[..., c] @ right[c, :] over `chunks` equal chunks of the shared dimension, in tree order:
    one batched matmul over contiguous [chunks, T, width] x [chunks, width, N] (each chunk the same
    shapes at every degree), then the pairwise tree over the chunk axis, the partial products in fp32
    whatever the inputs. `whole`: these are all the chunks, and the sum is rounded once to the inputs'
    dtype (as a plain matmul's accumulator is); otherwise it stays fp32 for the sum over ranks.

    One operator to autograd and to selective activation checkpointing, so the policy saves its output
    (the layer's, [T, N]) rather than the chunks' partial products ([chunks, T, N])."""
    width, lead = left.shape[-1] // chunks, left.shape[:-1]
    a = left.reshape(-1, chunks, width).transpose(0, 1).contiguous()
    b = right.reshape(chunks, width, right.shape[-1]).contiguous()
    if a.dtype == torch.float32:
        partial = torch.bmm(a, b)
    elif a.is_cuda and hasattr(torch.ops.aten.bmm, "dtype"):
        partial = torch.bmm(a, b, out_dtype=torch.float32)  # bf16 inputs, fp32 accumulation and output
    else:  # the CPU has no mixed-dtype bmm
        partial = torch.bmm(a.float(), b.float())
    total = tree_reduce_rows_(partial)
    return total.to(left.dtype if whole else torch.float32, copy=True).view(*lead, right.shape[-1])


@tree_of_products.register_fake
def _(left: torch.Tensor, right: torch.Tensor, chunks: int, whole: bool) -> torch.Tensor:
    return left.new_empty(*left.shape[:-1], right.shape[-1], dtype=left.dtype if whole else torch.float32)


def _products_over_ranks(left: torch.Tensor, right: torch.Tensor, chunks: int, group) -> torch.Tensor:
    """``tree_of_products`` of this rank's `chunks`, finished over the ranks of `group` in rank order (in
    fp32, rounded once at the end)."""
    if group is None or dist.get_world_size(group) == 1:
        return tree_of_products(left, right, chunks, True)
    partial = tree_of_products(left, right, chunks, False)
    return tree_all_reduce(partial.reshape(-1), group).view(partial.shape).to(left.dtype)


def _finish_over_ranks(partial: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return partial
    return tree_all_reduce(partial.contiguous().reshape(-1), group).view(partial.shape)


class _RowParallel(torch.autograd.Function):
    """y = x @ w.T with x's last dim and w's input features split over the group (w: [out, in_local])."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, chunks: int, group) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _products_over_ranks(x, weight.t(), chunks, group)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_y @ weight  # this rank's input features: output columns of the whole product
        grad_w = grad_y.reshape(-1, grad_y.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_w, None, None


class _ColumnParallel(torch.autograd.Function):
    """y_local = x @ w_local.T with w's output features split over the group (w: [out_local, in]); the
    input gradient sums over all output features, in the canonical tree."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, chunks: int, group) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.chunks, ctx.group = chunks, group
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = _products_over_ranks(grad_y, weight, ctx.chunks, ctx.group)
        grad_w = grad_y.reshape(-1, grad_y.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_w, None, None


class _GatherLastDim(torch.autograd.Function):
    """All-gather over the group along the last dim (the vocabulary shards of the logits); backward
    keeps this rank's slice (the whole gradient is on every rank)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.width = group, local.shape[-1]
        pieces = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, local.contiguous(), group=group)
        return torch.cat(pieces, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start = dist.get_rank(ctx.group) * ctx.width
        return grad[..., start : start + ctx.width].contiguous(), None


class _SumOverHeads(torch.autograd.Function):
    """Broadcast [B, S, 1, D] to this rank's heads; backward sums the heads' gradients in chunks of
    heads (the same chunks at every degree), a tree over them, finished over the ranks in rank order."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, heads: int, chunks: int, group) -> torch.Tensor:
        ctx.chunks, ctx.group = chunks, group
        return x.expand(-1, -1, heads, -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total, width = TreeSum(), grad.shape[2] // ctx.chunks
        for c in range(ctx.chunks):
            total.add([grad[:, :, c * width : (c + 1) * width].contiguous().sum(dim=2, keepdim=True)])
        return _finish_over_ranks(total.result()[0], ctx.group), None, None, None


def make_canonical_head_share(module: SharedAcrossHeads, chunks: int, group=None) -> None:
    ranks = 1 if group is None else dist.get_world_size(group)
    module.forward = lambda x, heads: _SumOverHeads.apply(x, heads, chunks // ranks, group)


class CanonicalHeadShare(ParallelStyle):
    def __init__(self, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        make_canonical_head_share(module, self.chunks, device_mesh.get_group())
        return module


def _local(weight: torch.Tensor) -> torch.Tensor:
    return weight.to_local() if isinstance(weight, DTensor) else weight


def make_canonical(linear: nn.Linear, kind: str, chunks: int, group=None, gather_output: bool = False) -> None:
    """Give `linear` the canonical forward of a `kind` ("row" or "column") parallel layer over `group`
    (None: one rank, all `chunks` local); `gather_output` (column) returns whole outputs."""
    if linear.bias is not None:
        raise ValueError("canonical linears have no bias")
    ranks = 1 if group is None else dist.get_world_size(group)
    if chunks % ranks:
        raise ValueError(f"{chunks} chunks cannot be shared by {ranks} ranks")
    local_chunks = chunks // ranks

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = _local(linear.weight)
        if kind == "row":
            return _RowParallel.apply(x, weight, local_chunks, group)
        out = _ColumnParallel.apply(x, weight, local_chunks, group)
        return _GatherLastDim.apply(out, group) if gather_output and ranks > 1 else out

    linear.forward = forward


class CanonicalParallel(ParallelStyle):
    """A tensor-parallel style for ``make_canonical``: the weight becomes a DTensor sharded by output
    features (column) or input features (row) over the tp mesh, and inputs and outputs are plain
    tensors whole on every rank (column layers' outputs are this rank's features unless gathered)."""

    def __init__(self, kind: str, chunks: int, gather_output: bool = False) -> None:
        super().__init__()
        self.kind, self.chunks, self.gather_output = kind, chunks, gather_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        dim = 0 if self.kind == "column" else 1
        sharded = distribute_tensor(module.weight, device_mesh, [Shard(dim)])
        module.register_parameter("weight", nn.Parameter(sharded, requires_grad=module.weight.requires_grad))
        make_canonical(module, self.kind, self.chunks, device_mesh.get_group(), self.gather_output)
        return module


def canonical_layers(model: nn.Module, plan: dict[str, ParallelStyle]) -> dict[str, tuple[str, bool]]:
    """The linear layers a model's tensor-parallel plan splits: name -> (kind, whether its output is
    gathered whole, as the logits are). Embeddings and the sequence-parallel parts are left out: under
    the canonical plan they run whole on every rank."""
    modules = dict(model.named_modules())
    layers = {}
    for name, style in plan.items():
        if not isinstance(modules.get(name), nn.Linear):
            continue
        if isinstance(style, ColwiseParallel):
            gathered = not any(isinstance(p, Shard) for p in style.output_layouts)
            layers[name] = ("column", gathered)
        elif isinstance(style, RowwiseParallel):
            layers[name] = ("row", False)
    return layers


class _GatherRows(torch.autograd.Function):
    """All-gather over the group along dim 0 (a weight's vocabulary shards); backward keeps this rank's
    rows of the gradient (which every rank computed whole, from whole activations)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.rows = group, local.shape[0]
        whole = local.new_empty((dist.get_world_size(group) * local.shape[0], *local.shape[1:]))
        dist.all_gather_single(whole, local.contiguous(), group=group)
        return whole

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start = dist.get_rank(ctx.group) * ctx.rows
        return grad[start : start + ctx.rows].contiguous(), None


class CanonicalTiedEmbedding(ParallelStyle):
    """An embedding whose weight is also a column-parallel layer's (tied): the weight is split by
    vocabulary like that layer's, and each lookup gathers the whole matrix first, so the lookup and
    its gradient are the one-process computation (the gradient's rows then go to their shards)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        sharded = distribute_tensor(module.weight, device_mesh, [Shard(0)])
        module.register_parameter("weight", nn.Parameter(sharded, requires_grad=module.weight.requires_grad))
        group = device_mesh.get_group()
        module.forward = lambda tokens: F.embedding(tokens, _GatherRows.apply(_local(module.weight), group))
        return module


def canonical_plan(model: nn.Module, plan: dict[str, ParallelStyle], chunks: int) -> dict[str, ParallelStyle]:
    """The plan for tensor parallelism with canonical sums: the same linear layers split the same way,
    every broadcast over heads (``SharedAcrossHeads``) summing its gradient canonically, and an
    embedding tied to a column-parallel layer split with it (the other embeddings stay whole)."""
    layers = canonical_layers(model, plan)
    styles: dict[str, ParallelStyle] = {
        name: CanonicalParallel(kind, chunks, out) for name, (kind, out) in layers.items()
    }
    modules = dict(model.named_modules())
    columns = [modules[name].weight for name, (kind, _) in layers.items() if kind == "column"]
    for name, module in modules.items():
        if isinstance(module, nn.Embedding) and any(module.weight is w for w in columns):
            styles[name] = CanonicalTiedEmbedding()
    return styles | {name: CanonicalHeadShare(chunks) for name in _head_shares(model)}


def _head_shares(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, SharedAcrossHeads)]


def apply_canonical_linears(model: nn.Module, plan: dict[str, ParallelStyle], chunks: int) -> None:
    """Tensor-parallel degree 1: the same layers compute the same chunks, all on this rank."""
    modules = dict(model.named_modules())
    for name, (kind, _) in canonical_layers(model, plan).items():
        make_canonical(modules[name], kind, chunks)
    for name in _head_shares(model):
        make_canonical_head_share(modules[name], chunks)

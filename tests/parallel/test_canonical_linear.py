"""lockstep.parallel.canonical_linear, on one process: ``tree_of_products`` sums the chunks' products as the
pairwise tree, so a rank holding a run of consecutive chunks computes a node of it and the nodes combined in
rank order give the bits of the whole (tensor-parallel degrees 1, 2 and 4 agree); leading dimensions only
reshape; a row-parallel layer's output and a column-parallel layer's input gradient are that tree, the
weight gradient the plain one; a broadcast over heads sums its gradient as the tree over chunks of heads;
the plan helpers pick the split linears (and their kind) and the tied embedding. These matter because
debug.deterministic promises the same bits at every tensor-parallel degree: a sum in another order, or a
layer left out of the plan, would make TP 2 differ from one process."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from lockstep.models.common.attention import SharedAcrossHeads
from lockstep.parallel.canonical_linear import (
    CanonicalHeadShare,
    CanonicalParallel,
    CanonicalTiedEmbedding,
    canonical_layers,
    canonical_plan,
    make_canonical,
    make_canonical_head_share,
    tree_of_products,
)


def _values(*shape: int, seed: int) -> torch.Tensor:
    """Values over many magnitudes, so that another addition order changes low bits."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-12, 12, shape, generator=generator).float())
    return torch.randn(*shape, generator=generator) * scale


def _pairwise(nodes: list[torch.Tensor]) -> torch.Tensor:
    if len(nodes) == 1:
        return nodes[0]
    half = len(nodes) // 2
    return _pairwise(nodes[:half]) + _pairwise(nodes[half:])


@pytest.mark.parametrize("degree", [1, 2, 4, 8])
def test_each_ranks_run_of_chunks_is_a_node_of_the_whole_tree(degree):
    """8 chunks of a 64-wide inner dimension: `degree` ranks hold 8/degree consecutive chunks each, sum
    them, and the pairwise tree over the ranks (tree_all_reduce's order) gives the one-process bits. The
    output width is even, as every model's is: with an odd one (7) torch's CPU bmm of one chunk alone can
    round differently from the same chunk inside a batch, so degree 8 would differ."""
    left, right = _values(10, 64, seed=1), _values(64, 16, seed=2)
    whole = tree_of_products(left, right, 8, False)
    width = 64 // degree
    nodes = [
        tree_of_products(left[:, r * width : (r + 1) * width], right[r * width : (r + 1) * width], 8 // degree, False)
        for r in range(degree)
    ]
    assert torch.equal(_pairwise(nodes), whole)
    assert torch.equal(tree_of_products(left, right, 8, True), whole)  # fp32 inputs: rounding to fp32 is nothing


def test_the_chunks_are_summed_as_a_tree_not_left_to_right():
    """The control: the same chunk products summed left to right give other bits for this data."""
    left, right = _values(10, 64, seed=3), _values(64, 16, seed=4)
    products = [tree_of_products(left[:, c * 8 : (c + 1) * 8], right[c * 8 : (c + 1) * 8], 1, False) for c in range(8)]
    in_a_row = products[0]
    for p in products[1:]:
        in_a_row = in_a_row + p
    whole = tree_of_products(left, right, 8, False)
    assert torch.equal(whole, _pairwise(products))
    assert not torch.equal(whole, in_a_row)


def test_leading_dimensions_only_reshape_and_a_rank_share_stays_fp32():
    left, right = _values(2, 3, 32, seed=5), _values(32, 6, seed=6)
    batched = tree_of_products(left, right, 4, True)
    assert batched.shape == (2, 3, 6)
    assert torch.equal(batched, tree_of_products(left.reshape(6, 32), right, 4, True).view(2, 3, 6))
    assert tree_of_products(left.bfloat16(), right.bfloat16(), 4, True).dtype == torch.bfloat16
    assert tree_of_products(left.bfloat16(), right.bfloat16(), 4, False).dtype == torch.float32


def test_a_row_layer_is_the_tree_forward_and_a_column_layer_the_tree_backward():
    x, weight, grad_y = _values(5, 32, seed=7), _values(8, 32, seed=8), _values(5, 8, seed=9)
    row, column = nn.Linear(32, 8, bias=False), nn.Linear(32, 8, bias=False)
    for linear, kind in ((row, "row"), (column, "column")):
        with torch.no_grad():
            linear.weight.copy_(weight)
        make_canonical(linear, kind, 4)
    x_row, x_column = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_row, y_column = row(x_row), column(x_column)
    assert torch.equal(y_row, tree_of_products(x, weight.t(), 4, True))
    assert torch.equal(y_column, x @ weight.t())
    y_row.backward(grad_y)
    y_column.backward(grad_y)
    assert torch.equal(x_column.grad, tree_of_products(grad_y, weight, 4, True))
    assert torch.equal(x_row.grad, grad_y @ weight)
    for linear in (row, column):
        assert torch.equal(linear.weight.grad, grad_y.t() @ x)


def test_a_biased_linear_is_refused():
    with pytest.raises(ValueError, match="no bias"):
        make_canonical(nn.Linear(4, 4), "row", 2)


def test_a_broadcast_over_heads_sums_its_gradient_as_the_tree_over_chunks_of_heads():
    share = SharedAcrossHeads()
    make_canonical_head_share(share, 4)
    x = _values(2, 3, 1, 5, seed=10).requires_grad_()
    out = share(x, 8)
    assert out.shape == (2, 3, 8, 5) and torch.equal(out, x.detach().expand(-1, -1, 8, -1))
    grad = _values(2, 3, 8, 5, seed=11)
    out.backward(grad)
    chunks = [grad[:, :, c * 2 : (c + 1) * 2].contiguous().sum(dim=2, keepdim=True) for c in range(4)]
    assert torch.equal(x.grad, _pairwise(chunks))


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.other = nn.Embedding(16, 8)
        self.wq = nn.Linear(8, 8, bias=False)
        self.wo = nn.Linear(8, 8, bias=False)
        self.norm = nn.LayerNorm(8)
        self.share = SharedAcrossHeads()
        self.output = nn.Linear(8, 16, bias=False)
        self.output.weight = self.embed.weight  # tied


def test_the_plan_helpers_pick_the_split_linears_and_the_tied_embedding():
    model = _Tiny()
    plan = {
        "wq": ColwiseParallel(),
        "wo": RowwiseParallel(),
        "output": ColwiseParallel(output_layouts=Replicate()),
        "norm": ColwiseParallel(),  # not a linear: left out
        "embed": RowwiseParallel(),  # not a linear either
        "missing": ColwiseParallel(),
    }
    assert canonical_layers(model, plan) == {"wq": ("column", False), "wo": ("row", False), "output": ("column", True)}
    shard_last = {"wq": ColwiseParallel(output_layouts=Shard(-1))}
    assert canonical_layers(model, shard_last) == {"wq": ("column", False)}
    styles = canonical_plan(model, plan, 4)
    assert set(styles) == {"wq", "wo", "output", "embed", "share"}
    assert isinstance(styles["embed"], CanonicalTiedEmbedding)  # tied to the column layer "output"
    assert isinstance(styles["share"], CanonicalHeadShare) and styles["share"].chunks == 4
    assert (styles["wq"].kind, styles["wq"].gather_output) == ("column", False)
    assert (styles["output"].kind, styles["output"].gather_output, styles["output"].chunks) == ("column", True, 4)
    assert isinstance(styles["wo"], CanonicalParallel) and styles["wo"].kind == "row"

"""lockstep.parallel.canonical: the canonical summation tree and the fp64 grad norm. ``tree_reduce_rows``,
``TreeSum`` (leaf by leaf, or fed ``canonical_nodes`` through ``combine_nodes``) and ``ArrivalTree`` (leaves
in any arrival order) all give the bits of the binary-counter tree written out here independently (pairwise
trees over the runs of the count's binary digits, largest first, added left to right), and a plain left to
right sum of the same data gives other bits; ``GradientTree`` leaves in ``.grad`` after the last of K
backward passes that tree over the per-microbatch gradients (the gradient itself for one microbatch) and
refuses a step that missed one; ``squared_norm_fp64`` and ``grad_norm_fp64`` equal the fp64 row sums
computed here, with or without the scratch buffer, and with the rows sharded over two ranks; ``clip_``
scales by the fp32 coefficient or not at all; over three ranks ``tree_all_reduce``, ``TreeReduceScatter``
and ``shard_block_loss`` (strided shards put back in block order) add as (r0 + r1) + r2. These matter because lockstep's promise is that a step's
gradient, loss and grad norm have the same bits in every layout: each of these pieces is one place where
an addition in another order would change the last bits of every later step."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from lockstep.parallel.canonical import (
    ArrivalTree,
    GradientTree,
    TreeSum,
    canonical_nodes,
    clip_,
    combine_nodes,
    grad_norm_fp64,
    shard_box,
    squared_norm_fp64,
    sum_over_shards,
    tree_reduce_rows,
)
from tests.distributed import run_on_ranks
from tests.parallel.reference_sums import canonical, pairwise


def _left_to_right(rows: list[torch.Tensor]) -> torch.Tensor:
    total = rows[0].clone()
    for row in rows[1:]:
        total = total + row
    return total


def _rows(count: int, seed: int, width: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values over many magnitudes, so that another addition order changes low bits."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-20, 20, (count, width), generator=generator).float())
    return (torch.randn(count, width, generator=generator) * scale).to(dtype)


def test_tree_reduce_rows_is_the_canonical_tree_on_a_copy():
    for count in range(1, 18):
        rows = _rows(count, seed=count)
        before = rows.clone()
        total = tree_reduce_rows(rows)
        assert torch.equal(total, canonical(list(before))), count
        assert torch.equal(rows, before), count  # the rows are left as they were
        total.add_(1.0)  # the result is its own tensor, not a view of the rows
        assert torch.equal(rows, before), count
    with pytest.raises(ValueError, match="no rows"):
        tree_reduce_rows(torch.empty(0, 3))


def test_another_order_gives_other_bits_for_this_data():
    """The control for the tests here: a left to right sum of the same rows differs, so an implementation
    that summed in arrival order (or any order but the tree's) would be caught."""
    for count in (4, 6, 7, 8, 13):  # 3 is (r0 + r1) + r2: left to right is the tree there
        rows = list(_rows(count, seed=count))
        assert not torch.equal(_left_to_right(rows), canonical(rows)), count
        assert not torch.equal(_left_to_right(rows[::-1]), canonical(rows)), count


def test_tree_sum_of_leaves_one_by_one_is_the_canonical_tree_for_every_tensor_of_the_list():
    for count in range(1, 18):
        first, second = _rows(count, seed=count), _rows(count, seed=100 + count, width=5, dtype=torch.float64)
        total = TreeSum()
        for a, b in zip(first, second, strict=True):
            total.add([a.clone(), b.clone()])
        result = total.result()
        assert torch.equal(result[0], canonical(list(first))), count
        assert torch.equal(result[1], canonical(list(second))), count
    with pytest.raises(ValueError, match="before any add"):
        TreeSum().result()


def test_tree_sum_holds_one_partial_sum_per_binary_digit_of_the_count():
    """At most log2(m) + 1 partial sums: after n leaves, one per set bit of n (7 = 4 + 2 + 1: three)."""
    total = TreeSum()
    for n, leaf in enumerate(_rows(16, seed=3, width=10), start=1):
        total.add([leaf.clone()])
        assert total.numel() == 10 * bin(n).count("1"), n


def test_canonical_nodes_tile_a_block_with_aligned_power_of_two_runs():
    # docs/layout-invariance.md: DDP 2 with 3 microbatches each is [0,2) and [2] on rank 0, [3] and [4,6) on rank 1.
    assert canonical_nodes(0, 3) == [1, 0]
    assert canonical_nodes(3, 3) == [0, 1]
    assert canonical_nodes(0, 8) == [3]
    assert canonical_nodes(1, 7) == [0, 1, 2]
    assert canonical_nodes(5, 6) == [0, 1, 1, 0]  # 5, [6,8), [8,10), 10
    assert canonical_nodes(4, 0) == []


def test_combine_nodes_of_any_split_gives_the_one_process_tree():
    """Blocks of any size, each tiled by its canonical nodes summed on their own (as a rank does), combined
    in order: the bits of the tree over all the leaves."""
    rng = random.Random(0)
    for count in range(2, 17):
        rows = list(_rows(count, seed=count))
        cuts = sorted(rng.sample(range(1, count), rng.randint(0, min(3, count - 1))))
        nodes, levels = [], []
        for start, end in zip([0, *cuts], [*cuts, count], strict=True):
            position = start
            for level in canonical_nodes(start, end - start):
                nodes.append(pairwise(rows[position : position + (1 << level)]))
                levels.append(level)
                position += 1 << level
            assert position == end
        assert torch.equal(combine_nodes(nodes, levels), canonical(rows)), (count, cuts)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 6, 7, 8, 11, 16])
def test_arrival_tree_in_any_order_gives_the_canonical_bits(count):
    rows = list(_rows(count, seed=count))
    expected = canonical(rows)
    orders = [list(range(count)), list(reversed(range(count)))]
    for seed in range(6):
        order = list(range(count))
        random.Random(seed).shuffle(order)
        orders.append(order)
    for order in orders:
        tree = ArrivalTree(count)
        for index in order:
            tree.add(index, rows[index].clone())
        assert torch.equal(tree.result(), expected), order


def _most_held(count: int, order) -> int:
    tree, most = ArrivalTree(count), 0
    for index in order:
        tree.add(index, torch.zeros(1))
        most = max(most, len(tree._nodes))
    return most


def test_arrival_tree_fed_in_order_holds_at_most_log2_count_plus_one_partial_sums():
    """In order, for any count; in reverse (as autograd runs backward) for a power of two."""
    for count in range(1, 65):
        assert _most_held(count, range(count)) <= math.log2(count) + 1, count
    for count in (1, 2, 4, 8, 16, 32, 64):
        assert _most_held(count, reversed(range(count))) <= math.log2(count) + 1, count


def test_arrival_tree_refuses_a_result_before_every_leaf_arrived():
    rows = list(_rows(3, seed=1))
    tree = ArrivalTree(3)
    tree.add(2, rows[2])
    tree.add(0, rows[0])
    with pytest.raises(RuntimeError, match="after 2 of 3"):
        tree.result()
    tree.add(1, rows[1])
    assert torch.equal(tree.result(), canonical(rows))


def _linear() -> nn.Linear:
    linear = nn.Linear(6, 4)
    with torch.no_grad():
        weights = _rows(5, seed=7, width=6)
        linear.weight.copy_(weights[:4])
        linear.bias.copy_(weights[4, :4])
    return linear


def _inputs(count: int) -> list[torch.Tensor]:
    return list(_rows(count * 3, seed=11, width=6).view(count, 3, 6))


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (model(x) ** 2).sum()


def _per_microbatch_gradients(inputs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Each microbatch's gradient on its own, from a model the tree does not watch."""
    model, grads = _linear(), []
    for x in inputs:
        model.zero_grad(set_to_none=True)
        _loss(model, x).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads


@pytest.mark.parametrize("count", [2, 3, 4, 7])
def test_gradient_tree_puts_the_tree_of_the_microbatch_gradients_in_grad_after_the_last(count):
    inputs = _inputs(count)
    separate = _per_microbatch_gradients(inputs)
    model, tree = _linear(), GradientTree()
    tree.watch(model.parameters())
    tree.begin_step(count)
    for k, x in enumerate(inputs):
        _loss(model, x).backward()
        if k < count - 1:
            assert all(p.grad is None for p in model.parameters()), k
    tree.check_complete()
    for i, p in enumerate(model.parameters()):
        assert torch.equal(p.grad, canonical([g[i] for g in separate])), (count, i)
    # the control: plain accumulation in .grad is the left to right sum, other bits for this data
    plain = _linear()
    for x in inputs:
        _loss(plain, x).backward()
    if count in (4, 7):  # for 2 and 3 the tree is the left to right sum
        assert not all(torch.equal(a.grad, b.grad) for a, b in zip(plain.parameters(), model.parameters(), strict=True))


def test_gradient_tree_of_one_microbatch_is_the_gradient_itself():
    (x,) = _inputs(1)
    (expected,) = _per_microbatch_gradients([x])
    model, tree = _linear(), GradientTree()
    tree.watch(model.parameters())
    tree.begin_step(1)
    _loss(model, x).backward()
    tree.check_complete()
    for p, g in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p.grad, g)
    assert tree.peak_held_numel == 6 * 4 + 4


def test_gradient_tree_refuses_a_step_that_missed_a_microbatch():
    model, tree = _linear(), GradientTree()
    tree.watch(model.parameters())
    tree.begin_step(4)
    for x in _inputs(3):
        _loss(model, x).backward()
    assert all(p.grad is None for p in model.parameters())  # no total before the fourth
    with pytest.raises(RuntimeError, match=r"got \[3\] gradients this step, expected one per microbatch \(4\)"):
        tree.check_complete()
    tree.begin_step(4)  # a new step starts the count again
    for x in _inputs(4):
        _loss(model, x).backward()
    tree.check_complete()


def test_gradient_tree_keeps_a_blocks_nodes_apart():
    """A block of 3 microbatches is the nodes [0,2) and [2]: each summed on its own, .grad the first."""
    inputs = _inputs(3)
    separate = _per_microbatch_gradients(inputs)
    model, tree = _linear(), GradientTree()
    tree.watch(model.parameters())
    tree.begin_step(3, node_levels=canonical_nodes(0, 3))
    for x in inputs:
        _loss(model, x).backward()
    tree.check_complete()
    for i, p in enumerate(model.parameters()):
        first, second = tree.nodes(p)
        assert torch.equal(first, separate[0][i] + separate[1][i])
        assert torch.equal(second, separate[2][i])
        assert p.grad is first


@pytest.mark.parametrize("count,most_partial_sums", [(1, 1), (2, 1), (4, 2), (8, 3)])
def test_gradient_tree_peak_is_the_model_times_the_most_partial_sums(count, most_partial_sums):
    """Most set bits of any n <= count partial sums at once (7 = 4 + 2 + 1 for 8), each the model's size."""
    model, tree = _linear(), GradientTree()
    tree.watch(model.parameters())
    tree.begin_step(count)
    for x in _inputs(count):
        _loss(model, x).backward()
    assert tree.peak_held_numel == most_partial_sums * (6 * 4 + 4)


def _expected_squared_norm(grad: torch.Tensor) -> torch.Tensor:
    squares = grad.double() ** 2
    rows = squares.sum(dim=tuple(range(1, squares.ndim))) if squares.ndim > 1 else squares
    return rows.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_squared_norm_is_the_fp64_row_sums_with_or_without_the_scratch_buffer(dtype):
    grads = [_rows(1, seed=1, width=37, dtype=dtype)[0], _rows(9, seed=2, width=33, dtype=dtype),
             _rows(12, seed=3, dtype=dtype).view(4, 3, 64), torch.tensor(3.0, dtype=dtype)]  # fmt: skip
    scratch = torch.full((12 * 64,), float("nan"), dtype=torch.float64)  # stale contents must not matter
    for grad in grads:
        before = grad.clone()
        expected = _expected_squared_norm(grad)
        fresh = squared_norm_fp64(grad)
        assert fresh.dtype == torch.float64
        assert torch.equal(fresh, expected), grad.shape
        assert torch.equal(squared_norm_fp64(grad, scratch), expected), grad.shape
        assert torch.equal(grad, before)  # the squares never land in the gradient (fp64 included)
    transposed = grads[1].t()  # not contiguous: the fresh path, with its own strides
    assert torch.equal(squared_norm_fp64(transposed, scratch), _expected_squared_norm(transposed))


def test_grad_norm_is_the_sqrt_of_the_parameters_squared_norms_in_the_models_order():
    named = {"b": _rows(1, seed=4, width=5)[0], "a": _rows(6, seed=5, width=7), "c": _rows(1, seed=6, width=300)}
    names = ["a", "b", "other_stage", "c"]
    squares = [_expected_squared_norm(named[n]) for n in ("a", "b")]
    squares += [torch.zeros((), dtype=torch.float64), _expected_squared_norm(named["c"])]
    expected = torch.stack(squares).sum().sqrt().float()
    norm = grad_norm_fp64(named, names)
    assert norm.dtype == torch.float32
    assert torch.equal(norm, expected)
    assert torch.equal(grad_norm_fp64(dict(reversed(named.items())), names), expected)  # the dict's order is not it
    with pytest.raises(KeyError, match="stray"):
        grad_norm_fp64({**named, "stray": torch.ones(2)}, names)


def test_clip_scales_by_the_fp32_coefficient_or_leaves_the_bits_alone():
    grads = [_rows(3, seed=8, width=5), _rows(1, seed=9, width=4, dtype=torch.bfloat16)[0]]
    for norm in (0.25, 0.999):  # below max_norm: the coefficient is exactly 1
        copies = [g.clone() for g in grads]
        clip_(copies, torch.tensor(norm), 1.0)
        assert all(torch.equal(c, g) for c, g in zip(copies, grads, strict=True))
    norm = torch.tensor(7.0)
    coefficient = np.float32(1.0) / (np.float32(7.0) + np.float32(1e-6))  # max_norm 1: no rounding but the quotient's
    copies = [g.clone() for g in grads]
    clip_(copies, norm, 1.0)
    assert torch.equal(copies[0], grads[0] * torch.tensor(float(coefficient)))
    assert torch.equal(copies[1], grads[1] * torch.tensor(float(coefficient)).to(torch.bfloat16))


def test_a_plain_tensors_box_is_all_of_it():
    assert shard_box(torch.zeros(5, 7)) == ((0, 0), (5, 7))
    assert shard_box(torch.tensor(1.0)) == ((), ())


def _sharded_norms() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        mesh = init_device_mesh("cpu", (2,))
        weight, bias, vector = (
            _rows(5, seed=12, width=33),
            _rows(1, seed=13, width=9)[0],
            _rows(1, seed=14, width=11)[0],
        )
        rows = distribute_tensor(weight, mesh, [Shard(0)])  # uneven: rows 0-2 on rank 0, 3-4 on rank 1
        assert shard_box(rows) == (((0, 0), (3, 33)) if rank == 0 else ((3, 0), (2, 33)))
        split = distribute_tensor(vector, mesh, [Shard(0)])
        assert shard_box(split) == (((0,), (6,)) if rank == 0 else ((6,), (5,)))
        assert torch.equal(squared_norm_fp64(rows), squared_norm_fp64(weight))  # gathered rows
        names = ["weight", "bias", "vector"]
        plain = grad_norm_fp64({"weight": weight, "bias": bias, "vector": vector}, names)
        sharded = grad_norm_fp64({"weight": rows, "bias": bias, "vector": split}, names)
        assert torch.equal(sharded, plain), (sharded, plain)
        # sum_over_shards: a sharded tensor's parts are summed over the ranks, a replicated one's kept
        replicated = distribute_tensor(bias, mesh, [Replicate()])
        parts = [torch.full((3,), rank + 1.0), torch.full((2,), 10.0 * (rank + 1))]
        summed = sum_over_shards([rows, replicated], parts)
        assert torch.equal(summed[0], torch.full((3,), 3.0))
        assert torch.equal(summed[1], parts[1])
    finally:
        dist.destroy_process_group()


def test_rows_sharded_over_two_ranks_give_the_unsharded_norms_bits():
    run_on_ranks(_sharded_norms, 2)


def _three_ranks() -> None:
    from lockstep.parallel.canonical import TreeReduceScatter, shard_block_loss, tree_all_reduce

    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        sources = list(_rows(3, seed=21, width=10))  # 10 elements over 3 ranks: padded chunks
        expected = canonical(sources)  # (r0 + r1) + r2
        assert torch.equal(tree_all_reduce(sources[rank].clone()), expected)
        # the reduce-scatter: chunk r of every source's buffer, summed by the tree, lands on rank r
        buffers = list(_rows(3, seed=22, width=12))
        out = torch.empty(4)
        TreeReduceScatter()(out, buffers[rank].clone(), dist.group.WORLD, None)
        assert torch.equal(out, canonical([b[4 * rank : 4 * rank + 4] for b in buffers]))
        # shard s had block microbatch k * 3 + s at micro-step k: the block's loss is the tree in block order
        losses = _rows(1, seed=23, width=6)[0]  # block order j = k * 3 + s
        mine = losses[[rank, 3 + rank]]  # micro-steps 0 and 1
        total = shard_block_loss(mine, dist.group.WORLD)
        assert torch.equal(total, canonical(list(losses)) if rank == 0 else torch.zeros(()))
    finally:
        dist.destroy_process_group()


def test_three_ranks_sum_in_the_canonical_tree_over_ranks_and_shards_block_order():
    """Three operands are where an order shows: (r0 + r1) + r2, not the backend's choice."""
    run_on_ranks(_three_ranks, 3)
    r0, r1, r2 = _rows(3, seed=21, width=10)
    assert not torch.equal(r0 + (r1 + r2), (r0 + r1) + r2)  # the control: another tree shows in this data

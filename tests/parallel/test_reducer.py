"""lockstep.parallel.reducer: what is left to sum across ranks after backward. On one process nothing
is summed (counts are copied, the loss comes back as it is, there is no replicate-axis sum); on two
ranks every rank gets the data-parallel sum of the counts and of the loss, the pipeline sum of the loss
(only the last stage holds it, the others add exact zeros), the flag raised on any rank, and the sum of
the replicas' gradients through ``replica_gradient_sum``; with node levels the loss is the canonical
tree over all ranks' microbatches, ``(l0+l1)+(l2+l3)`` for four split 3 + 1, written out here by hand.
This matters because the logged loss, the token count that normalises the gradients and the stop
decision must be identical on every rank and independent of the layout: a rank that stopped alone
would hang the others, and a loss summed in another order would differ between layouts."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lockstep.config.job import ParallelDims
from lockstep.parallel.canonical import canonical_nodes
from lockstep.parallel.mesh import build_mesh
from lockstep.parallel.parallelize import BuiltModel
from lockstep.parallel.reducer import CrossRankReducer, any_rank_flag
from tests.distributed import run_on_ranks

ONE = ParallelDims(pp=1, dp_replicate=1, dp_shard=1, tp=1)
LEAVES = torch.tensor([1e8, 1.0, -1e8, 1.0])  # float32: the order of their sum shows


def _model() -> BuiltModel:
    linear = nn.Linear(3, 2)
    with torch.no_grad():  # fixed weights, without touching the global generator
        linear.weight.copy_(torch.arange(6.0).view(2, 3) * 0.1 - 0.2)
        linear.bias.copy_(torch.tensor([0.3, -0.1]))
    return BuiltModel(parts=[linear], param_names=["weight", "bias"], flops_per_token=0, args=None)


def test_one_process_sums_nothing():
    for invariant in (True, False):
        reducer = CrossRankReducer(None, dims=ONE, layout_invariant_reductions=invariant)
        counts = [3, 0, 7]
        summed = reducer.sum_counts(counts, torch.device("cpu"))
        assert summed == counts and summed is not counts
        loss = torch.tensor([2.5])
        assert torch.equal(reducer.global_loss(loss), torch.tensor(2.5))
        assert reducer.replica_gradient_sum(_model(), bucket_mb=1.0, fsdp_syncs_once=False) is None


def test_without_a_process_group_the_flag_is_this_processs_own():
    for flag in (True, False):
        assert torch.equal(any_rank_flag(flag, torch.device("cpu")), torch.tensor(float(flag)))


def _by_hand(leaves: torch.Tensor) -> torch.Tensor:
    l0, l1, l2, l3 = leaves
    return (l0 + l1) + (l2 + l3)


def _two_ranks() -> None:
    dist.init_process_group("gloo")
    try:
        rank, cpu = dist.get_rank(), torch.device("cpu")
        dims = ParallelDims(pp=1, dp_replicate=2, dp_shard=1, tp=1)
        mesh = build_mesh(dims, cpu)
        for invariant in (True, False):
            reducer = CrossRankReducer(mesh, dims=dims, layout_invariant_reductions=invariant)
            assert reducer.sum_counts([rank + 1, 10 * rank, 0], cpu) == [3, 10, 0]
            losses = [torch.tensor(0.1), torch.tensor(1e-3)]
            assert torch.equal(reducer.global_loss(losses[rank].clone()), losses[0] + losses[1])

        # node levels: rank 0 holds microbatches 0-2 as a pair and a single, rank 1 microbatch 3 alone
        reducer = CrossRankReducer(mesh, dims=dims, layout_invariant_reductions=True)
        node_levels = [canonical_nodes(0, 3), canonical_nodes(3, 1)]
        assert node_levels == [[1, 0], [0]]
        mine = torch.stack([LEAVES[0] + LEAVES[1], LEAVES[2]]) if rank == 0 else LEAVES[3:4].clone()
        assert torch.equal(reducer.global_loss(mine, node_levels), _by_hand(LEAVES))

        # the flag raised on rank 1 only reaches both; none raised stays 0
        assert any_rank_flag(rank == 1, cpu).item() == 1.0 and any_rank_flag(False, cpu).item() == 0.0

        # pipeline: only the last stage holds the loss, the first adds an exact zero
        pp_dims = ParallelDims(pp=2, dp_replicate=1, dp_shard=1, tp=1)
        pp_reducer = CrossRankReducer(build_mesh(pp_dims, cpu), dims=pp_dims, layout_invariant_reductions=True)
        stage_loss = torch.tensor(0.7) if rank == 1 else torch.tensor(0.0)
        assert torch.equal(pp_reducer.global_loss(stage_loss), torch.tensor(0.7))
    finally:
        dist.destroy_process_group()


def _two_replicas_gradients() -> None:
    """The replicate-axis gradient sum of a plain model and of a parameter FSDP leaves alone."""
    dist.init_process_group("gloo")
    try:
        rank, cpu = dist.get_rank(), torch.device("cpu")
        dims = ParallelDims(pp=1, dp_replicate=2, dp_shard=1, tp=1)
        reducer = CrossRankReducer(build_mesh(dims, cpu), dims=dims, layout_invariant_reductions=True)
        model = _model()
        extra = nn.Parameter(torch.zeros(2))
        model.parts.append(nn.ParameterList([extra]))
        model.unmanaged_params = [extra]
        replica_sum = reducer.replica_gradient_sum(model, bucket_mb=1.0, fsdp_syncs_once=False)
        replica_sum.begin_step(num_microbatches=1)

        def backward(r: int) -> None:
            x = torch.arange(3.0).add(r * 0.37)
            (model.parts[0](x).square().sum() + (extra * (r + 1)).sum()).backward()

        expected = []
        for r in (0, 1):  # both replicas' gradients, computed here without hooks
            fresh = _model().parts[0]
            fresh(torch.arange(3.0).add(r * 0.37)).square().sum().backward()
            expected.append([fresh.weight.grad, fresh.bias.grad, torch.full((2,), float(r + 1))])
        backward(rank)
        assert replica_sum.launched_in_backward == 2  # both buckets (one per watch call, each under 1 MiB)
        replica_sum.finish()
        got = [model.parts[0].weight.grad, model.parts[0].bias.grad, extra.grad]
        for g, e0, e1 in zip(got, *expected, strict=True):
            assert torch.equal(g, e0 + e1), rank
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_one_sum_of_counts_loss_and_flag():
    assert _by_hand(LEAVES) != ((LEAVES[0] + LEAVES[1]) + LEAVES[2]) + LEAVES[3]  # the order shows
    run_on_ranks(_two_ranks, 2, timeout=120)


def test_two_replicas_get_the_sum_of_their_gradients():
    run_on_ranks(_two_replicas_gradients, 2, timeout=120)

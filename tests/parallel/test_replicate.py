"""lockstep.parallel.replicate: the replicate-axis gradient sum launches a bucket from the gradient hooks
only once every gradient in it is final (the step's last microbatch, or the one call announced for a
parameter synced once), refuses a hook that runs more often than announced, launches from ``finish`` a
bucket whose hooks never ran, and writes back on every replica the sum of the replicas' gradients:
with the canonical sum, for blocks of microbatch nodes, bitwise the canonical tree over all
microbatches, ``((l0+l1)+(l2+l3))+(l4+l5)`` for six, written out here by hand. This matters because
DDP and HSDP gradients pass through it every step: a bucket launched one microbatch early sums an
unfinished gradient, and a node summed out of tree order makes runs of different layouts differ in
their last bits, with no error either way."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lockstep.parallel.canonical import canonical_nodes
from lockstep.parallel.replicate import ReplicaGradientSum
from tests.distributed import run_on_ranks


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_buckets_launch_from_hooks_once_their_last_microbatch_is_final(one_rank_group):
    with torch.random.fork_rng():  # leave the global generator as other tests find it
        torch.manual_seed(0)
        layers = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    per_layer = sum(p.numel() * p.element_size() for p in layers[0].parameters())
    replica_sum = ReplicaGradientSum(one_rank_group, layout_invariant_reductions=True, bucket_bytes=per_layer)
    replica_sum.watch(list(layers.parameters()), per_microbatch=True)  # one bucket per layer
    launched_when_first_layer_final = []
    layers[0].weight.register_post_accumulate_grad_hook(
        lambda _: launched_when_first_layer_final.append(replica_sum.launched_in_backward)
    )
    replica_sum.begin_step(num_microbatches=2)
    for microbatch in range(2):
        layers(torch.randn(3, 4, generator=torch.Generator().manual_seed(microbatch))).sum().backward()
    # none in the first microbatch; by the time backward reaches the first layer, the later two launched
    assert launched_when_first_layer_final[0] == 0 and launched_when_first_layer_final[1] >= 2
    assert replica_sum.launched_in_backward == len(layers)
    grads = [p.grad.clone() for p in layers.parameters()]
    replica_sum.finish()
    assert all(torch.equal(p.grad, g) for p, g in zip(layers.parameters(), grads, strict=True))  # one replica

    replica_sum.begin_step(num_microbatches=2)
    for _ in range(2):
        layers(torch.ones(1, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="ran 3 times this step, expected 2"):
        layers(torch.ones(1, 4)).sum().backward()


def test_a_parameter_synced_once_expects_one_call_and_finish_launches_the_rest(one_rank_group):
    synced, written = nn.Parameter(torch.zeros(5)), nn.Parameter(torch.zeros(3))
    replica_sum = ReplicaGradientSum(one_rank_group, layout_invariant_reductions=False, bucket_bytes=2**20)
    replica_sum.watch([synced], per_microbatch=False)
    replica_sum.watch([written], per_microbatch=True)
    replica_sum.begin_step(num_microbatches=4)
    synced.sum().backward()
    assert replica_sum.launched_in_backward == 1  # its one announced call was the last
    written.grad = torch.arange(3.0)  # a schedule that writes .grad itself: no hook ran
    replica_sum.finish()
    assert torch.equal(written.grad, torch.arange(3.0)) and torch.equal(synced.grad, torch.ones(5))
    replica_sum.begin_step(num_microbatches=4)
    synced.sum().backward()
    with pytest.raises(RuntimeError, match="ran 2 times this step, expected 1"):
        synced.sum().backward()


SHAPES = [(7,), (3, 5), (2,), (4, 1)]  # odd sizes: the canonical buckets are padded to the replicas


def _grads(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(shape, generator=g) * 10.0 ** torch.randint(-4, 5, shape, generator=g) for shape in SHAPES]


def _sum_over_two_replicas(layout_invariant: bool) -> None:
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        params = [nn.Parameter(torch.zeros(shape)) for shape in SHAPES]
        unused = nn.Parameter(torch.zeros(2))
        frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
        replica_sum = ReplicaGradientSum(
            dist.group.WORLD, layout_invariant_reductions=layout_invariant, bucket_bytes=60
        )  # several buckets
        replica_sum.watch([*params, unused, frozen], per_microbatch=True)
        replica_sum.begin_step(num_microbatches=1)
        for p, g in zip(params, _grads(rank), strict=True):
            p.grad = g.clone()
        replica_sum.finish()
        for p, g0, g1 in zip(params, _grads(0), _grads(1), strict=True):
            assert torch.equal(p.grad, g0 + g1), (rank, p.shape)
        assert unused.grad is None and frozen.grad is None
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout_invariant", [True, False])
def test_every_replica_gets_the_sum_of_both_replicas_gradients(layout_invariant):
    run_on_ranks(_sum_over_two_replicas, 2, layout_invariant, timeout=120)


LEAVES = 6  # three microbatches per replica: blocks [0, 3) and [3, 6)


def _leaves() -> list[list[torch.Tensor]]:
    """Per microbatch, each parameter's gradient; magnitudes far apart, so the order of sums shows."""
    g = torch.Generator().manual_seed(7)
    return [
        [torch.randn(shape, generator=g) * 10.0 ** torch.randint(-6, 7, shape, generator=g) for shape in SHAPES]
        for _ in range(LEAVES)
    ]


def _by_hand(leaves: list[torch.Tensor]) -> torch.Tensor:
    l0, l1, l2, l3, l4, l5 = leaves
    return ((l0 + l1) + (l2 + l3)) + (l4 + l5)


def _node_blocks_in_tree_order() -> None:
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        per_replica = LEAVES // 2
        node_levels = [canonical_nodes(r * per_replica, per_replica) for r in range(2)]
        assert node_levels == [[1, 0], [0, 1]]
        leaves = _leaves()
        mine = leaves[rank * per_replica : (rank + 1) * per_replica]
        # this replica's node sums: a pair and a single on replica 0, a single and a pair on replica 1
        nodes = [[m[0] + m[1], m[2]] for m in zip(*mine, strict=True)] if rank == 0 else None
        nodes = nodes or [[m[0], m[1] + m[2]] for m in zip(*mine, strict=True)]
        params = [nn.Parameter(torch.zeros(shape)) for shape in SHAPES]
        for p in params:
            p.grad = torch.full_like(p, float("nan"))  # overwritten by the sum
        nodes_of = {id(p): n for p, n in zip(params, nodes, strict=True)}
        replica_sum = ReplicaGradientSum(dist.group.WORLD, layout_invariant_reductions=True, bucket_bytes=60)
        replica_sum.watch(params, per_microbatch=True)
        replica_sum.begin_step(per_replica, node_levels=node_levels, nodes_of=lambda p: nodes_of[id(p)])
        replica_sum.finish()
        for index, p in enumerate(params):
            assert torch.equal(p.grad, _by_hand([leaf[index] for leaf in leaves])), (rank, index)
    finally:
        dist.destroy_process_group()


def test_microbatch_nodes_of_both_replicas_sum_as_one_canonical_tree():
    leaves = _leaves()
    sequential = [sum(leaf[i] for leaf in leaves) for i in range(len(SHAPES))]
    by_hand = [_by_hand([leaf[i] for leaf in leaves]) for i in range(len(SHAPES))]
    assert any(not torch.equal(s, t) for s, t in zip(sequential, by_hand, strict=True))  # the order shows
    run_on_ranks(_node_blocks_in_tree_order, 2, timeout=120)

"""lockstep.parallel.node_levels, its pure parts (no process group): the in-place tree over rows adds in
the canonical order (pairwise trees over the binary digits of the count, largest first, left to right),
bit for bit; the tree over W = n x g rows equals the tree over the n sums of aligned runs of g rows
exactly when g is a power of two, which is what lets a reduction sum inside each node first and across
nodes second without changing a bit; and ``run_length`` only ever returns a g whose aligned runs of axis
ranks each sit on one node. These matter because the two-level reductions are claimed to give the bits of
the flat one whatever the node count and ranks per node: a wrong order in the tree, or a g whose runs
straddle nodes, would make a multi-node run's loss differ from a one-node run's, or send the node-local
level over the slow links."""

from __future__ import annotations

import pytest
import torch

from lockstep.parallel.node_levels import run_length, tree_reduce_rows_
from tests.parallel.reference_sums import canonical


def _rows(count: int, seed: int, width: int = 64) -> torch.Tensor:
    """Values over many magnitudes, so that a different addition order changes low bits."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-20, 20, (count, width), generator=generator).float())
    return torch.randn(count, width, generator=generator) * scale


def test_the_in_place_tree_adds_in_the_canonical_order():
    for count in range(1, 34):
        rows = _rows(count, seed=count)
        expected = canonical(list(rows))
        work = rows.clone()
        total = tree_reduce_rows_(work)
        assert torch.equal(total, expected), count
        assert total.data_ptr() == work.data_ptr()  # a view of row 0, no fresh buffer
    with pytest.raises(ValueError, match="no rows"):
        tree_reduce_rows_(torch.empty(0, 3))


def test_two_levels_give_the_flat_trees_bits_for_power_of_two_runs():
    for g in (1, 2, 4, 8):
        for n in range(1, 8):
            rows = _rows(n * g, seed=100 * g + n)
            flat = tree_reduce_rows_(rows.clone())
            run_sums = torch.stack([tree_reduce_rows_(rows[k * g : (k + 1) * g].clone()) for k in range(n)])
            assert torch.equal(tree_reduce_rows_(run_sums), flat), (n, g)


def test_runs_that_are_not_a_power_of_two_would_change_the_bits():
    """The reason g is a power of two: with runs of 3 the two levels add in another order, and some data
    tells. (Without this, the test above could pass for any g.)"""
    differs = 0
    for seed in range(20):
        rows = _rows(6, seed=seed)
        flat = tree_reduce_rows_(rows.clone())
        two_level = tree_reduce_rows_(torch.stack([tree_reduce_rows_(rows[k : k + 3].clone()) for k in (0, 3)]))
        differs += not torch.equal(flat, two_level)
    assert differs > 0


def _axis_groups(sizes: dict[str, int], axis: str) -> list[list[int]]:
    """The global ranks of every group of `axis` in a (pp, dp_replicate, dp_shard, tp) mesh, in axis
    order, as lockstep.parallel.mesh lays ranks out (row-major, tp innermost)."""
    names = ("pp", "dp_replicate", "dp_shard", "tp")
    grid = torch.arange(torch.tensor([sizes[a] for a in names]).prod().item()).reshape([sizes[a] for a in names])
    dim = names.index(axis)
    return [row.tolist() for row in grid.movedim(dim, -1).reshape(-1, sizes[axis])]


def test_run_length_of_mesh_layouts_matches_the_ranks_each_node_holds():
    one = {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 1}
    cases = [  # (sizes, axis, ranks per node, g derived by hand)
        ({**one, "dp_shard": 16}, "dp_shard", 8, 8),  # 2 nodes of 8 shard ranks
        ({**one, "dp_shard": 8, "tp": 2}, "dp_shard", 8, 4),  # tp 2 inside a node of 8: 4 shard ranks each
        ({**one, "dp_shard": 12}, "dp_shard", 6, 2),  # runs of 6 ranks: 2 is the largest power of two in 6
        ({**one, "dp_replicate": 4, "dp_shard": 4}, "dp_replicate", 8, 2),  # stride 4 in nodes of 8
        ({**one, "dp_replicate": 4, "dp_shard": 4}, "dp_shard", 8, 4),  # a node holds 2 whole shard groups
        ({**one, "dp_shard": 8, "tp": 8}, "dp_shard", 8, 1),  # one shard rank per node
        ({**one, "dp_shard": 6}, "dp_shard", 4, 1),  # runs of 4 and 2: not one length, flat
    ]
    for sizes, axis, per_node, g in cases:
        found = {run_length(ranks, per_node) for ranks in _axis_groups(sizes, axis)}
        assert found == {g}, (sizes, axis, per_node, found)
    assert run_length([0, 4, 1, 5], 4) == 1  # each node holds two separate runs: not consecutive in axis order


def test_every_run_length_is_a_power_of_two_whose_aligned_runs_share_a_node():
    for tp in (1, 2, 4):
        for shard in (1, 2, 3, 4, 6, 8, 12, 16):
            for replicate in (1, 2, 3):
                sizes = {"pp": 2, "dp_replicate": replicate, "dp_shard": shard, "tp": tp}
                for per_node in (1, 2, 3, 4, 6, 8, 16):
                    for axis in ("dp_shard", "dp_replicate"):
                        for ranks in _axis_groups(sizes, axis):
                            g = run_length(ranks, per_node)
                            assert g & (g - 1) == 0 and len(ranks) % g == 0, (sizes, per_node, axis, g)
                            for k in range(0, len(ranks), g):
                                assert len({r // per_node for r in ranks[k : k + g]}) == 1, (sizes, per_node, axis)

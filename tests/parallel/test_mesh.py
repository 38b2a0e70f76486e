"""lockstep.parallel.mesh, built in a fake process group (one process plays each rank in turn, no
communication): the axes are laid out pp, dp_replicate, dp_shard, tp from outermost to innermost (a
rank's coordinates are its row-major digits, so tensor-parallel peers are consecutive ranks and stay on a
node), and the flattened "dp" axis ranks a process dp_replicate index x dp_shard degree + dp_shard index.
This matters because the data loader hands each data-parallel rank the microbatch block of that "dp"
rank: if the flattened order disagreed with the replicate/shard indices, two ranks would train on the
same samples and others on none, with no error. Degrees of 3 keep a stride mistake from hiding behind a
symmetric layout."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from lockstep.config.job import ParallelDims
from lockstep.parallel.mesh import AXES, axis_rank, build_mesh
from lockstep.tools.estimate.trace import fake_world


def _digits(rank: int, sizes: tuple[int, ...]) -> list[int]:
    """Row-major coordinates, the last size varying fastest."""
    digits = []
    for size in reversed(sizes):
        digits.append(rank % size)
        rank //= size
    return digits[::-1]


def test_coordinates_are_row_major_and_dp_is_replicate_then_shard():
    dims = ParallelDims(pp=2, dp_replicate=3, dp_shard=2, tp=2)
    sizes = (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp)
    assert dims.world_size == 24
    seen_dp = set()
    for rank in range(dims.world_size):
        with fake_world(rank, dims.world_size):
            mesh = build_mesh(dims, torch.device("cpu"))
            assert isinstance(mesh, DeviceMesh) and mesh.mesh_dim_names == AXES
            coords = _digits(rank, sizes)
            assert [axis_rank(mesh, axis) for axis in AXES] == coords, rank
            pp, replicate, shard, _ = coords
            dp = axis_rank(mesh, "dp")
            assert dp == replicate * dims.dp_shard + shard, rank
            assert sorted(torch.distributed.get_process_group_ranks(mesh.get_group("tp"))) == [
                rank - rank % dims.tp + i for i in range(dims.tp)
            ]  # tensor-parallel peers are consecutive ranks
            seen_dp.add((pp, dp))
    assert seen_dp == {(p, d) for p in range(dims.pp) for d in range(dims.dp_replicate * dims.dp_shard)}


def test_one_process_has_no_mesh_unless_asked_and_then_every_axis_is_rank_0():
    dims = ParallelDims(pp=1, dp_replicate=1, dp_shard=1, tp=1)
    assert build_mesh(dims, torch.device("cpu")) is None
    assert [axis_rank(None, axis) for axis in (*AXES, "dp")] == [0] * 5
    with fake_world(0, 1):
        mesh = build_mesh(dims, torch.device("cpu"), single=True)
        assert mesh is not None and [axis_rank(mesh, axis) for axis in (*AXES, "dp")] == [0] * 5

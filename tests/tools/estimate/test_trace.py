"""lockstep.tools.estimate.trace's layout helpers: a global rank's mesh coordinates are the ones
build_mesh gives it (checked against a real DeviceMesh in a fake world), each pipeline stage's traced rank
is the first of that stage's ranks, and only schedules with one stage per rank are traced."""

from __future__ import annotations

import pytest
import torch

from lockstep.config.job import ParallelDims
from lockstep.config.sections import MULTI_STAGE_SCHEDULES, SINGLE_STAGE_SCHEDULES, ParallelismConfig
from lockstep.parallel.mesh import AXES, build_mesh
from lockstep.tools.estimate.trace import fake_world, rank_coordinates, stage_ranks, traceable

DIMS = ParallelDims(pp=2, dp_replicate=2, dp_shard=3, tp=2)  # every axis above 1, all sizes unlike


@pytest.mark.parametrize("rank", [0, 1, 5, 6, 11, 12, 17, 23])
def test_rank_coordinates_are_the_meshs(rank):
    with fake_world(rank, DIMS.world_size):
        mesh = build_mesh(DIMS, torch.device("cpu"))
        expected = dict(zip(AXES, mesh.get_coordinate(), strict=True))
    assert rank_coordinates(DIMS, rank) == expected


def test_each_stage_is_traced_on_its_first_rank():
    ranks = range(DIMS.world_size)
    first = [min(r for r in ranks if rank_coordinates(DIMS, r)["pp"] == stage) for stage in range(DIMS.pp)]
    assert stage_ranks(DIMS) == first
    assert stage_ranks(ParallelDims(pp=1, dp_replicate=1, dp_shard=4, tp=2)) == [0]


def test_only_schedules_with_one_stage_per_rank_are_traceable():
    for schedule in SINGLE_STAGE_SCHEDULES:
        assert traceable(ParallelismConfig(pipeline_parallel_degree=2, pipeline_parallel_schedule=schedule))
    for schedule in MULTI_STAGE_SCHEDULES:
        assert not traceable(ParallelismConfig(pipeline_parallel_degree=2, pipeline_parallel_schedule=schedule))
        assert traceable(ParallelismConfig(pipeline_parallel_degree=1, pipeline_parallel_schedule=schedule))

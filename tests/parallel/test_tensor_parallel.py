"""lockstep.parallel.tensor_parallel: ``shared_parameters`` finds every parameter more than one module
holds (a tied embedding and output projection) and nothing else; after a plan replaced each holder's copy
the holders are tied again to the first one's split parameter, or refused when the plan split them
differently; plan entries for modules this stage does not hold are skipped. These matter because a tied
weight that came apart would be trained as two parameters (each getting half the gradient) and saved
twice, and a tie split two ways would silently mix rows with columns."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lockstep.parallel.tensor_parallel import apply_tensor_parallel, shared_parameters, tie_again
from tests.distributed import run_on_ranks


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.hidden = nn.Linear(4, 4, bias=False)
        self.output = nn.Linear(4, 8, bias=False)
        self.output.weight = self.embed.weight


def test_shared_parameters_are_the_tied_ones_with_every_holder():
    model = _Tied()
    shared = shared_parameters(model)
    assert [[(name, param) for name, _, param in places] for places in shared] == [
        [("embed", "weight"), ("output", "weight")]
    ]
    assert shared[0][1][1] is model.output
    model.output.weight = nn.Parameter(model.embed.weight.detach().clone())
    assert shared_parameters(model) == []


def test_holders_replaced_separately_are_tied_again_to_the_first():
    model = _Tied()
    shared = shared_parameters(model)
    model.embed.weight = nn.Parameter(torch.zeros(8, 4))  # as a plan replaces each holder's parameter
    model.output.weight = nn.Parameter(torch.ones(8, 4))
    tie_again(shared)
    assert model.output.weight is model.embed.weight
    assert torch.equal(model.output.weight, torch.zeros(8, 4))
    assert len(list(model.parameters())) == 2  # embed/output once, and hidden
    tie_again(shared)  # already tied: nothing to do
    assert model.output.weight is model.embed.weight


def _two_ranks() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    dist.init_process_group("gloo")
    try:
        mesh = init_device_mesh("cpu", (2,))
        model = _Tied()
        plan = {"embed": RowwiseParallel(input_layouts=Replicate()), "output": ColwiseParallel(output_layouts=Replicate()),
                "layers.7.attention": ColwiseParallel()}  # fmt: skip  # a module another stage holds: skipped
        apply_tensor_parallel(model, mesh, plan)
        assert model.output.weight is model.embed.weight
        assert isinstance(model.embed.weight, DTensor) and model.embed.weight.placements == (Shard(0),)
        assert not isinstance(model.hidden.weight, DTensor)
        with pytest.raises(ValueError, match=r"splits the tied parameter embed.weight \(\(Shard\(dim=0\),\)\) and output.weight \(\(Shard\(dim=1\),\)\) differently"):  # fmt: skip
            apply_tensor_parallel(_Tied(), mesh, {"embed": RowwiseParallel(input_layouts=Replicate()), "output": RowwiseParallel()})  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_a_plan_over_two_ranks_keeps_the_tie_split_by_vocabulary_and_refuses_two_splits():
    run_on_ranks(_two_ranks, 2)

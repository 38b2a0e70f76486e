"""lockstep.parallel.fsdp: grouped expert weights whose expert count the degree does not divide are sharded
on dim 1 (when it divides that), everything else on FSDP's default; the policy computes in the run's dtype,
reduces in fp32 and casts inputs only at the root; over two ranks ``apply_fsdp`` returns the blocks then the
root, keeps the root unsharded after forward, gives every unit the sum reduction with divide factor 1 and
the canonical reduce-scatter, and the sharded gradient is the sum of the two ranks' gradients. These matter
because the loss is already divided by the global token count (an average would divide twice), gloo has no
AVG, and padding 16 experts to 64 rows would make every expert buffer grow with the degree."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Shard

from lockstep.parallel.canonical import TreeReduceScatter
from lockstep.parallel.fsdp import _policy, apply_fsdp, shard_placement
from tests.distributed import run_on_ranks


def test_grouped_experts_are_sharded_on_dim_1_only_when_dim_0_cannot_be():
    place = shard_placement(4)
    assert place(nn.Parameter(torch.empty(3, 8, 2))) == Shard(1)  # 3 experts over 4 ranks: by rows instead
    assert place(nn.Parameter(torch.empty(8, 8, 2))) is None  # the experts divide: FSDP's dim 0
    assert place(nn.Parameter(torch.empty(3, 6, 2))) is None  # neither divides: FSDP pads dim 0
    assert place(nn.Parameter(torch.empty(3, 8))) is None  # not a grouped weight
    assert shard_placement(64)(nn.Parameter(torch.empty(16, 128, 4))) == Shard(1)
    assert shard_placement(1)(nn.Parameter(torch.empty(3, 5, 2))) is None


def test_the_policy_computes_in_the_runs_dtype_reduces_in_fp32_and_casts_at_the_root_only():
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for root in (True, False):
            policy = _policy(name, root)
            assert (policy.param_dtype, policy.reduce_dtype, policy.cast_forward_inputs) == (dtype, torch.float32, root)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleDict({str(i): nn.Linear(4, 4) for i in range(2)})
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            x = torch.tanh(layer(x))
        return self.head(x)


def _inputs(rank: int) -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(10 + rank))


def _two_ranks() -> None:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    try:
        rank, mesh = dist.get_rank(), init_device_mesh("cpu", (2,))
        plain = _Model()
        expected = {}
        for r in range(2):
            plain.zero_grad(set_to_none=True)
            plain(_inputs(r)).square().sum().backward()
            for name, p in plain.named_parameters():
                expected[name] = p.grad.clone() if r == 0 else expected[name] + p.grad
        model = _Model()
        tree = TreeReduceScatter()
        units = apply_fsdp(model, shard_mesh=mesh, mixed_precision="fp32", reshard_after_forward=True,
                           canonical_reduce_scatter=tree)  # fmt: skip
        assert units == [model.layers["0"], model.layers["1"], model]
        for unit in units:
            (group,) = unit._get_fsdp_state()._fsdp_param_groups
            assert group._reduce_scatter_comm is tree
            assert group.force_sum_reduction_for_comms and group.gradient_divide_factor == 1.0
            assert (group.post_forward_mesh_info is None) == (unit is model)  # the root stays unsharded
        model(_inputs(rank)).square().sum().backward()
        for name, p in model.named_parameters():
            assert torch.equal(p.grad.full_tensor(), expected[name]), name  # two operands: one order
    finally:
        dist.destroy_process_group()


def test_two_ranks_sum_their_gradients_through_the_canonical_reduce_scatter():
    run_on_ranks(_two_ranks, 2)

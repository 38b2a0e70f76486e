"""FSDP2 (``fully_shard``) over the "dp_shard" mesh axis: one unit per transformer block plus the root.

Gradients are always reduced with SUM and a divide factor of 1: the loss is already divided by the
global token count, and gloo has neither PREMUL_SUM nor AVG. With layout-invariant reductions in
fp32 and bf16 the reduce-scatter is ``TreeReduceScatter`` (canonical order, inside the node first and
then across nodes); with the reductions off it is the backend's own, which promises no order. The replicate
axis of HSDP is summed by lockstep.parallel.replicate (in buckets overlapped with backward, in
canonical order when asked) rather than by FSDP's all-reduce, whose order over more than two
replicas is not fixed.

Grouped expert weights ([E, out, in]) whose expert count the shard degree does not divide are sharded
on dim 1 (``shard_placement``): FSDP pads dim 0 to a multiple of the degree, so 16 experts over 64
ranks would be padded to 64 rows, and every all-gather, reduce-scatter and unsharded buffer of the
experts would grow with the degree.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from lockstep.parallel.canonical import TreeReduceScatter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _policy(mixed_precision: str, root: bool) -> MixedPrecisionPolicy:
    """Compute in `mixed_precision`, reduce in fp32. Only the root casts its floating inputs (a pipeline
    stage's activations): a block's are the activations, already in the compute dtype, and the RoPE
    table, which stays fp32 and is applied in fp32 (a bf16 table is off by up to 2e-3 at 8k positions)."""
    return MixedPrecisionPolicy(
        param_dtype=DTYPES[mixed_precision], reduce_dtype=torch.float32, cast_forward_inputs=root
    )


def shard_placement(degree: int):
    """FSDP's ``shard_placement_fn``: dim 1 for a 3-D (grouped experts) parameter whose dim 0 the
    degree does not divide and whose dim 1 it does; None (FSDP's default, dim 0) for the rest."""

    def placement(param: nn.Parameter) -> Shard | None:
        if param.dim() == 3 and param.shape[0] % degree and not param.shape[1] % degree:
            return Shard(1)
        return None

    return placement


def apply_fsdp(
    model: nn.Module,
    *,
    shard_mesh: DeviceMesh,
    mixed_precision: str,
    reshard_after_forward: bool,
    canonical_reduce_scatter: TreeReduceScatter | None,
    ignored_params: set[nn.Parameter] | None = None,
) -> list[FSDPModule]:
    """Shard `model` in place; returns its FSDP modules, blocks first and the root last. Parameters
    are computed in `mixed_precision` ("fp32" or "bf16") and reduced in fp32, by
    `canonical_reduce_scatter` when given (else the backend's own)."""
    units: list[nn.Module] = list(model.layers.values()) + [model]
    for unit in units:
        # The root's parameters (embedding, final norm, output) are needed again right away in backward.
        keep = unit is model or not reshard_after_forward
        fully_shard(
            unit, mesh=shard_mesh, mp_policy=_policy(mixed_precision, root=unit is model),
            reshard_after_forward=not keep, ignored_params=ignored_params,
            shard_placement_fn=shard_placement(shard_mesh.size()),
        )  # fmt: skip
    fsdp_modules: list[FSDPModule] = units  # type: ignore[assignment]  # fully_shard changed their class
    for module in fsdp_modules:
        module.set_force_sum_reduction_for_comms(True)
        module.set_gradient_divide_factor(1.0)
        if canonical_reduce_scatter is not None:
            module.set_custom_reduce_scatter(canonical_reduce_scatter)
    return fsdp_modules

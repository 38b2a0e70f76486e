"""Tensor and sequence parallelism: apply a model's declarative DTensor plan over the "tp" mesh axis.

Each model declares its plan (``models/<name>/parallel_plan.py``): module name -> ParallelStyle.
Modules a pipeline stage does not hold (the embedding on later stages, say) are skipped.

A parameter that several modules share (a tied embedding and output projection) is replaced by each
module's style separately; it is tied again afterwards, to the first module's DTensor, which the
plans split the same way (by vocabulary) for every holder.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, ParallelStyle]) -> None:
    present = dict(model.named_modules())
    shared = shared_parameters(model)
    parallelize_module(model, tp_mesh, {name: style for name, style in plan.items() if name in present})
    tie_again(shared)


def shared_parameters(model: nn.Module) -> list[list[tuple[str, nn.Module, str]]]:
    """(module name, module, parameter name) of every parameter held by more than one module."""
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append((module_name, module, name))
    return [places for places in holders.values() if len(places) > 1]


def tie_again(shared: list[list[tuple[str, nn.Module, str]]]) -> None:
    """Point every holder of a shared parameter at the first holder's (split) parameter again."""
    for (first_name, first, name), *others in shared:
        param = getattr(first, name)
        for module_name, module, other_name in others:
            other = getattr(module, other_name)
            if other is param:
                continue
            layouts = [t.placements if isinstance(t, DTensor) else "whole" for t in (param, other)]
            if layouts[0] != layouts[1]:
                raise ValueError(
                    f"tensor parallelism splits the tied parameter {first_name}.{name} ({layouts[0]}) and "
                    f"{module_name}.{other_name} ({layouts[1]}) differently"
                )
            module.register_parameter(other_name, param)

"""Tensor and sequence parallelism: apply a model's declarative DTensor plan over the "tp" mesh axis.

Each model declares its plan (``models/<name>/parallel_plan.py``): module name -> ParallelStyle.
Modules a pipeline stage does not hold (the embedding on later stages, say) are skipped.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, ParallelStyle]) -> None:
    present = dict(model.named_modules())
    parallelize_module(model, tp_mesh, {name: style for name, style in plan.items() if name in present})

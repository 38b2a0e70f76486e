"""The parallel layout: degrees resolved against the world size, and the DeviceMesh built from them.

Axis order, outermost first: pp, dp_replicate, dp_shard, tp. Tensor parallelism is innermost so
its (most frequent) collectives stay within a node; pipeline stages are outermost. Data-parallel
rank = dp_replicate index x dp_shard degree + dp_shard index, which is also the rank of the
flattened "dp" axis: the data loader hands out contiguous microbatch blocks in that order.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lockstep.config.job import ParallelDims

AXES = ("pp", "dp_replicate", "dp_shard", "tp")


def build_mesh(dims: ParallelDims, device: torch.device, single: bool = False) -> DeviceMesh | None:
    """One DeviceMesh over all axes (size-1 axes included, so code can always slice by name), plus
    the flattened "dp" axis. None for a single process, unless `single` asks for a mesh of one rank."""
    if dims.world_size == 1 and not single:
        return None
    mesh = init_device_mesh(device.type, dims.sizes(), mesh_dim_names=AXES)
    mesh["dp_replicate", "dp_shard"]._flatten("dp")
    return mesh


def axis_rank(mesh: DeviceMesh | None, axis: str) -> int:
    return 0 if mesh is None else mesh.get_local_rank(axis)

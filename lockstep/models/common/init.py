"""Initialise parameters from (root seed, parameter name, element index) alone.

A parameter's rows (dim 0) are cut into fixed blocks whose size depends only on its global shape. Block
b of parameter `name` is drawn, rows whole, from its own generator seeded by a hash of (root seed, name,
b). So any element's initial value is a function of the seed, the name and its global index: not of
creation order, device, rank or layout. A rank fills only the blocks its shard covers (a DTensor's local
shard is a box of the global tensor; a shard split along another dim draws the block's full rows and
keeps its columns), with no collective, and every parallel layout starts from the same weights.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

# fills `tensor` in place with values drawn from `generator`
InitFn = Callable[[torch.Tensor, torch.Generator], None]

BLOCK_ELEMENTS = 1 << 20
"""Target elements per block (4 MiB in fp32). Part of the definition of the initial values: changing it
changes every parameter larger than one block."""


def parameter_seed(root_seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{root_seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def block_seed(root_seed: int, name: str, block: int) -> int:
    """The seed of block `block` of parameter `name`."""
    return parameter_seed(root_seed, f"{name}#{block}")


def rows_per_block(shape: Sequence[int]) -> int:
    """Whole rows per block: as many as fit BLOCK_ELEMENTS, at least one (a row larger than that, such
    as one expert of a grouped weight, is a block of its own)."""
    return max(1, BLOCK_ELEMENTS // max(1, math.prod(shape[1:])))


def trunc_normal(std: float, cutoff_stds: float = 3.0) -> InitFn:
    def fill(tensor: torch.Tensor, generator: torch.Generator) -> None:
        a = -cutoff_stds * std
        nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=a, b=-a, generator=generator)

    return fill


def normal(std: float) -> InitFn:
    def fill(tensor: torch.Tensor, generator: torch.Generator) -> None:
        nn.init.normal_(tensor, mean=0.0, std=std, generator=generator)

    return fill


def ones(tensor: torch.Tensor, generator: torch.Generator) -> None:
    nn.init.ones_(tensor)


def zeros(tensor: torch.Tensor, generator: torch.Generator) -> None:
    nn.init.zeros_(tensor)


def _block(name: str, shape: Sequence[int], block: int, root_seed: int, init_fn: InitFn) -> torch.Tensor:
    """Block `block` of parameter `name`, all of its rows whole, in fp32 on the CPU (CPU generators
    give the same stream on every machine)."""
    per_block = rows_per_block(shape)
    rows = min(per_block, shape[0] - block * per_block)
    value = torch.empty((rows, *shape[1:]), dtype=torch.float32)
    init_fn(value, torch.Generator(device="cpu").manual_seed(block_seed(root_seed, name, block)))
    return value


def initial_values(
    name: str,
    shape: Sequence[int],
    root_seed: int,
    init_for: Callable[[str], InitFn],
    offset: Sequence[int] | None = None,
    local_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """The fp32 initial values of the box [offset, offset + local_shape) of parameter `name` of global
    `shape` (the whole parameter by default). Only the blocks the box's rows touch are drawn."""
    if len(shape) == 0:
        return initial_values(name, (1,), root_seed, init_for).reshape(())
    offset = tuple(offset) if offset is not None else (0,) * len(shape)
    local_shape = tuple(local_shape) if local_shape is not None else tuple(shape)
    out = torch.empty(local_shape, dtype=torch.float32)
    if out.numel() == 0:
        return out
    init_fn = init_for(name)
    per_block = rows_per_block(shape)
    first, end = offset[0], offset[0] + local_shape[0]
    columns = tuple(slice(o, o + n) for o, n in zip(offset[1:], local_shape[1:], strict=True))
    for block in range(first // per_block, (end - 1) // per_block + 1):
        start = block * per_block
        lo, hi = max(first, start), min(end, start + per_block)
        values = _block(name, shape, block, root_seed, init_fn)
        out[lo - first : hi - first] = values[(slice(lo - start, hi - start), *columns)]
    return out


def full_value(name: str, shape: torch.Size, root_seed: int, init_for: Callable[[str], InitFn]) -> torch.Tensor:
    """The fp32 initial value of the whole parameter `name`: a function of (root_seed, name) only."""
    return initial_values(name, shape, root_seed, init_for)


def local_box(param: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global offset, shape) of the part of `param` this rank holds: a DTensor's local shard is a box
    of the global tensor (the same assumption DCP's checkpoints make); a plain tensor is all of it."""
    if isinstance(param, DTensor):
        local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return tuple(offset), tuple(local_shape)
    return (0,) * param.ndim, tuple(param.shape)


@torch.no_grad()
def initialize_parameters(model: nn.Module, root_seed: int, init_for: Callable[[str], InitFn]) -> None:
    """Fill every parameter of a materialised model; a DTensor parameter gets only its local shard,
    drawn locally (no collective, nothing of the size of the full parameter)."""
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        offset, local_shape = local_box(param)
        if tuple(local.shape) != local_shape:
            raise RuntimeError(f"{name}: local shard {tuple(local.shape)} is not the box {local_shape} at {offset}")
        local.copy_(initial_values(name, param.shape, root_seed, init_for, offset, local_shape))

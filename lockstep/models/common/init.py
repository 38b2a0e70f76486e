"""Initialise parameters from (root seed, parameter name) alone.

Each parameter gets its own generator seeded from a hash of the root seed and its fully
qualified name, and is filled as a full tensor on the CPU. So a parameter's initial value does not
depend on creation order, device, or rank, and every parallel layout starts from the same weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn

# fills `tensor` in place with values drawn from `generator`
InitFn = Callable[[torch.Tensor, torch.Generator], None]


def parameter_seed(root_seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{root_seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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


def full_value(name: str, shape: torch.Size, root_seed: int, init_for: Callable[[str], InitFn]) -> torch.Tensor:
    """The fp32 initial value of parameter `name`: a function of (root_seed, name) only."""
    generator = torch.Generator(device="cpu").manual_seed(parameter_seed(root_seed, name))
    value = torch.empty(shape, dtype=torch.float32)
    init_for(name)(value, generator)
    return value


@torch.no_grad()
def initialize_parameters(model: nn.Module, root_seed: int, init_for: Callable[[str], InitFn]) -> None:
    """Fill every parameter of a materialised model; DTensor parameters get their local shard."""
    for name, param in model.named_parameters():
        value = full_value(name, param.shape, root_seed, init_for)
        if hasattr(param, "device_mesh"):  # DTensor: distribute the full value the same way
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
            param.to_local().copy_(value.to_local())
        else:
            param.copy_(value)

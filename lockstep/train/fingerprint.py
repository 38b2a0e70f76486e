"""Fingerprints: one hash of a whole model's tensors that any layout reproduces.

Each tensor is hashed as its full value (DTensors are gathered first; shards never are hashed), in the
model's fixed parameter order, and pipeline stages pool their per-tensor digests. So two runs that
compute the same numbers in different layouts log the same fingerprint, and the first step where
fingerprints differ is where the numbers parted.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from lockstep.parallel.canonical import full_value


def tensor_digest(tensor: torch.Tensor) -> str:
    data = full_value(tensor).detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def model_fingerprint(
    named: dict[str, torch.Tensor], all_names: list[str], stage_group: dist.ProcessGroup | None = None
) -> str:
    """Hash of the tensors in `named` (this rank's stages), pooled over pipeline stages, in the order
    of `all_names`. Every rank of the stage group gets the same value."""
    digests = {name: tensor_digest(named[name]) for name in all_names if name in named}
    if stage_group is not None and dist.get_world_size(stage_group) > 1:
        pooled: list[dict] = [{} for _ in range(dist.get_world_size(stage_group))]
        dist.all_gather_object(pooled, digests, group=stage_group)
        digests = {k: v for part in pooled for k, v in part.items()}
    combined = hashlib.blake2b(digest_size=16)
    for name in all_names:
        if name in digests:
            combined.update(f"{name}:{digests[name]}\n".encode())
    return combined.hexdigest()

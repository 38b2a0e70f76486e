"""Seeds and deterministic execution.

One root seed (``debug.seed``) feeds every random stream through named offsets, so nothing
random is left to chance and every stream can be logged and reproduced.
"""

from __future__ import annotations

import hashlib
import os
import random
import secrets

import numpy as np
import torch

from lockstep.config.sections import DebugConfig


def resolve_root_seed(debug: DebugConfig) -> int:
    """The configured seed, or a fresh one (which the caller logs and writes into config.toml)."""
    return debug.seed if debug.seed is not None else secrets.randbits(63)


def agree_on_seed(seed: int) -> int:
    """Rank 0's seed on every rank (a drawn seed differs per process until broadcast)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return seed
    box = [seed]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def derived_seed(root_seed: int, stream: str) -> int:
    """A 63-bit seed for a named stream (e.g. "torch", "pipeline_stage_1"), fixed by the root seed."""
    digest = hashlib.sha256(f"{root_seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_everything(root_seed: int) -> dict[str, int]:
    """Seed torch (CPU and CUDA), Python and NumPy global generators; returns the seeds, for env.json."""
    seeds = {
        "root": root_seed,
        "torch": derived_seed(root_seed, "torch"),
        "python": derived_seed(root_seed, "python"),
    }
    torch.manual_seed(seeds["torch"])
    random.seed(seeds["python"])
    np.random.seed(seeds["python"] % 2**32)
    return seeds


def configure_determinism(debug: DebugConfig) -> None:
    """Apply debug.deterministic and debug.detect_anomaly to this process. Call before touching CUDA."""
    if debug.deterministic:
        # cuBLAS needs this before its first handle is created to pick deterministic reductions.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=debug.deterministic_warn_only)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        # Filling fresh memory with NaN costs time and does not change any result of a correct program.
        torch.utils.deterministic.fill_uninitialized_memory = False
    torch.autograd.set_detect_anomaly(debug.detect_anomaly)

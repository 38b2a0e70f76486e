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
import torch.distributed as dist
from torch.distributed.tensor._random import manual_seed

from lockstep.config.errors import ConfigError
from lockstep.config.sections import DebugConfig


def resolve_root_seed(debug: DebugConfig) -> int:
    """The configured seed, or a fresh one (which the caller logs and writes into config.toml)."""
    return debug.seed if debug.seed is not None else secrets.randbits(63)


def agree_on_seed(seed: int) -> int:
    """Rank 0's seed on every rank (a drawn seed differs per process until broadcast)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return seed
    box = [seed]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def derived_seed(root_seed: int, stream: str) -> int:
    """A 63-bit seed for a named stream (e.g. "torch", "pipeline_stage_1"), fixed by the root seed."""
    digest = hashlib.sha256(f"{root_seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def torch_seed(root_seed: int, pipeline_rank: int) -> int:
    """Identical across data/tensor-parallel ranks (they must draw the same numbers), distinct per
    pipeline rank (its stages hold different layers)."""
    return derived_seed(root_seed, "torch" if pipeline_rank == 0 else f"torch/pipeline_rank_{pipeline_rank}")


def seed_everything(root_seed: int, pipeline_rank: int = 0, mesh=None) -> dict:
    """Seed torch (CPU and CUDA), DTensor's RNG on CUDA meshes, Python and NumPy; returns every seed
    of the run (all pipeline ranks' included), for env.json."""
    pipeline_degree = 1 if mesh is None else mesh["pp"].size()
    seeds = {
        "root": root_seed,
        "torch": torch_seed(root_seed, pipeline_rank),
        "torch_by_pipeline_rank": [torch_seed(root_seed, r) for r in range(pipeline_degree)],
        "python": derived_seed(root_seed, "python"),
        "data": derived_seed(root_seed, "data"),
    }
    torch.manual_seed(seeds["torch"])
    random.seed(seeds["python"])
    np.random.seed(seeds["python"] % 2**32)
    if mesh is not None and mesh.device_type == "cuda":
        # Over the SPMD axes only: the stages of a pipeline keep their own seeds.
        manual_seed(seeds["torch"], mesh["dp_replicate", "dp_shard", "tp"])
        seeds["dtensor"] = seeds["torch"]
    return seeds


def configure_determinism(debug: DebugConfig) -> None:
    """Apply debug.deterministic and debug.detect_anomaly to this process. Call before touching CUDA."""
    if debug.deterministic:
        # cuBLAS needs this before its first handle is created to pick deterministic reductions.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # NCCL picks ring or tree per message size and topology, and the two sum in different orders.
        # The canonical reductions do no arithmetic in NCCL, but FSDP's native bf16 reduce-scatter does:
        # pin one algorithm (read when the communicator is created, so before the process group).
        os.environ.setdefault("NCCL_ALGO", "Ring")
        torch.use_deterministic_algorithms(True, warn_only=debug.deterministic_warn_only)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        # Filling fresh memory with NaN costs time and does not change any result of a correct program.
        torch.utils.deterministic.fill_uninitialized_memory = False
        # SDPA on CUDA: flash and memory-efficient attention take a deterministic backward in strict mode
        # (and warn in warn-only mode); cuDNN attention has none and raises no alert, so it is turned off.
        torch.backends.cuda.enable_cudnn_sdp(False)
        refuse_timed_kernel_choice()
    torch.autograd.set_detect_anomaly(debug.detect_anomaly)


def refuse_timed_kernel_choice() -> None:
    """Fail closed on inductor's max-autotune (e.g. TORCHINDUCTOR_MAX_AUTOTUNE=1): it picks compiled
    kernels, FlexAttention's among them, by timing candidate tilings, so two runs can pick different
    ones and sum in different orders. Without it each kernel has one configuration, and torch's
    deterministic mode narrows the reductions' candidates to one (inductor reads it when compiling).
    Inductor's own deterministic mode (TORCHINDUCTOR_DETERMINISTIC=1) chooses without timing: allowed."""
    import torch._inductor.config as inductor

    if (inductor.max_autotune or inductor.max_autotune_gemm) and not inductor.deterministic:
        raise ConfigError(
            "debug.deterministic",
            "inductor max-autotune picks kernels by timing them; unset TORCHINDUCTOR_MAX_AUTOTUNE(_GEMM) "
            "or set TORCHINDUCTOR_DETERMINISTIC=1",
        )

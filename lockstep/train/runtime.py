"""What a training process sets up before it builds anything, in the order one function owns.

``start_runtime`` checks the config against the world, resolves the parallel degrees, takes the run
lock (rank 0: a second run of the folder is refused before any work), recovers a resumed run's seed,
picks the device, sets the collective timeouts' environment (before any process group), resolves the
attention kernel, sets the deterministic flags, runs the caller's preparation that must precede the
process group (tokenizing, under a file lock, so no collective waits on it), starts the process
group, builds the mesh, agrees on the root seed and seeds every stream.

``Runtime.environment_record`` is env.json's record of the process so set up.

If any stage fails, what the earlier stages started (the lock, the process group) is ended before
the error goes on; once started, ``Runtime.abandon`` ends it for a caller whose later stages fail.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from lockstep.config import JobConfig, validate_job_config
from lockstep.config.errors import ConfigError
from lockstep.config.job import ParallelDims, deterministic_chunks, resolve_parallel_dims, run_folder
from lockstep.config.sections import TrainingConfig
from lockstep.determinism.seeds import agree_on_seed, configure_determinism, resolve_root_seed, seed_everything
from lockstep.models.common.attention import resolve_attention_backend
from lockstep.models.registry import typed_overrides
from lockstep.parallel.mesh import AXES, axis_rank, build_mesh
from lockstep.parallel.node_levels import AxisLevels, levels_record
from lockstep.parallel.parallelize import check_model_fits_layout
from lockstep.parallel.process_group import WorldInfo, destroy_process_group, init_process_group, world_from_env
from lockstep.run.folder import environment
from lockstep.run.lock import RunLock
from lockstep.run.resume import resumed_seed
from lockstep.train.resilience.comm import CommTimeouts

Prepared = TypeVar("Prepared")


def resolve_device(training: TrainingConfig) -> torch.device:
    if training.device == "cuda" or (training.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("training.device", "cuda was asked for but torch sees no CUDA device")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@dataclass
class Runtime:
    """The process's setup: where it runs, under which lock, over which group and mesh, with which seeds."""

    config: JobConfig
    """The job config, its cross-section values resolved (model.overrides typed, debug.seed agreed)."""
    world: WorldInfo
    dims: ParallelDims
    run_folder: Path
    """Under fault tolerance, this replica group's own."""
    device: torch.device | None = None
    comm: CommTimeouts | None = None
    attention_backend: str = ""
    """model.attention = auto resolved for the device (env.json records it)."""
    fsdp: bool = False
    """bf16 training is FSDP's mixed precision in every layout (docs/layout-invariance.md), over a mesh
    of one rank when nothing is sharded, so that every layout computes the same bf16 numbers."""
    run_lock: RunLock | None = None
    """Rank 0's hold on the run folder for the life of the run."""
    owns_process_group: bool = False
    """This process started the group (a caller may have started one before), so it ends it."""
    mesh: DeviceMesh | None = None
    seeds: dict | None = None

    def environment_record(self, *, fingerprints: dict[str, str], reduction_levels: dict[str, AxisLevels]) -> dict:
        """env.json's record of this process (versions, device, world, seeds), with the data's
        fingerprints and the layout as it ran."""
        debug = self.config.debug
        layout = {
            "degrees": dict(zip(AXES, self.dims.sizes(), strict=True)),
            "canonical_reductions": debug.layout_invariant_reductions,
            "reduction_levels": levels_record(reduction_levels),  # canonical sums: inside nodes, then across
            "deterministic_chunks": deterministic_chunks(debug, self.dims),
            "attention": self.attention_backend,  # model.attention = auto: the kernel that ran
        }
        return environment(self.device, self.world.world_size, self.seeds, fingerprints, layout)

    def abandon(self) -> None:
        """End what the start began (the lock, the process group this runtime started), each step even
        if an earlier one fails; no barrier, so this rank exits promptly whatever its peers do."""
        undo = [
            lambda: self.run_lock is not None and self.run_lock.release(),
            lambda: self.owns_process_group and destroy_process_group(barrier=False),
        ]
        for step in undo:
            with contextlib.suppress(Exception):
                step()


def _print(message: str) -> None:
    print(message, flush=True)


def start_runtime(
    config: JobConfig, *, before_process_group: Callable[[Runtime], Prepared]
) -> tuple[Runtime, Prepared]:
    """Set up this process in the order above; returns the runtime (its config: `config` resolved, which
    is not changed) and what `before_process_group` prepared (called with the runtime once the device
    and flags are set, before the group exists)."""
    world = world_from_env()
    validate_job_config(config, world.world_size)
    dims = resolve_parallel_dims(config.parallelism, world.world_size)
    check_model_fits_layout(config.model, dims, config.debug)  # and model.overrides: refused before any work
    # The caller's config is left as it is: the values resolved here go into a copy of the sections
    # they change (the overrides; the seed, from a resumed run and then agreed by the ranks).
    overrides = typed_overrides(config.model)  # recorded as the fields' types, not as typed
    config = replace(config, model=replace(config.model, overrides=overrides), debug=replace(config.debug))
    runtime = Runtime(config, world, dims, run_folder(config))
    try:
        runtime.run_lock = RunLock.acquire(runtime.run_folder, _print) if world.is_main else None  # rank 0 prints
        if runtime.run_lock is not None and config.debug.seed is None:
            config.debug.seed = resumed_seed(config.checkpoint, runtime.run_folder)  # a resumed run keeps its seed
        runtime.device = resolve_device(config.training)
        runtime.comm = CommTimeouts(config.comm, runtime.run_folder, world.rank)
        runtime.comm.configure_environment(runtime.device.type == "cuda")  # the flight recorder, before any group
        runtime.attention_backend = resolve_attention_backend(config.model.attention, runtime.device.type)
        configure_determinism(config.debug)
        runtime.fsdp = dims.fsdp or config.training.mixed_precision == "bf16"
        prepared = before_process_group(runtime)
        runtime.owns_process_group = not dist.is_initialized()
        init_process_group(world, runtime.device, single=runtime.fsdp, timeout=runtime.comm.init_timeout)
        runtime.mesh = build_mesh(dims, runtime.device, single=runtime.fsdp)
        config.debug.seed = agree_on_seed(resolve_root_seed(config.debug))  # written to config.toml: the run repeats
        runtime.seeds = seed_everything(config.debug.seed, axis_rank(runtime.mesh, "pp"), runtime.mesh)
    except BaseException:
        runtime.abandon()
        raise
    return runtime, prepared

"""For a layout that does not fit: the nearest layouts that do, one setting changed at a time, each
estimated the same way (and in order of how little it changes the run)."""

from __future__ import annotations

import copy
from collections.abc import Iterator

from lockstep.config import JobConfig
from lockstep.config.errors import ConfigError
from lockstep.config.job import resolve_global_batch_size, resolve_parallel_dims
from lockstep.models.registry import model_args
from lockstep.tools.estimate.devices import DeviceSpec
from lockstep.tools.estimate.estimate import Topology, estimate

MAX_FITTING = 3


def candidates(config: JobConfig, topology: Topology) -> Iterator[tuple[str, JobConfig]]:
    """(the flags that make it, the config) for each one-setting change that lowers memory."""
    dims = resolve_parallel_dims(config.parallelism, topology.world_size)
    global_batch = resolve_global_batch_size(config.training, dims.dp)
    _, args = model_args(config.model, 1, 1)

    def changed(flags: str, edit) -> tuple[str, JobConfig]:
        new = copy.deepcopy(config)
        edit(new)
        return flags, new

    order = ("none", "selective", "full")
    for mode in order[order.index(config.activation_checkpoint.mode) + 1 :]:
        yield changed(
            f"--activation_checkpoint.mode {mode}", lambda c, m=mode: setattr(c.activation_checkpoint, "mode", m)
        )
    if not config.training.loss_chunk_tokens and dims.tp == 1:
        yield changed("--training.loss_chunk_tokens 4096", lambda c: setattr(c.training, "loss_chunk_tokens", 4096))
    if not config.parallelism.fsdp_reshard_after_forward:
        yield changed(
            "--parallelism.fsdp_reshard_after_forward",
            lambda c: setattr(c.parallelism, "fsdp_reshard_after_forward", True),
        )
    if dims.dp_replicate > 1:  # the replicas' ranks shard instead: 1/dp of the model states per rank

        def shard_all(c: JobConfig) -> None:
            c.parallelism.data_parallel_replicate_degree, c.parallelism.data_parallel_shard_degree = 1, -1
            c.training.global_batch_size = global_batch

        yield changed(
            "--parallelism.data_parallel_replicate_degree 1 --parallelism.data_parallel_shard_degree -1", shard_all
        )
    if dims.pp == 1 and config.training.local_batch_size > 1:
        half = config.training.local_batch_size // 2

        def smaller_batch(c: JobConfig, half: int = half) -> None:
            c.training.local_batch_size, c.training.global_batch_size = half, global_batch

        yield changed(f"--training.local_batch_size {half} --training.global_batch_size {global_batch}", smaller_batch)
    if dims.pp > 1 and config.parallelism.pipeline_parallel_microbatch_size > 1:
        half = config.parallelism.pipeline_parallel_microbatch_size // 2
        yield changed(
            f"--parallelism.pipeline_parallel_microbatch_size {half}",
            lambda c, h=half: setattr(c.parallelism, "pipeline_parallel_microbatch_size", h),
        )
    if getattr(args, "n_routed_experts", 0) and dims.ep == 1 and dims.dp_shard > 1:
        yield changed(
            f"--parallelism.expert_parallel_degree -1 (= {dims.dp_shard})",
            lambda c: setattr(c.parallelism, "expert_parallel_degree", -1),
        )
    for axis, key, room in (
        ("tp", "tensor_parallel_degree", topology.nproc_per_node),
        ("pp", "pipeline_parallel_degree", args.n_layers),
    ):
        degree = getattr(dims, axis) * 2
        if degree <= room and topology.world_size % degree == 0:

            def more(c: JobConfig, key: str = key, degree: int = degree) -> None:
                setattr(c.parallelism, key, degree)
                c.parallelism.data_parallel_shard_degree = -1
                c.parallelism.expert_parallel_degree = 1 if dims.ep == 1 else -1  # EP follows the new shard degree
                c.training.global_batch_size = global_batch

            yield changed(f"--parallelism.{key} {degree} --parallelism.data_parallel_shard_degree -1", more)


def nearest_fitting(config: JobConfig, topology: Topology, device: DeviceSpec, vocab_size: int) -> list[dict]:
    """Up to MAX_FITTING changes that fit, in order; then the best of those that do not, if none fits."""
    fitting, tried = [], []
    for flags, candidate in candidates(config, topology):
        try:
            result = estimate(candidate, topology, device, vocab_size=vocab_size)
        except (ConfigError, ValueError):
            continue  # not a valid layout for this model or batch
        entry = {
            "change": flags, "peak_gib": result.verdict["peak_gib"], "fits": result.verdict["fits"],
            "step_s": result.compute["step_s"], "mfu_ceiling_percent": result.compute["mfu_ceiling_percent"],
        }  # fmt: skip
        (fitting if entry["fits"] else tried).append(entry)
        if len(fitting) == MAX_FITTING:
            break
    return fitting or sorted(tried, key=lambda e: e["peak_gib"])[:1]

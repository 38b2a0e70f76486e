"""The whole job config: the sections together, and the checks that span sections.

Only the trainer and the CLI hold a ``JobConfig``; everything else receives one section.
Cross-section values (the data-parallel degree that the batch sizes depend on, say) are
resolved here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lockstep.config.errors import ConfigError
from lockstep.config.sections import (
    NOT_YET_SUPPORTED,
    ActivationCheckpointConfig,
    CheckpointConfig,
    CompileConfig,
    DataConfig,
    DebugConfig,
    JobSectionConfig,
    LRSchedulerConfig,
    MetricsConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelismConfig,
    TrainingConfig,
)

SECTION_TYPES: dict[str, type] = {
    "job": JobSectionConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "lr_scheduler": LRSchedulerConfig,
    "activation_checkpoint": ActivationCheckpointConfig,
    "compile": CompileConfig,
    "debug": DebugConfig,
    "metrics": MetricsConfig,
    "parallelism": ParallelismConfig,
    "checkpoint": CheckpointConfig,
}


@dataclass
class JobConfig:
    job: JobSectionConfig = field(default_factory=JobSectionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    activation_checkpoint: ActivationCheckpointConfig = field(default_factory=ActivationCheckpointConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    custom: dict[str, Any] = field(default_factory=dict)
    """Sections added by job.custom_config_module, by name."""

    def sections(self) -> dict[str, Any]:
        """Every section by name, the custom ones included."""
        built_in = {name: getattr(self, name) for name in SECTION_TYPES}
        return {**built_in, **self.custom}


def data_parallel_degree(parallelism: ParallelismConfig, world_size: int) -> int:
    """replicate x shard, with shard = -1 filled from what the other degrees leave of world_size."""
    others = (
        parallelism.data_parallel_replicate_degree
        * parallelism.tensor_parallel_degree
        * parallelism.pipeline_parallel_degree
        * parallelism.context_parallel_degree
    )
    shard = parallelism.data_parallel_shard_degree
    if shard == -1:
        if world_size % others:
            raise ConfigError(
                "parallelism.data_parallel_shard_degree",
                f"cannot fill: world size {world_size} is not divisible by replicate x tp x pp x cp = {others}",
            )
        shard = world_size // others
    if others * shard != world_size:
        raise ConfigError(
            "parallelism",
            f"replicate x shard x tp x pp x cp = {others * shard} but the world size is {world_size}; "
            "make the product equal the number of processes (or set data_parallel_shard_degree = -1)",
        )
    return parallelism.data_parallel_replicate_degree * shard


def resolve_global_batch_size(training: TrainingConfig, dp_degree: int) -> int:
    """The global batch in samples; it must be a whole number of microbatches on every rank."""
    per_microstep = training.local_batch_size * dp_degree
    if training.global_batch_size == -1:
        return per_microstep
    if training.global_batch_size % per_microstep:
        raise ConfigError(
            "training.global_batch_size",
            f"{training.global_batch_size} is not divisible by local_batch_size x data-parallel degree "
            f"= {training.local_batch_size} x {dp_degree} = {per_microstep}; use a multiple of {per_microstep}",
        )
    return training.global_batch_size


def validate_job_config(config: JobConfig, world_size: int) -> None:
    """Every check, section by section and then across sections; raises ConfigError."""
    for section in config.sections().values():
        validate = getattr(section, "validate", None)
        if validate is not None:
            validate()
    parallelism = config.parallelism
    for name in (
        "tensor_parallel_degree",
        "pipeline_parallel_degree",
        "context_parallel_degree",
        "expert_parallel_degree",
    ):
        if getattr(parallelism, name) != 1:
            raise ConfigError(f"parallelism.{name}", f"degree {getattr(parallelism, name)} is {NOT_YET_SUPPORTED}")
    dp_degree = data_parallel_degree(parallelism, world_size)
    if dp_degree != parallelism.data_parallel_replicate_degree:
        raise ConfigError(
            "parallelism.data_parallel_shard_degree",
            f"FSDP (a shard degree of {dp_degree // parallelism.data_parallel_replicate_degree}) is "
            f"{NOT_YET_SUPPORTED}; replicate instead: --parallelism.data_parallel_replicate_degree {world_size}",
        )
    global_batch = resolve_global_batch_size(config.training, dp_degree)
    microbatches_per_rank = global_batch // (config.training.local_batch_size * dp_degree)
    if dp_degree > 1 and not (_is_power_of_two(dp_degree) and _is_power_of_two(microbatches_per_rank)):
        raise ConfigError(
            "training.global_batch_size",
            f"data parallelism sums gradients in a fixed tree over the global microbatch index, which needs a "
            f"power-of-two data-parallel degree (got {dp_degree}) and microbatches per rank (got "
            f"{microbatches_per_rank}); choose global_batch_size = local_batch_size x {dp_degree} x 2^k",
        )
    if config.checkpoint.enable:
        raise ConfigError("checkpoint.enable", f"checkpointing is {NOT_YET_SUPPORTED}")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0

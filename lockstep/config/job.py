"""The whole job config: the sections together, and the checks that span sections.

Only the trainer and the CLI hold a ``JobConfig``; everything else receives one section.
Cross-section values (the data-parallel degree that the batch sizes depend on, say) are
resolved here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lockstep.config.errors import ConfigError
from lockstep.config.sections import (
    NOT_YET_SUPPORTED,
    ZERO_BUBBLE_SCHEDULES,
    ActivationCheckpointConfig,
    CheckpointConfig,
    CommConfig,
    CompileConfig,
    DataConfig,
    DebugConfig,
    FaultToleranceConfig,
    JobSectionConfig,
    LRSchedulerConfig,
    MetricsConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelismConfig,
    ProfilingConfig,
    TrainingConfig,
    ValidationConfig,
)
from lockstep.untrusted import load_toml, read_hf_config

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
    "validation": ValidationConfig,
    "fault_tolerance": FaultToleranceConfig,
    "profiling": ProfilingConfig,
    "comm": CommConfig,
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
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    custom: dict[str, Any] = field(default_factory=dict)
    """Sections added by job.custom_config_module, by name."""

    def sections(self) -> dict[str, Any]:
        """Every section by name, the custom ones included."""
        built_in = {name: getattr(self, name) for name in SECTION_TYPES}
        return {**built_in, **self.custom}


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    ep: int = 1
    """Expert parallelism borrows the dp_shard axis (ep = dp_shard), it adds no ranks."""

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def fsdp(self) -> bool:
        return self.dp_shard > 1

    def sizes(self) -> tuple[int, ...]:
        return (self.pp, self.dp_replicate, self.dp_shard, self.tp)


def microbatch_size(training: TrainingConfig, parallelism: ParallelismConfig, dims: ParallelDims) -> int:
    """Samples per leaf of the canonical tree: a microbatch, or under pipelining the schedule's microbatch."""
    return parallelism.pipeline_parallel_microbatch_size if dims.pp > 1 else training.local_batch_size


def resolve_parallel_dims(parallelism: ParallelismConfig, world_size: int) -> ParallelDims:
    """The degrees with data_parallel_shard_degree = -1 filled in; refuses a product that is not the
    world size (checked before any process group exists)."""
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
    ep = shard if parallelism.expert_parallel_degree == -1 else parallelism.expert_parallel_degree
    if ep != 1 and ep != shard:
        raise ConfigError(
            "parallelism.expert_parallel_degree",
            f"expert parallelism runs over the FSDP axis, so it must equal data_parallel_shard_degree ({shard}) "
            f"or be 1; got {ep}",
        )
    return ParallelDims(
        pp=parallelism.pipeline_parallel_degree,
        dp_replicate=parallelism.data_parallel_replicate_degree,
        dp_shard=shard,
        tp=parallelism.tensor_parallel_degree,
        ep=ep,
    )


def run_folder(config: JobConfig) -> Path:
    """Where this launch writes: job.dump_folder, or its replica_<id> folder under fault tolerance
    (every replica group keeps its own)."""
    folder = Path(config.job.dump_folder)
    if config.fault_tolerance.enable:
        return folder / f"replica_{config.fault_tolerance.replica_id}"
    return folder


def standalone(config: JobConfig, world_size: int) -> None:
    """Turn fault tolerance off, keeping the global batch it counted over every replica group: for
    tools that rerun or evaluate a replica group's run alone (replay, eval, audit), which must compute
    the same steps and never join the live job's quorum."""
    if not config.fault_tolerance.enable:
        return
    config.training.global_batch_size = resolve_group_batch_size(
        config, resolve_parallel_dims(config.parallelism, world_size)
    )[0]
    config.fault_tolerance.enable = False


def replica_groups(config: JobConfig) -> int:
    """Replica groups at full strength (fault_tolerance.group_size), 1 without fault tolerance. They
    form the outermost data-parallel axis: the global batch is counted over all of them, and each
    computes one block of global_batch / groups samples per step."""
    return config.fault_tolerance.group_size if config.fault_tolerance.enable else 1


def resolve_group_batch_size(config: JobConfig, dims: ParallelDims) -> tuple[int, int]:
    """(global batch, one replica group's block of it), in samples."""
    groups = replica_groups(config)
    global_batch = resolve_global_batch_size(config.training, dims.dp * groups)
    return global_batch, global_batch // groups


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


@dataclass(frozen=True)
class ValidationBatches:
    """The validation batch shape, resolved against training and the layout."""

    local_batch: int
    global_batch: int
    seq_len: int


def resolve_validation(config: JobConfig, dims: ParallelDims) -> ValidationBatches:
    """Defaults from training, and the limits pipelining sets: its schedule runs a fixed number of
    microbatches of fixed shape, so evaluation uses training's global batch, the pipeline
    microbatch and training's seq_len there. The default evaluation batch is training's global batch
    (of one replica group), not local x data-parallel degree: so it is the same in every layout that
    trains the same batch, and val_loss is too (docs/layout-invariance.md)."""
    validation, training, parallelism = config.validation, config.training, config.parallelism
    if validation.dataset == "" and training.dataset != "builtin" and not config.data.validation_fraction:
        raise ConfigError(
            "validation.dataset",
            f"is required when training.dataset = {training.dataset} (only the built-in corpus has a validation "
            "split); set validation.dataset and validation.dataset_path, or hold out part of the training "
            "documents with data.validation_fraction (e.g. 0.01)",
        )
    seq_len = validation.seq_len or training.seq_len
    local = validation.local_batch_size or training.local_batch_size
    global_batch = validation.global_batch_size
    if dims.pp > 1:
        microbatch = parallelism.pipeline_parallel_microbatch_size
        training_global = resolve_group_batch_size(config, dims)[1]  # one schedule step
        local = validation.local_batch_size or microbatch
        global_batch = training_global if global_batch == -1 else global_batch
        for key, value, needed in (
            ("local_batch_size", local, microbatch),
            ("global_batch_size", global_batch, training_global),
            ("seq_len", seq_len, training.seq_len),
        ):
            if value != needed:
                raise ConfigError(
                    f"validation.{key}",
                    f"must be {needed} under pipeline parallelism (its schedule runs fixed microbatches); "
                    "leave it at its default",
                )
    if global_batch == -1:
        global_batch = resolve_group_batch_size(config, dims)[1]
        if global_batch % (local * dims.dp):
            raise ConfigError(
                "validation.global_batch_size",
                f"defaults to training's global batch ({global_batch}), which is not divisible by "
                f"validation.local_batch_size x data-parallel degree = {local} x {dims.dp}; set it to a multiple "
                "of that, the same in every layout you compare",
            )
    if global_batch % (local * dims.dp):
        raise ConfigError(
            "validation.global_batch_size",
            f"{global_batch} is not divisible by local_batch_size x data-parallel degree = {local} x {dims.dp}",
        )
    return ValidationBatches(local, global_batch, seq_len)


def deterministic_chunks(debug: DebugConfig, dims: ParallelDims) -> int:
    """The chunk count of debug.deterministic's tensor-parallel linears: as set, or the run's
    tensor-parallel degree (0 when not deterministic)."""
    return (debug.deterministic_chunks or dims.tp) if debug.deterministic else 0


def validate_job_config(config: JobConfig, world_size: int) -> None:
    """Every check, section by section and then across sections; raises ConfigError."""
    _validate_data_source(config.training, config.data)
    for section in config.sections().values():
        validate = getattr(section, "validate", None)
        if validate is not None:
            validate()
    _validate_split(config.validation, config.data)
    _validate_unsupported_axes(config.parallelism)
    _validate_checkpoint_folder(config.job, config.checkpoint)
    resolve_hf_flavor(config.model, config.checkpoint, _recorded_hf_config(config))
    dims = resolve_parallel_dims(config.parallelism, world_size)
    if config.fault_tolerance.enable and config.debug.seed is None:
        raise ConfigError(
            "debug.seed",
            "fault tolerance needs a fixed seed: every replica group must start from the same weights and read the "
            "same data order; pass --debug.seed N (the same N to every group)",
        )
    _, group_batch = resolve_group_batch_size(config, dims)
    if dims.pp > 1:
        _validate_pipeline(config, group_batch // dims.dp)
    if config.training.loss_chunk_tokens and dims.tp > 1:
        raise ConfigError(
            "training.loss_chunk_tokens",
            "a chunked loss with tensor parallelism is not offered: loss parallelism already shards the logits "
            "over the vocabulary (parallelism.loss_parallel = true); set training.loss_chunk_tokens = 0",
        )
    if config.validation.enable:
        resolve_validation(config, dims)
    microbatch = microbatch_size(config.training, config.parallelism, dims)
    if config.debug.layout_invariant_reductions:
        per_rank = group_batch // (microbatch * dims.dp)
        _validate_invariant_batch(config.training, dims, per_rank, replica_groups(config))


def _recorded_hf_config(config: JobConfig) -> dict | None:
    """model.hf_config from the run folder's config.toml (a run that already started from_hf)."""
    if config.model.flavor != "from_hf" or config.model.hf_config:
        return None
    recorded = run_folder(config) / "config.toml"
    try:
        hf_config = load_toml(recorded.read_bytes()).get("model", {}).get("hf_config")
    except (OSError, ValueError, AttributeError):
        return None
    return hf_config if isinstance(hf_config, dict) and hf_config else None


def resolve_hf_flavor(model: ModelConfig, checkpoint: CheckpointConfig, recorded: dict | None = None) -> None:
    """model.flavor = from_hf: the architecture is checkpoint.initial_load_path's config.json, read here
    once and recorded in model.hf_config (a config.toml written by the run rebuilds it without the folder;
    `recorded`, the run folder's, serves a resume when the folder is gone)."""
    if model.flavor != "from_hf" or model.hf_config:
        return
    folder = Path(checkpoint.initial_load_path) if checkpoint.initial_load_path else None
    if (folder is None or not (folder / "config.json").is_file()) and recorded:
        model.hf_config = recorded  # a resume of a run that recorded its config.json needs no folder
        return
    if folder is None or not (folder / "config.json").is_file():
        raise ConfigError(
            "model.flavor",
            "from_hf takes the architecture from a Hugging Face folder's config.json; set "
            "checkpoint.initial_load_path to that folder" + (f" ({folder} has no config.json)" if folder else ""),
        )
    model.hf_config = read_hf_config(folder)


def _validate_invariant_batch(training: TrainingConfig, dims: ParallelDims, per_rank: int, groups: int) -> None:
    """Layout-invariant reductions sum gradients in one fixed tree over the global microbatch index (the
    binary-counter tree of lockstep.parallel.canonical.TreeSum, for any count). Whatever a rank, a
    replica or a replica group sums before it meets the others must be a node of that tree: a run of
    2^k microbatches starting at a multiple of 2^k, unless it is the whole batch. Any degree passes
    (3 replicas of 2^k microbatches each are 3 nodes); what can fail is the count inside each block.
    The messages propose global batch sizes that pass this very check."""
    why = "layout-invariant reductions sum gradients in a fixed tree over the global microbatch index, so"
    off = "or set debug.layout_invariant_reductions = false"
    replicas, shards = dims.dp_replicate * groups, dims.dp_shard
    per_microstep = training.local_batch_size * dims.dp * groups  # samples per microbatch on every rank

    def batches(per_rank_choices: list[int]) -> str:
        return " or ".join(f"{k * per_microstep}" for k in per_rank_choices)

    if shards > 1 and per_rank > 1 and not _is_power_of_two(shards):
        raise ConfigError(
            "parallelism.data_parallel_shard_degree",
            f"{why} each micro-step's FSDP reduce-scatter, which sums a run of {shards} microbatches, must be a "
            f"subtree: that needs a power-of-two shard degree, or one microbatch per rank (global_batch_size = "
            f"{batches([1])}; got {per_rank}), {off}",
        )

    def candidates(ranks: int) -> list[int]:  # microbatches per rank that make `ranks` x them a power of two
        lower = 1 << (per_rank.bit_length() - 1)
        return [k for k in (lower, 2 * lower) if _is_power_of_two(ranks * k)] or [1]

    if replicas > 1 and shards > 1 and not _is_power_of_two(shards * per_rank):
        raise ConfigError(
            "training.global_batch_size",
            f"{why} each of the {replicas} FSDP replicas, whose shards reduce-scatter every micro-step, must sum "
            f"a power-of-two number of microbatches (got {shards * per_rank}: {per_rank} per rank x {shards} "
            f"shards); use global_batch_size = {batches(candidates(shards))}, {off}",
        )
    group_ranks = dims.dp_replicate * shards
    if groups > 1 and not _is_power_of_two(group_ranks * per_rank):
        hint = f"global_batch_size = {batches(candidates(group_ranks))}"
        if not _is_power_of_two(group_ranks):
            hint = "a power-of-two data-parallel degree inside each group"
        raise ConfigError(
            "training.global_batch_size",
            f"{why} each of the {groups} replica groups must sum a power-of-two number of microbatches (got "
            f"{group_ranks * per_rank}); use {hint}, {off}",
        )


def _validate_data_source(training: TrainingConfig, data: DataConfig) -> None:
    """A mixture replaces training.dataset_path and needs prepared folders; prepared needs one or the other.
    Checked before the sections, so a mixture with another dataset kind is named as the mixture's problem."""
    if data.mixture and training.dataset != "prepared":
        raise ConfigError(
            "data.mixture",
            f"mixes prepared folders, but training.dataset = {training.dataset}; set --training.dataset prepared "
            "(prepare each source with lockstep data prepare), or drop data.mixture",
        )
    if data.mixture and training.dataset_path:
        raise ConfigError(
            "data.mixture",
            "replaces training.dataset_path; drop the path (--training.dataset_path=) or add it to the mixture "
            f"as {training.dataset_path}:WEIGHT",
        )
    if data.mixture and data.validation_fraction:
        raise ConfigError(
            "data.validation_fraction",
            "holds out documents of one source, and data.mixture mixes several; give the mixture a validation "
            "set of its own (validation.dataset prepared, validation.dataset_path FOLDER), or drop the fraction",
        )
    if training.dataset == "prepared" and not data.mixture and not training.dataset_path:
        raise ConfigError(
            "training.dataset_path",
            "is required when training.dataset = prepared (or set data.mixture = FOLDER:WEIGHT,... for several)",
        )


def _validate_split(validation: ValidationConfig, data: DataConfig) -> None:
    """data.validation_fraction makes the validation split from the training source, so no second
    validation set may be named beside it (training would lose documents that nothing evaluates)."""
    if not data.validation_fraction:
        return
    if validation.dataset or validation.dataset_path:
        raise ConfigError(
            "data.validation_fraction",
            f"makes the validation split from the training documents, and validation.dataset = "
            f"{validation.dataset or '(empty)'} names another one; keep one: drop validation.dataset and "
            "validation.dataset_path (--validation.dataset= --validation.dataset_path=), or the fraction "
            "(--data.validation_fraction 0)",
        )


def _validate_checkpoint_folder(job: JobSectionConfig, checkpoint: CheckpointConfig) -> None:
    """The checkpoint folder must lie inside the run folder: the run lock covers that folder only, so
    a folder outside it could be shared by two runs (one pruning the other's in-flight save, or
    resuming the other's checkpoint)."""
    dump_folder = Path(job.dump_folder).resolve()
    root = (dump_folder / checkpoint.folder).resolve()
    if root != dump_folder and dump_folder not in root.parents:
        raise ConfigError(
            "checkpoint.folder",
            f"{checkpoint.folder!r} resolves to {root}, outside job.dump_folder ({dump_folder}); the run-folder "
            "lock protects only that folder, so give a folder inside it (e.g. the default 'checkpoint'), "
            "and use checkpoint.initial_load_path to start from another run's checkpoint",
        )


def _validate_unsupported_axes(parallelism: ParallelismConfig) -> None:
    if parallelism.context_parallel_degree != 1:
        raise ConfigError(
            "parallelism.context_parallel_degree",
            f"context parallelism is {NOT_YET_SUPPORTED}: torch 2.13 runs it only on CUDA (SDPA without masks, or "
            "FlexAttention) (see docs/layout-invariance.md); use tensor or pipeline parallelism for long sequences",
        )


def _validate_pipeline(config: JobConfig, samples_per_rank: int) -> None:
    parallelism, training = config.parallelism, config.training
    microbatch = parallelism.pipeline_parallel_microbatch_size
    if training.local_batch_size % microbatch:
        raise ConfigError(
            "parallelism.pipeline_parallel_microbatch_size",
            f"{microbatch} does not divide training.local_batch_size = {training.local_batch_size}; "
            "use a divisor of it",
        )
    num_microbatches = samples_per_rank // microbatch
    if num_microbatches < parallelism.pipeline_parallel_degree:
        raise ConfigError(
            "parallelism.pipeline_parallel_microbatch_size",
            f"{parallelism.pipeline_parallel_schedule} needs at least pp degree = "
            f"{parallelism.pipeline_parallel_degree} microbatches per step and rank, got {num_microbatches}; "
            "lower the microbatch size or raise training.global_batch_size",
        )
    if not config.debug.layout_invariant_reductions:
        return
    if parallelism.pipeline_parallel_schedule in ZERO_BUBBLE_SCHEDULES:
        raise ConfigError(
            "parallelism.pipeline_parallel_schedule",
            f"{parallelism.pipeline_parallel_schedule} accumulates weight gradients outside autograd, so "
            "layout-invariant reductions cannot order them; use GPipe, 1F1B, Interleaved1F1B or LoopedBFS, "
            "or set debug.layout_invariant_reductions = false",
        )


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0

"""One dataclass per config section.

Each component of lockstep is built from its own section only (plus runtime objects such as the
device or the mesh), so these classes are the whole vocabulary of run settings. Model
architecture does not live here: it lives in each model's ``*Args`` and is chosen by
``model.name`` + ``model.flavor``.

Every field carries a one-line docstring (the string literal after it); docs/config-reference.md is
generated from these docstrings, so they are the documentation.

``validate()`` checks what a section can check on its own; checks that span sections live in
``lockstep.config.job``.
"""

from __future__ import annotations

import importlib.util
import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from lockstep.config.errors import ConfigError
from lockstep.config.mixture import parse_mixture

NOT_YET_SUPPORTED = "not yet supported in this version of lockstep"
SINGLE_STAGE_SCHEDULES = ("GPipe", "1F1B")
MULTI_STAGE_SCHEDULES = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
PIPELINE_SCHEDULES = SINGLE_STAGE_SCHEDULES + MULTI_STAGE_SCHEDULES
CHECKPOINT_PARTS = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state", "rng")
ZERO_BUBBLE_SCHEDULES = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
"""These compute weight gradients apart from autograd's accumulation (no per-microbatch hook fires)."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


def _one_of(value: str, choices: tuple[str, ...], key: str) -> None:
    _require(value in choices, key, f"must be one of {', '.join(choices)}; got {value!r}")


MAX_SAMPLES = 2**24
"""More samples in one batch than any run holds (16M): a larger batch size is a typo, refused at once."""
MAX_TOKENS = 2**24
"""More tokens in one sequence (or loss chunk) than any model attends over."""


@dataclass
class JobSectionConfig:
    dump_folder: str = "./outputs/run"
    """Run folder: config.toml, env.json, metrics.jsonl and TensorBoard events are written here."""
    description: str = ""
    """Free text describing the run; recorded in config.toml."""
    custom_config_module: str = ""
    """Importable module that defines extra config sections (docs/config.md, "Custom config sections"). A config
    file naming it is not enough to import it: name it on the command line or in $LOCKSTEP_CONFIG_MODULES."""

    def validate(self) -> None:
        _require(bool(self.dump_folder), "job.dump_folder", "must not be empty")


@dataclass
class ModelConfig:
    name: str = "llama3"
    """Model family: llama3, deepseek_v3, qwen3, qwen3_moe or llama4 (README, "Models")."""
    flavor: str = "debug"
    """Size table entry of the model family, e.g. debug, 1B, 8B (qwen3_moe: 30B-A3B); from_hf (the
    config.json of checkpoint.initial_load_path); or custom (no table: [model.overrides] gives every number)."""
    tokenizer: str = "builtin"
    """Tokenizer kind: builtin (BPE trained on the built-in corpus), bytes, or hf (a tokenizer.json)."""
    tokenizer_path: str = ""
    """Path of a Hugging Face tokenizer.json (or its folder) when tokenizer = hf."""
    attention: str = "auto"
    """Attention kernel: auto (flex on CUDA, sdpa elsewhere; env.json records which), sdpa, or flex
    (FlexAttention with a compiled block mask; CUDA only, it has no CPU backward in torch 2.13)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Fields of the flavor's *Args to change, as a [model.overrides] table or --model.overrides.FIELD VALUE
    (e.g. dim = 128, n_layers = 4): checked against the family's args dataclass before any work."""
    hf_config: dict[str, Any] = field(default_factory=dict)
    """With flavor = from_hf: the config.json of checkpoint.initial_load_path, read at start and recorded
    here, so that this config.toml rebuilds the model without the folder. Not set by hand."""

    def validate(self) -> None:
        _one_of(self.tokenizer, ("builtin", "bytes", "hf"), "model.tokenizer")
        _require(
            self.tokenizer != "hf" or bool(self.tokenizer_path),
            "model.tokenizer_path",
            "is required when model.tokenizer = hf (path of a tokenizer.json or its folder)",
        )
        _require(
            self.tokenizer == "hf" or not self.tokenizer_path,
            "model.tokenizer_path",
            f"has no effect with model.tokenizer = {self.tokenizer}; set model.tokenizer = hf to use it, "
            "or drop it (--model.tokenizer_path=)",
        )
        _one_of(self.attention, ("auto", "sdpa", "flex"), "model.attention")


@dataclass
class TrainingConfig:
    steps: int = 200
    """Number of optimizer steps."""
    local_batch_size: int = 8
    """Samples per microbatch on one data-parallel rank."""
    global_batch_size: int = -1
    """Samples per optimizer step over all ranks; -1 means local_batch_size x data-parallel degree.
    A multiple of that product gives gradient accumulation."""
    seq_len: int = 256
    """Tokens per sample."""
    max_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)."""
    mixed_precision: str = "fp32"
    """Compute dtype: fp32 or bf16 (FSDP's policy in every layout: bf16 parameters and activations, fp32 gradient
    sums, fp32 master weights and optimizer state; docs/layout-invariance.md)."""
    dataset: str = "builtin"
    """builtin (the corpus made from the Python standard library), text, json, parquet, or prepared (a folder
    written by lockstep data prepare; train with its tokenizer)."""
    dataset_path: str = ""
    """File or folder for dataset = text, json (a "text" field per record) or parquet; the folder for prepared."""
    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu or cuda."""
    loss_chunk_tokens: int = 0
    """Project and take the cross-entropy this many tokens at a time (no full [B, S, vocab] logits), also on a
    pipeline's last stage; 0 = off. Not with tensor parallelism, whose parallelism.loss_parallel shards the logits."""
    skip_memory_check: bool = False
    """On CUDA, lockstep train first estimates the peak memory per rank (lockstep estimate) and refuses a layout
    that clearly cannot fit the device, naming a layout that fits; this skips that check."""

    def validate(self) -> None:
        _require(self.steps > 0, "training.steps", f"must be > 0; got {self.steps}")
        _require(
            0 < self.local_batch_size <= MAX_SAMPLES, "training.local_batch_size", f"must be in 1 .. {MAX_SAMPLES}"
        )
        _require(
            self.global_batch_size == -1 or 0 < self.global_batch_size <= MAX_SAMPLES,
            "training.global_batch_size",
            f"must be in 1 .. {MAX_SAMPLES}, or -1 for local_batch_size x data-parallel degree",
        )
        _require(0 < self.seq_len <= MAX_TOKENS, "training.seq_len", f"must be in 1 .. {MAX_TOKENS}")
        _require(self.max_norm >= 0, "training.max_norm", "must be >= 0 (0 disables clipping)")
        _one_of(self.mixed_precision, ("fp32", "bf16"), "training.mixed_precision")
        _one_of(self.dataset, ("builtin", "text", "json", "parquet", "prepared"), "training.dataset")
        _require(
            self.dataset in ("builtin", "prepared") or bool(self.dataset_path),  # prepared: or data.mixture (job.py)
            "training.dataset_path",
            f"is required when training.dataset = {self.dataset}",
        )
        _require(
            self.dataset != "builtin" or not self.dataset_path,
            "training.dataset_path",
            "has no effect with training.dataset = builtin; set training.dataset to text, json, parquet or "
            "prepared to use it, or drop it (--training.dataset_path=)",
        )
        _one_of(self.device, ("auto", "cpu", "cuda"), "training.device")
        _require(
            0 <= self.loss_chunk_tokens <= MAX_TOKENS, "training.loss_chunk_tokens",
            f"must be in 0 .. {MAX_TOKENS} (0 disables chunking)",
        )  # fmt: skip


@dataclass
class ValidationConfig:
    enable: bool = False
    """Evaluate the held-out loss during training (val_loss, val_ppl, val_tokens in metrics)."""
    freq: int = 500
    """Evaluate every this many steps (and after the last step)."""
    steps: int = -1
    """Global batches per evaluation; -1 = the whole split. Windows are read in order, never shuffled."""
    dataset: str = ""
    """builtin, text, json, parquet or prepared (a `lockstep data prepare` folder); empty = the built-in
    corpus's validation split when training on it."""
    dataset_path: str = ""
    """File or folder for dataset = text, json, parquet or prepared."""
    local_batch_size: int = 0
    """Samples per forward on one data-parallel rank; 0 = training.local_batch_size (under pipelining, the
    pipeline microbatch size)."""
    global_batch_size: int = -1
    """Samples per evaluation step over all ranks; -1 = local_batch_size x data-parallel degree (under
    pipelining, training's global batch: the schedule's microbatch count is fixed)."""
    seq_len: int = 0
    """Tokens per sample; 0 = training.seq_len (which pipelining requires)."""

    def validate(self) -> None:
        _require(self.freq > 0, "validation.freq", f"must be > 0; got {self.freq}")
        _require(self.steps == -1 or self.steps > 0, "validation.steps", "must be > 0, or -1 for the whole split")
        _one_of(self.dataset, ("", "builtin", "text", "json", "parquet", "prepared"), "validation.dataset")
        _require(
            self.dataset in ("", "builtin") or bool(self.dataset_path),
            "validation.dataset_path",
            f"is required when validation.dataset = {self.dataset}",
        )
        _require(
            self.dataset not in ("", "builtin") or not self.dataset_path,
            "validation.dataset_path",
            "needs validation.dataset = text, json, parquet or prepared; set it, or drop the path",
        )
        _require(self.local_batch_size >= 0, "validation.local_batch_size", "must be >= 0 (0 = training's)")
        _require(
            self.global_batch_size == -1 or self.global_batch_size > 0,
            "validation.global_batch_size",
            "must be > 0, or -1 for local_batch_size x data-parallel degree",
        )
        _require(self.seq_len >= 0, "validation.seq_len", "must be >= 0 (0 = training's)")


@dataclass
class DataConfig:
    document_masking: bool = True
    """Attend only within each packed document (block-causal mask) instead of across documents."""
    text_field: str = "text"
    """Field holding the text in json/jsonl and parquet records."""
    cache_folder: str = ""
    """Where tokenized datasets, the built-in corpus and tokenizer are cached; empty means
    $LOCKSTEP_CACHE or ~/.cache/lockstep."""
    shuffle: bool = True
    """False reads the windows in order, epoch after epoch (torchtitan's order); either order is a pure
    function of (seed, global sample index), the same in every layout."""
    mixture: list[str] = field(default_factory=list)
    """Train on several prepared folders as FOLDER:WEIGHT entries (CLI: A:0.7,B:0.3), with training.dataset =
    prepared and no training.dataset_path; weights are normalised to sum 1 and interleaved exactly; a source is
    named by its folder's name (metrics: data/tokens/NAME)."""
    validation_fraction: float = 0.0
    """Hold out this fraction of the training source's documents (whole documents, chosen by a hash of each
    document's index: the same in every layout) as the validation split; training never reads them. 0 = no split."""

    def validate(self) -> None:
        _require(bool(self.text_field), "data.text_field", "must not be empty")
        parse_mixture(self.mixture)
        _require(
            self.validation_fraction == 0.0 or 0.0 < self.validation_fraction < 1.0, "data.validation_fraction",
            f"must be in (0, 1), e.g. 0.01 for 1% of the documents, or 0 for no split; got {self.validation_fraction}",
        )  # fmt: skip


@dataclass
class OptimizerConfig:
    name: str = "AdamW"
    """Optimizer; AdamW is the one implemented."""
    lr: float = 8e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    weight_decay_exempt: list[str] = field(default_factory=list)
    """Parameters without weight decay: any of norms, biases, embeddings (default none: every parameter
    decays, as in torchtitan)."""
    implementation: str = "foreach"
    """foreach or for-loop (bitwise equal to each other, also on shards); fused differs from both."""

    def validate(self) -> None:
        _one_of(self.name, ("AdamW",), "optimizer.name")
        _require(self.lr > 0, "optimizer.lr", "must be > 0")
        _require(all(0 <= b < 1 for b in self.betas), "optimizer.betas", "each beta must be in [0, 1)")
        _require(self.eps > 0, "optimizer.eps", "must be > 0")
        _require(self.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
        _one_of(self.implementation, ("foreach", "for-loop", "fused"), "optimizer.implementation")
        unknown = sorted(set(self.weight_decay_exempt) - {"norms", "biases", "embeddings"})
        _require(not unknown, "optimizer.weight_decay_exempt", f"takes norms, biases, embeddings; got {unknown}")


@dataclass
class LRSchedulerConfig:
    warmup_steps: int = 20
    """Linear warmup from lr/(warmup_steps+1) to lr."""
    decay_ratio: float = -1.0
    """Fraction of the steps spent decaying at the end (warmup-stable-decay); -1 decays over all
    steps after warmup."""
    decay_type: str = "linear"
    """linear, cosine or sqrt."""
    min_lr_factor: float = 0.0
    """The decay ends at lr x min_lr_factor."""
    formula: str = "lockstep"
    """lockstep, or torchtitan: its warmup (k+1)/warmup_steps and its decay over one virtual step past
    the last, so a job moved from torchtitan has the same lr at every step."""

    def validate(self) -> None:
        _require(self.warmup_steps >= 0, "lr_scheduler.warmup_steps", "must be >= 0")
        _require(
            self.decay_ratio == -1.0 or 0.0 <= self.decay_ratio <= 1.0,
            "lr_scheduler.decay_ratio",
            "must be in [0, 1], or -1 to decay over every step after warmup",
        )
        _one_of(self.decay_type, ("linear", "cosine", "sqrt"), "lr_scheduler.decay_type")
        _require(0.0 <= self.min_lr_factor <= 1.0, "lr_scheduler.min_lr_factor", "must be in [0, 1]")
        _one_of(self.formula, ("lockstep", "torchtitan"), "lr_scheduler.formula")


@dataclass
class ActivationCheckpointConfig:
    mode: str = "none"
    """none, full (recompute whole blocks) or selective."""
    selective_ac_option: str = "op"
    """For mode = selective: op (keep matmul and attention outputs, recompute the rest) or an
    integer N (checkpoint every N-th block)."""
    preserve_rng_state: bool = False
    """Passed to torch.utils.checkpoint: restore the RNG state before recomputation (needed for
    dropout-like randomness to replay identically)."""
    determinism_check: str = "default"
    """Passed to torch.utils.checkpoint: default (compare shapes/dtypes of recomputed tensors) or none."""
    debug: bool = False
    """Passed to torch.utils.checkpoint: record op traces for a recomputation mismatch error."""

    def validate(self) -> None:
        _one_of(self.mode, ("none", "full", "selective"), "activation_checkpoint.mode")
        _require(
            self.selective_ac_option == "op" or self.selective_ac_option.isdigit(),
            "activation_checkpoint.selective_ac_option",
            f"must be 'op' or a positive integer; got {self.selective_ac_option!r}",
        )
        _one_of(self.determinism_check, ("default", "none"), "activation_checkpoint.determinism_check")


@dataclass
class CompileConfig:
    enable: bool = False
    """torch.compile the components below (costs 15-20 s cold on CPU, gives little speed there)."""
    components: list[str] = field(default_factory=lambda: ["model", "loss"])
    """What to compile: model (each transformer block) and/or loss."""

    def validate(self) -> None:
        for component in self.components:
            _one_of(component, ("model", "loss"), "compile.components")


@dataclass
class DebugConfig:
    seed: int | None = None
    """Root seed of every random stream; when absent one is drawn, logged and written to config.toml."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms, cuDNN deterministic, CUBLAS_WORKSPACE_CONFIG."""
    deterministic_warn_only: bool = False
    """With deterministic: warn instead of failing on an op without a deterministic kernel."""
    deterministic_chunks: int = 0
    """With deterministic: the fixed chunks a tensor-parallel linear splits its sums into
    (lockstep.parallel.canonical_linear), which is the largest tensor-parallel degree this run and its
    resumes can take with the same bits. 0: the run's own tensor-parallel degree (TP 1 pays nothing).
    Set it to the largest degree you will compare or resume at (a power of two the model allows); it is
    recorded with the run, and a resume at a higher degree is refused."""
    layout_invariant_reductions: bool = True
    """Sum gradients, losses and norms in one fixed tree order over the global microbatch index, so
    any data-parallel degree gives bitwise-identical numbers (docs/layout-invariance.md). Off: plain
    .grad accumulation, FSDP's per-microbatch reduce-scatter and all_reduce(SUM) (the usual,
    layout-dependent way). Required by debug.deterministic."""
    fingerprint: bool = False
    """Record in metrics.jsonl, at each logged step, hashes of the full parameters after the step and of
    the gradients before clipping (the same in every layout that computes the same numbers)."""
    nonfinite: str = "stop"
    """On a NaN/Inf loss or gradient: stop (naming the step and the first module that produced it),
    skip (drop the step's update and go on), or ignore."""
    max_consecutive_skips: int = 5
    """With nonfinite = skip: stop the run (naming the step range) after this many non-finite steps in a
    row, since by then the run is diverging rather than hitting a rare bad batch."""
    moe_force_load_balance: bool = False
    """MoE models: route tokens round-robin so every expert gets the same count."""
    detect_anomaly: bool = False
    """torch.autograd anomaly detection (slow; names the op that produced a NaN)."""
    print_config: bool = False
    """Print the resolved config at start."""
    spike_window: int = 0
    """Loss-spike detection: the z-score of each step's loss against the previous N steps' losses (0 = off).
    A spike is recorded in spikes.jsonl with the step's sample indices and per-sample losses."""
    spike_threshold: float = 6.0
    """A step whose loss is more than this many standard deviations above the window's mean is a spike."""
    spike_action: str = "log"
    """On a spike: log (record it, train on) or skip (record it and drop the step's update, as OLMo-core can)."""

    def validate(self) -> None:
        _one_of(self.nonfinite, ("stop", "skip", "ignore"), "debug.nonfinite")
        _one_of(self.spike_action, ("log", "skip"), "debug.spike_action")
        _require(
            self.spike_window == 0 or self.spike_window >= 2,
            "debug.spike_window",
            f"must be 0 (off) or >= 2 steps (a z-score needs a spread); got {self.spike_window}",
        )
        _require(self.spike_threshold > 0, "debug.spike_threshold", "must be > 0")
        _require(self.max_consecutive_skips >= 1, "debug.max_consecutive_skips", "must be >= 1")
        _require(
            self.seed is None or 0 <= self.seed < 2**63,
            "debug.seed",
            "must be in [0, 2**63)",
        )
        _require(
            not self.deterministic_warn_only or self.deterministic,
            "debug.deterministic_warn_only",
            "only has an effect with --debug.deterministic; set both",
        )
        _require(
            self.deterministic_chunks >= 0 and self.deterministic_chunks & (self.deterministic_chunks - 1) == 0,
            "debug.deterministic_chunks",
            f"must be 0 (the tensor-parallel degree) or a power of two; got {self.deterministic_chunks}",
        )
        _require(
            self.layout_invariant_reductions or not self.deterministic,
            "debug.layout_invariant_reductions",
            "debug.deterministic needs the layout-invariant reductions; drop --debug.no-layout-invariant-reductions",
        )


@dataclass
class MetricsConfig:
    log_freq: int = 10
    """Log every N steps (step 1 and the last step are always logged)."""
    enable_tensorboard: bool = False
    """Write TensorBoard events under <dump_folder>/tb."""
    enable_wandb: bool = False
    """Log to Weights & Biases (needs the wandb package and its credentials)."""

    def validate(self) -> None:
        _require(self.log_freq > 0, "metrics.log_freq", "must be > 0")
        # Checked here, before any process starts, rather than at the first log line.
        for enabled, option, package in (
            (self.enable_wandb, "metrics.enable_wandb", "wandb"),
            (self.enable_tensorboard, "metrics.enable_tensorboard", "tensorboard"),
        ):
            _require(
                not enabled or importlib.util.find_spec(package) is not None,
                option,
                f"needs the {package} package, which is not installed; pip install {package} (into the "
                "environment that runs lockstep), or drop the option",
            )


@dataclass
class ParallelismConfig:
    data_parallel_replicate_degree: int = 1
    """Replicas (DDP, or the replicate axis of HSDP)."""
    data_parallel_shard_degree: int = -1
    """FSDP shards; -1 fills what the other degrees leave of the world size."""
    tensor_parallel_degree: int = 1
    """Tensor (and sequence) parallel degree."""
    loss_parallel: bool = True
    """With tensor parallelism: keep the logits sharded over the vocabulary and take the cross-entropy on the shards
    (not under debug.deterministic, whose tensor parallelism keeps activations and logits whole, for bitwise sums)."""
    pipeline_parallel_degree: int = 1
    """Pipeline stages."""
    pipeline_parallel_schedule: str = "1F1B"
    """A torch.distributed.pipelining schedule: GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble,
    ZBVZeroBubble or DualPipeV (the last four run two stages per rank)."""
    pipeline_parallel_microbatch_size: int = 1
    """Samples per pipeline microbatch; a rank's share of the global batch is cut into microbatches of this size."""
    pipeline_parallel_split_points: list[str] = field(default_factory=list)
    """Explicit stage boundaries as the first layer of each later stage, e.g. ["layers.4"]; empty = even split."""
    fsdp_reshard_after_forward: bool = True
    """FSDP: free gathered parameters after forward (ZeRO-3) or keep them until backward (ZeRO-2, more memory)."""
    context_parallel_degree: int = 1
    """Context (sequence) parallel degree."""
    expert_parallel_degree: int = 1
    """Expert parallel degree (MoE models): 1, or the FSDP shard degree, whose ranks it borrows; -1 = that degree."""
    replicate_bucket_mb: float = 25.0
    """Size of the buckets in which gradients are summed over the replicate axis (DDP, HSDP's replicas),
    each started as soon as backward has finished its gradients, overlapping the rest of backward."""

    def validate(self) -> None:
        for name in (
            "data_parallel_replicate_degree",
            "tensor_parallel_degree",
            "pipeline_parallel_degree",
            "context_parallel_degree",
        ):
            _require(getattr(self, name) >= 1, f"parallelism.{name}", "must be >= 1")
        _require(
            self.expert_parallel_degree == -1 or self.expert_parallel_degree >= 1,
            "parallelism.expert_parallel_degree",
            "must be >= 1, or -1 for the FSDP shard degree",
        )
        _require(self.replicate_bucket_mb > 0, "parallelism.replicate_bucket_mb", "must be > 0 (MiB)")
        _require(
            self.data_parallel_shard_degree == -1 or self.data_parallel_shard_degree >= 1,
            "parallelism.data_parallel_shard_degree",
            "must be >= 1, or -1 to fill the world size",
        )
        _one_of(self.pipeline_parallel_schedule, PIPELINE_SCHEDULES, "parallelism.pipeline_parallel_schedule")
        _require(
            self.pipeline_parallel_microbatch_size >= 1,
            "parallelism.pipeline_parallel_microbatch_size",
            "must be >= 1",
        )
        _require(
            self.pipeline_parallel_degree > 1 or not self.pipeline_parallel_split_points,
            "parallelism.pipeline_parallel_split_points",
            "has no effect without pipeline parallelism; set parallelism.pipeline_parallel_degree > 1, "
            "or drop it (--parallelism.pipeline_parallel_split_points=)",
        )


RUN_FOLDER_ENTRIES = (
    "checkpoint", "config.toml", "env.json", "metrics.jsonl", "launches", "fingerprints", "comm_traces",
    "spikes.jsonl", "faults.jsonl", "tb", ".lock",
)  # fmt: skip
"""What lockstep itself writes at the top of a run folder: no other output may take these names."""


def _relative_folder(value: str, key: str) -> None:
    """A folder inside the run folder: relative, no '..' that would leave it, not one of lockstep's own."""
    parts = value.replace("\\", "/").split("/")
    _require(
        bool(value) and not os.path.isabs(value) and ".." not in parts,
        key,
        f"must be a folder inside the run folder (relative, no '..'); got {value!r}",
    )
    _require(
        parts[0] not in RUN_FOLDER_ENTRIES,
        key,
        f"{parts[0]!r} is one of the run folder's own entries ({', '.join(RUN_FOLDER_ENTRIES)}); choose another name",
    )


@dataclass
class ProfilingConfig:
    enable_profiling: bool = False
    """Trace steps with torch.profiler: per rank, Chrome/Perfetto JSON under <run>/<save_traces_folder>/iteration_<step>/."""
    profile_freq: int = 10
    """Trace every N steps (the traced step is the last of each N; warmup and active fit inside it)."""
    profiler_warmup: int = 3
    """Steps the profiler runs untraced before each traced window (its start-up cost stays out of the trace)."""
    profiler_active: int = 1
    """Steps traced in each window."""
    save_traces_folder: str = "profile_traces"
    """Where traces go, inside the run folder."""
    enable_memory_snapshot: bool = False
    """CUDA: record allocator history and dump torch.cuda.memory snapshots at memory_snapshot_steps and on an
    out-of-memory error (viewable at pytorch.org/memory_viz). CPU: a per-interval peak RSS goes into metrics."""
    save_memory_snapshot_folder: str = "memory_snapshot"
    """Where memory snapshots go, inside the run folder."""
    memory_snapshot_steps: list[int] = field(default_factory=list)
    """Steps whose memory snapshot is dumped (a 100k-entry pickle each); empty = none, only an out-of-memory
    step's. Every rank in memory_snapshot_ranks dumps its own."""
    memory_snapshot_ranks: list[int] = field(default_factory=lambda: [0])
    """Ranks that record allocator history and dump snapshots (-1: every rank; at 512 ranks, 512 files)."""

    def validate(self) -> None:
        _require(self.profile_freq > 0, "profiling.profile_freq", "must be > 0")
        _require(self.profiler_warmup >= 0, "profiling.profiler_warmup", "must be >= 0")
        _require(self.profiler_active >= 1, "profiling.profiler_active", "must be >= 1")
        _require(
            self.profiler_warmup + self.profiler_active <= self.profile_freq,
            "profiling.profiler_warmup",
            f"warmup + active ({self.profiler_warmup} + {self.profiler_active}) must fit in profile_freq "
            f"({self.profile_freq}); raise profiling.profile_freq or lower them",
        )
        _relative_folder(self.save_traces_folder, "profiling.save_traces_folder")
        _require(all(s > 0 for s in self.memory_snapshot_steps), "profiling.memory_snapshot_steps", "steps are >= 1")
        _require(
            all(r >= 0 for r in self.memory_snapshot_ranks) or self.memory_snapshot_ranks == [-1],
            "profiling.memory_snapshot_ranks", "ranks are >= 0, or [-1] for every rank",
        )  # fmt: skip
        _relative_folder(self.save_memory_snapshot_folder, "profiling.save_memory_snapshot_folder")
        _require(
            self.save_traces_folder != self.save_memory_snapshot_folder,
            "profiling.save_memory_snapshot_folder",
            "must differ from profiling.save_traces_folder",
        )


@dataclass
class CommConfig:
    init_timeout_seconds: int = 300
    """Collective timeout until the first step is done (start-up, compilation, checkpoint loading), and
    around every later save and evaluation. Counted at 512 ranks (BENCHMARKS.md, issue 26), a rank's
    start-up does O(1) file operations (about 50, and a resume about 70 more: no shard opened, 1 of the
    checkpoint's W files checked per rank), so what must fit is compute and bandwidth: the first step's
    compilation and each rank's 1/W of the checkpoint plus DCP's whole ``.metadata``. The 405B, 671B and
    235B presets raise it to 900 s for their per-rank load (about 16 GB at 512 ranks for 671B)."""
    train_timeout_seconds: int = 100
    """Collective timeout from the second step on: a rank that hangs makes every rank exit within it, naming
    the collective and the step."""
    trace_buf_size: int = 20000
    """Entries of the flight recorder (collectives per process group), dumped on a timeout; 0 = off."""

    MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
    """A week: a collective that waits longer is a hang, and larger values overflow the backends' timers."""
    MAX_TRACE_ENTRIES = 1_000_000
    """The flight recorder allocates its ring of entries up front, per process group (1e11 aborted both ranks)."""

    def validate(self) -> None:
        for key in ("init_timeout_seconds", "train_timeout_seconds"):
            value = getattr(self, key)
            _require(
                0 < value <= self.MAX_TIMEOUT_SECONDS, f"comm.{key}",
                f"must be in 1 .. {self.MAX_TIMEOUT_SECONDS} seconds (a week); got {value}",
            )  # fmt: skip
        _require(
            0 <= self.trace_buf_size <= self.MAX_TRACE_ENTRIES, "comm.trace_buf_size",
            f"must be in 0 .. {self.MAX_TRACE_ENTRIES} entries (0 = off); got {self.trace_buf_size}",
        )  # fmt: skip


@dataclass
class FaultToleranceConfig:
    enable: bool = False
    """Run as one replica group of a torchft job: replica groups form the outer data-parallel axis, keep
    training when one dies, and a restarted group heals from a live one (docs/fault-tolerance.md)."""
    replica_id: int = 0
    """This group's index, 0 .. group_size - 1; its run folder is <dump_folder>/replica_<id>."""
    group_size: int = 1
    """Replica groups at full strength. The global batch is counted over all of them."""
    min_replica_size: int = 1
    """Fewest replica groups a step may commit with."""
    lighthouse: str = ""
    """Address of the torchft lighthouse (lockstep lighthouse), e.g. http://host:29510; empty = $TORCHFT_LIGHTHOUSE."""
    timeout_s: float = 60.0
    """Cross-group collectives, commit votes and healing transfers fail after this many seconds."""
    quorum_timeout_s: float = 120.0
    """Waiting for a quorum of replica groups fails after this many seconds."""
    keep_global_batch: bool = True
    """True: the live groups compute the missing groups' microbatches too, so every committed step is bitwise
    the step of a run without failures. False: torchft's own behaviour, a step shrinks to the live groups."""

    def validate(self) -> None:
        if not self.enable:
            return
        _require(self.group_size >= 1, "fault_tolerance.group_size", "must be >= 1")
        _require(
            0 <= self.replica_id < self.group_size,
            "fault_tolerance.replica_id",
            f"must be in 0 .. group_size - 1 = {self.group_size - 1}; got {self.replica_id}",
        )
        _require(
            1 <= self.min_replica_size <= self.group_size,
            "fault_tolerance.min_replica_size",
            f"must be in 1 .. group_size = {self.group_size}; got {self.min_replica_size}",
        )
        _require(self.timeout_s > 0, "fault_tolerance.timeout_s", "must be > 0")
        _require(self.quorum_timeout_s > 0, "fault_tolerance.quorum_timeout_s", "must be > 0")
        _require(
            bool(self.lighthouse_address()),
            "fault_tolerance.lighthouse",
            "no lighthouse address: set it (e.g. http://localhost:29510, as printed by lockstep lighthouse) or "
            "export TORCHFT_LIGHTHOUSE",
        )
        address = urllib.parse.urlsplit(self.lighthouse_address())
        try:
            port = address.port
        except ValueError:
            port = None
        _require(
            address.scheme in ("http", "https") and bool(address.hostname) and port is not None,
            "fault_tolerance.lighthouse",
            f"{self.lighthouse_address()!r} is not a lighthouse address; give http://HOST:PORT, as printed by "
            "lockstep lighthouse",
        )
        _require(
            importlib.util.find_spec("torchft") is not None,
            "fault_tolerance.enable",
            "needs the torchft package, which is not installed; pip install torchft==0.2.0",
        )

    def lighthouse_address(self) -> str:
        return self.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE", "")


@dataclass
class CheckpointConfig:
    enable: bool = False
    """Save and resume through torch.distributed.checkpoint; rerunning the same command resumes."""
    folder: str = "checkpoint"
    """Checkpoint folder, relative to job.dump_folder (one step-N folder per checkpoint)."""
    interval: int = 500
    """Save every N steps (and at the last step, and when stopped by a signal)."""
    keep_latest_k: int = 0
    """Keep only the newest K checkpoints; 0 keeps all."""
    async_mode: str = "disabled"
    """disabled, async (write in a background thread), or async_with_pinned_mem (CUDA: stage in pinned memory)."""
    load_step: int = -1
    """Resume from this step's checkpoint; -1 = the newest complete one."""
    model_only: bool = False
    """Save (and load) model weights only, without optimizer, scheduler, data loader, RNG and step."""
    exclude_from_loading: list[str] = field(default_factory=list)
    """Parts not to load on resume: any of model, optimizer, lr_scheduler, dataloader, train_state, rng."""
    initial_load_path: str = ""
    """Weights to start from when the run has no checkpoint yet: a lockstep checkpoint, a torchtitan checkpoint
    (a step-N folder), or a Hugging Face folder."""
    initial_load_model_only: bool = True
    """Take only the model from initial_load_path (training starts at step 0). false also takes the optimizer
    state, the lr schedule's step and the step count (tokens seen too), so training goes on from that checkpoint's
    step, as torchtitan's option of this name does; the data continue at that step of this run's own order
    (step x global batch: where the other run's steps were shorter, under fault tolerance without
    keep_global_batch, its samples and this run's differ)."""
    last_save_model_only: bool = False
    """Make the final checkpoint model weights only (smaller; cannot resume training)."""
    export_dtype: str = "fp32"
    """Model dtype of model-only checkpoints (fp32 or bf16); full checkpoints always keep fp32."""
    create_seed_checkpoint: bool = False
    """Write the step-0 weights and exit (any layout writes the same ones, each rank its shards); runs of any layout start from them."""
    ignore_mismatch: bool = False
    """Resume even if the model, tokenizer or dataset fingerprint differs from the checkpoint's."""
    allow_config_change: bool = False
    """Resume with changed settings that change the numbers (optimizer.lr, model, data, ...); the new values take effect."""
    discard_newer: bool = False
    """Delete (or overwrite) checkpoints newer than the one resumed; without it lockstep refuses to."""

    def validate(self) -> None:
        _require(self.interval > 0, "checkpoint.interval", "must be > 0")
        _require(self.keep_latest_k >= 0, "checkpoint.keep_latest_k", "must be >= 0")
        _one_of(self.async_mode, ("disabled", "async", "async_with_pinned_mem"), "checkpoint.async_mode")
        _one_of(self.export_dtype, ("fp32", "bf16"), "checkpoint.export_dtype")
        _require(self.load_step >= -1, "checkpoint.load_step", "must be >= 0, or -1 for the newest")
        _require(
            self.initial_load_model_only or not self.model_only,
            "checkpoint.initial_load_model_only",
            "= false asks for the optimizer and the step, which checkpoint.model_only = true never loads; drop one",
        )
        unknown = sorted(set(self.exclude_from_loading) - set(CHECKPOINT_PARTS))
        _require(
            not unknown,
            "checkpoint.exclude_from_loading",
            f"unknown parts {unknown}; choose from {', '.join(CHECKPOINT_PARTS)}",
        )

"""Build the model for a layout: meta device, the pipeline split, then the model transformations in
their fixed order (tensor parallel, activation checkpointing, compile, FSDP), then materialise and
initialise from the root seed (so every layout starts from identical weights)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from lockstep.config.errors import ConfigError
from lockstep.config.job import ParallelDims, deterministic_chunks
from lockstep.config.sections import (
    ActivationCheckpointConfig,
    CompileConfig,
    DebugConfig,
    ModelConfig,
    ParallelismConfig,
)
from lockstep.models.registry import model_args
from lockstep.models.size import TRAINING_BYTES_PER_PARAMETER, size_problem
from lockstep.parallel.activation_checkpoint import apply_activation_checkpointing
from lockstep.parallel.canonical import TreeReduceScatter
from lockstep.parallel.canonical_linear import apply_canonical_linears, canonical_plan
from lockstep.parallel.compile import apply_compile
from lockstep.parallel.expert_parallel import apply_expert_parallel
from lockstep.parallel.fsdp import apply_fsdp
from lockstep.parallel.node_levels import AxisLevels
from lockstep.parallel.pipeline import Pipeline, pipeline_llm
from lockstep.parallel.tensor_parallel import apply_tensor_parallel


@dataclass(kw_only=True)
class BuildSettings:
    """What the model transformations need to know about the run, resolved once by the trainer (a
    layout, in lockstep's words, is the parallel degrees alone: ``dims``)."""

    dims: ParallelDims
    mesh: DeviceMesh | None
    device: torch.device
    mixed_precision: str
    layout_invariant_reductions: bool
    """Sum gradients in the canonical tree (FSDP's reduce-scatter included), in fp32 and bf16 alike;
    off only with debug.layout_invariant_reductions = false (the backend's own sums)."""
    fsdp: bool
    """Wrap the model in FSDP2 over the dp_shard axis: it shards (dp_shard > 1), or bf16 training, which
    is FSDP's mixed precision in every layout (over one rank when nothing is sharded)."""
    root_seed: int
    attention_backend: str
    """sdpa or flex: model.attention with auto resolved for the device (resolve_attention_backend)."""
    deterministic_chunks: int = 0
    """debug.deterministic's resolved chunk count: models that offer it split their linear layers' sums
    into this many fixed chunks at every tensor-parallel degree (lockstep.parallel.canonical_linear). 0
    (not deterministic), or 1 at TP 1: plain linears."""
    reduction_levels: dict[str, AxisLevels] = field(default_factory=dict)
    """The data-parallel axes split by node (``data_parallel_levels``): FSDP's canonical reduce-scatter
    runs inside the node first and across nodes second."""
    initialize: bool = True
    """False leaves the parts on the meta device, unfilled: lockstep estimate materialises them as fake
    tensors, which hold shapes only."""
    fill: bool = True
    """False materialises the parts without drawing their initial values: the caller fills them
    (``fill_weights``) unless a checkpoint's model loads over them, so a resume draws nothing."""


@dataclass
class BuiltModel:
    parts: list[nn.Module]
    """This rank's model: one module, or its pipeline stages."""
    param_names: list[str]
    """Parameter names of the whole model in definition order (all stages)."""
    flops_per_token: int
    args: Any
    """The model's *Args (architecture), recorded in checkpoints."""
    fsdp_modules: list[nn.Module] = field(default_factory=list)
    unmanaged_params: list[nn.Parameter] = field(default_factory=list)
    """Parameters FSDP leaves alone (expert-parallel experts): autograd accumulates into them directly."""
    pipeline: Pipeline | None = None
    canonical_tp: bool = False
    """Its linear layers sum in fixed chunks (debug.deterministic): the logits come back whole."""


def check_model_size(spec, args, world_size: int, memory_bytes: float | None = None) -> None:
    """Refuse, before anything is built, a model whose weights, gradients and AdamW state alone could not
    fit the machine even spread over every rank, in one line naming the sizes and the limit."""
    problem = size_problem(
        spec, args, bytes_per_parameter=TRAINING_BYTES_PER_PARAMETER, world_size=world_size, memory_bytes=memory_bytes
    )
    if problem:
        raise ConfigError("model", f"{problem} (weights, gradients and AdamW state)")


def check_model_fits_layout(
    model: ModelConfig, dims: ParallelDims, debug: DebugConfig | None = None, memory_bytes: float | None = None
) -> None:
    """Refuse a model too large for any layout of `memory_bytes` per rank (this machine's by default) and a
    tensor-parallel degree that cannot split the model (before any process group starts), and
    resolve `debug`'s deterministic chunk count (0: the tensor-parallel degree), refusing one that the
    model cannot split or that is below the degree (a resume at a higher degree than the run recorded)."""
    spec, args = model_args(model, vocab_size=1, max_seq_len=1)
    check_model_size(spec, args, dims.world_size, memory_bytes)
    if dims.tp > 1 and (problem := spec.check_tensor_parallel_degree(args, dims.tp)):
        raise ConfigError("parallelism.tensor_parallel_degree", f"{problem}; choose a divisor")
    if debug is not None and debug.deterministic:
        chunks = debug.deterministic_chunks = deterministic_chunks(debug, dims)
        if chunks < dims.tp:
            raise ConfigError(
                "debug.deterministic_chunks",
                f"{chunks} chunks cannot give tensor-parallel degree {dims.tp} the same bits (this run's sums "
                f"are split {chunks} ways); run at tensor_parallel_degree <= {chunks}, or start a new run",
            )
        if chunks > 1 and (problem := spec.check_tensor_parallel_degree(args, chunks)):
            raise ConfigError("debug.deterministic_chunks", f"{problem}; choose a smaller power of two")
    if dims.pp > 1 and getattr(args, "tie_embeddings", False):
        raise ConfigError(
            "parallelism.pipeline_parallel_degree",
            f"{model.name} {model.flavor} ties its output projection to the embedding, which the first and "
            "last pipeline stages would both need; use another parallelism or an untied flavor",
        )
    if dims.ep > 1:
        experts = getattr(args, "n_routed_experts", 0)
        if not experts:
            raise ConfigError(
                "parallelism.expert_parallel_degree",
                f"{model.name} has no experts; use deepseek_v3, qwen3_moe or llama4",
            )
        if experts % dims.ep:
            raise ConfigError("parallelism.expert_parallel_degree", f"{dims.ep} does not divide {experts} experts")


def build_model(
    model: ModelConfig,
    *,
    activation_checkpoint: ActivationCheckpointConfig,
    compile_config: CompileConfig,
    parallelism: ParallelismConfig,
    settings: BuildSettings,
    vocab_size: int,
    seq_len: int,
    pipeline_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    num_pipeline_microbatches: int = 0,
) -> BuiltModel:
    spec, args = model_args(model, vocab_size, seq_len)
    dims = settings.dims  # check_model_fits_layout ran before the process group started
    with torch.device("meta"):
        whole = spec.build(args, settings.attention_backend)
    built = BuiltModel([], [name for name, _ in whole.named_parameters()], whole.num_flops_per_token(seq_len), args)

    chunks = settings.deterministic_chunks
    canonical_tp = built.canonical_tp = spec.canonical_tensor_parallel and (chunks > 1 or (chunks and dims.tp > 1))
    if canonical_tp and args.vocab_size % chunks:
        raise ConfigError(
            "debug.deterministic_chunks", f"{chunks} does not divide the vocabulary ({args.vocab_size}); use fewer"
        )

    def parallelize(part: nn.Module) -> nn.Module:
        if canonical_tp:  # no sequence or loss parallelism: activations whole on every tp rank
            plan = spec.tensor_parallel_plan(part, False)
            if dims.tp > 1:
                apply_tensor_parallel(part, settings.mesh["tp"], canonical_plan(part, plan, chunks))
            else:
                apply_canonical_linears(part, plan, chunks)
        elif dims.tp > 1:
            plan = spec.tensor_parallel_plan(part, parallelism.loss_parallel)
            apply_tensor_parallel(part, settings.mesh["tp"], plan)
        expert_params = []
        if dims.ep > 1:
            expert_params = apply_expert_parallel(part, settings.mesh["dp_shard"], settings.layout_invariant_reductions)
            built.unmanaged_params += expert_params
        apply_activation_checkpointing(part.layers, activation_checkpoint)
        apply_compile(part.layers, compile_config)
        if settings.fsdp:
            built.fsdp_modules += apply_fsdp(
                part,
                shard_mesh=settings.mesh["dp_shard"],
                mixed_precision=settings.mixed_precision,
                reshard_after_forward=parallelism.fsdp_reshard_after_forward and dims.pp == 1,
                canonical_reduce_scatter=TreeReduceScatter(settings.reduction_levels.get("dp_shard"))
                if settings.layout_invariant_reductions
                else None,
                ignored_params=set(expert_params),
            )
        if settings.initialize and settings.fill:
            part.init_weights(settings.root_seed, settings.device)
        elif settings.initialize:
            part.materialize(settings.device)
        return part

    if dims.pp > 1:
        built.pipeline = pipeline_llm(
            whole, pp_mesh=settings.mesh["pp"], parallelism=parallelism, num_microbatches=num_pipeline_microbatches,
            device=settings.device, loss_fn=pipeline_loss, parallelize_stage=parallelize,
            sync_every_microbatch=settings.layout_invariant_reductions and settings.fsdp,  # the tree kept on the shards
        )  # fmt: skip
        built.parts = built.pipeline.model_parts
    else:
        built.parts = [parallelize(whole)]
    return built

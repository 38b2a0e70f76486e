"""``lockstep estimate``: per-rank memory by term and per-step traffic by link class for a config at any
world size, before anything is booked or allocated.

Each pipeline stage's worst rank is traced (``trace_rank``: the trainer's own build, parallelize order,
reductions and step, on fake tensors and a fake process group). A deep model is traced at a few small
depths and extrapolated: every block of a kind allocates, saves and sends the same, so each figure is
linear in the number of blocks of each kind per stage (``DepthPlan``); the tests hold the extrapolation
to a trace at full depth and to measurement.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lockstep.config import JobConfig, validate_job_config
from lockstep.config.errors import ConfigError
from lockstep.config.job import ParallelDims, resolve_parallel_dims
from lockstep.data.tokenizer import HFTokenizer
from lockstep.models.common.attention import resolve_attention_backend
from lockstep.models.registry import model_args
from lockstep.parallel.parallelize import check_model_fits_layout
from lockstep.parallel.pipeline import stage_layer_ranges
from lockstep.tools.estimate.devices import GIB, DeviceSpec
from lockstep.tools.estimate.memory import TERMS
from lockstep.tools.estimate.rank_step import StepShape
from lockstep.tools.estimate.trace import PipelineMailbox, RankTrace, stage_ranks, trace_rank, traceable

PUBLISHED_VOCAB = {"llama3": 128256, "deepseek_v3": 129280, "qwen3": 151936, "qwen3_moe": 151936, "llama4": 202048}
"""A family's published tokenizer size, used when the config's tokenizer cannot be read here."""


@dataclass
class Topology:
    nnodes: int
    nproc_per_node: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


@dataclass
class StageEstimate:
    stage: int
    rank: int
    memory: dict[str, float]
    """GiB per term at the stage's peak, fixed overhead and fragmentation margin included."""
    peak_phase: str
    total_gib: float
    traffic: dict[str, dict[str, float]]
    """GB sent per step by collective kind: intra (inside the node), inter (between nodes), calls."""
    ring_traffic: dict[str, dict[str, float]]
    """The same step with every all-to-all reduction run as NCCL's ring instead."""
    local_params: int


@dataclass
class Estimate:
    config: dict
    layout: dict
    device: dict
    stages: list[StageEstimate]
    compute: dict
    verdict: dict
    notes: list[str] = field(default_factory=list)
    advice: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_vocab(config: JobConfig, given: int | None) -> tuple[int, str]:
    """The vocabulary the model gets: given, the flavor's own, the tokenizer's, or the family's published one."""
    if given:
        return given, "--vocab-size"
    _, args = model_args(config.model, 1, 1)
    if args.vocab_size > 1:
        return args.vocab_size, f"{config.model.name} {config.model.flavor}'s embedding"
    kind, path = config.model.tokenizer, config.model.tokenizer_path
    if kind == "bytes":
        return 258, "the bytes tokenizer"
    if kind == "builtin":
        return 2048, "the built-in tokenizer"
    if Path(path).exists():
        return HFTokenizer(path).vocab_size, path
    published = PUBLISHED_VOCAB[config.model.name]
    return published, f"{config.model.name}'s published tokenizer ({path} is not here; --vocab-size to change)"


@dataclass
class DepthPlan:
    """The small depths traced for a deep model, and how to read the full depth from them.

    Blocks come in up to two kinds (DeepSeek-V3's leading dense blocks, then MoE blocks). Each variant
    is the model with n_layers (and n_dense_layers) overridden; each stage's figures are solved as
    c + a x dense blocks + b x other blocks from the variants' per-stage counts."""

    variants: list[dict[str, int]]
    full: dict[str, int]
    pp: int
    split_points: list[str]

    @classmethod
    def of(cls, config: JobConfig, dims: ParallelDims) -> DepthPlan | None:
        _, args = model_args(config.model, 1, 1)
        layers, dense = args.n_layers, getattr(args, "n_dense_layers", None)
        full = {"n_layers": layers} if dense is None else {"n_layers": layers, "n_dense_layers": dense}
        split_points = config.parallelism.pipeline_parallel_split_points
        if split_points or layers <= 6 * dims.pp:
            return None  # traced at full depth
        # Three blocks or more per stage: with two, FSDP's prefetching has not settled into its pattern.
        if dense is None or dense in (0, layers):
            variants = [{"n_layers": 3 * dims.pp}, {"n_layers": 4 * dims.pp}]
            if dense is not None:  # all dense or none: the dense count follows the depth
                variants = [{**v, "n_dense_layers": min(dense, v["n_layers"])} for v in variants]
        else:
            variants = [
                {"n_layers": 3 * dims.pp, "n_dense_layers": 1},
                {"n_layers": 4 * dims.pp, "n_dense_layers": 1},
                {"n_layers": 3 * dims.pp, "n_dense_layers": 2},
            ]
        return cls(variants, full, dims.pp, split_points)

    def counts(self, depth: dict[str, int]) -> list[tuple[int, int]]:
        """(dense, other) blocks of each stage at this depth."""
        names = [str(i) for i in range(depth["n_layers"])]
        dense = depth.get("n_dense_layers", 0)
        stages = stage_layer_ranges(names, self.pp, self.split_points) if self.pp > 1 else [names]
        return [(sum(int(n) < dense for n in s), sum(int(n) >= dense for n in s)) for s in stages]

    def extrapolate(self, stage: int, values: list[dict[str, float]]) -> dict[str, float]:
        rows = [self.counts(v)[stage] for v in self.variants]
        target = self.counts(self.full)[stage]
        columns = [0] + [k + 1 for k in (0, 1) if len({r[k] for r in rows}) > 1]
        design = np.array([[1.0, *r] for r in rows])[:, columns]
        goal = np.array([1.0, *target])[columns]
        weights = np.linalg.lstsq(design.T, goal, rcond=None)[0]  # goal as a combination of the variants
        keys = set().union(*values)
        return {k: float(sum(w * v.get(k, 0.0) for w, v in zip(weights, values, strict=True))) for k in keys}


def estimate(
    config: JobConfig,
    topology: Topology,
    device: DeviceSpec,
    *,
    vocab_size: int | None = None,
) -> Estimate:
    started = time.perf_counter()
    world = topology.world_size
    validate_job_config(config, world)
    dims = resolve_parallel_dims(config.parallelism, world)
    check_model_fits_layout(config.model, dims, config.debug, memory_bytes=device.memory_gib * 2**30)
    if not traceable(config.parallelism):
        raise ConfigError(
            "parallelism.pipeline_parallel_schedule",
            "lockstep estimate traces pipeline stages one after another and cannot yet estimate a schedule that "
            "runs several stages per rank; estimate with GPipe or 1F1B (the same stage sizes, one stage per rank)",
        )
    vocab, vocab_source = resolve_vocab(config, vocab_size)
    device_type = "cpu" if device.name == "cpu" else "cuda"
    backend = resolve_attention_backend(config.model.attention, device_type)
    notes = [f"vocabulary {vocab:,} from {vocab_source}"]
    traced = copy.deepcopy(config)
    if backend == "flex":  # traced as SDPA's flash kernel: the same saved tensors (output, log-sum-exp)
        traced.data.document_masking = False
        notes.append(
            "FlexAttention traced as SDPA's flash kernel, which saves the same output and log-sum-exp; its "
            "block mask (a few int32 [S/128, S/128] tables per microbatch) is left out"
        )
    if config.training.mixed_precision == "bf16" and device_type == "cpu":
        notes.append("bf16 on CPU: every figure as on a GPU; CPU kernels may add temporaries")
    plan = DepthPlan.of(config, dims)
    ranks = stage_ranks(dims)
    if plan is None:
        figures = [_flat(t) for t in _trace_stages(traced, dims, ranks, topology, vocab, backend)]
    else:
        per_variant = []
        for variant in plan.variants:
            shallow = copy.deepcopy(traced)
            shallow.model.overrides = {**shallow.model.overrides, **variant}
            per_variant.append([_flat(t) for t in _trace_stages(shallow, dims, ranks, topology, vocab, backend)])
        figures = [plan.extrapolate(s, [v[s] for v in per_variant]) for s in range(dims.pp)]
        notes.append(
            "traced at depths " + ", ".join(str(v["n_layers"]) for v in plan.variants)
            + f" and extrapolated to {plan.full['n_layers']} blocks (figures are linear in blocks per stage)"
        )  # fmt: skip
    stages = [_stage(s, ranks[s], f, device) for s, f in enumerate(figures)]
    result = Estimate(
        config={"model": f"{config.model.name} {config.model.flavor}", "vocab_size": vocab},
        layout=_layout(config, dims, topology, backend),
        device=dataclasses.asdict(device),
        stages=stages,
        compute=_compute(config, dims, device, vocab, stages),
        verdict=_verdict(stages, device),
        notes=notes,
    )
    result.seconds = round(time.perf_counter() - started, 1)
    return result


def _trace_stages(config, dims, ranks, topology, vocab, backend) -> list[RankTrace]:
    mailbox = PipelineMailbox()
    return [
        trace_rank(
            config,
            dims,
            rank=rank,
            ranks_per_node=topology.nproc_per_node,
            vocab_size=vocab,
            attention_backend=backend,
            mailbox=mailbox,
        )  # fmt: skip
        for rank in ranks
    ]


def _flat(trace: RankTrace) -> dict[str, float]:
    flat: dict[str, float] = {"local_params": trace.local_params}
    for phase, terms in trace.peaks.items():
        flat.update({f"peak.{phase}.{term}": nbytes for term, nbytes in terms.items()})
    for name, traffic in (("wire", trace.traffic), ("ring", trace.as_ring)):
        for kind, by_link in traffic.as_dict().items():
            flat.update({f"{name}.{kind}.{link}": value for link, value in by_link.items()})
    return flat


def _nested(flat: dict[str, float], prefix: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        if key.startswith(prefix + "."):
            first, second = key[len(prefix) + 1 :].rsplit(".", 1)
            out.setdefault(first, {})[second] = value
    return out


def _stage(stage: int, rank: int, flat: dict[str, float], device: DeviceSpec) -> StageEstimate:
    peaks = _nested(flat, "peak")
    phase = max(peaks, key=lambda p: sum(peaks[p].values()))
    memory = {term: max(peaks[phase].get(term, 0.0), 0.0) / GIB for term in TERMS}
    allocated = sum(memory.values())
    memory["fragmentation_margin"] = allocated * device.fragmentation
    memory["cuda_context_and_nccl"] = device.fixed_overhead_gib
    return StageEstimate(
        stage, rank, {k: round(v, 4) for k, v in memory.items()}, phase, round(sum(memory.values()), 2),
        _gigabytes(_nested(flat, "wire")), _gigabytes(_nested(flat, "ring")), round(flat["local_params"]),
    )  # fmt: skip


def _gigabytes(traffic: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        kind: {"intra_gb": v.get("intra", 0) / 1e9, "inter_gb": v.get("inter", 0) / 1e9, "calls": round(v["calls"])}
        for kind, v in traffic.items()
    }


def _layout(config: JobConfig, dims: ParallelDims, topology: Topology, backend: str) -> dict:
    shape = StepShape.of(config, dims)
    return {
        "world_size": dims.world_size, "nnodes": topology.nnodes, "nproc_per_node": topology.nproc_per_node,
        "pp": dims.pp, "dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard, "tp": dims.tp, "ep": dims.ep,
        "reductions": "canonical" if config.debug.layout_invariant_reductions else "native",
        "deterministic": config.debug.deterministic, "mixed_precision": config.training.mixed_precision,
        "activation_checkpoint": config.activation_checkpoint.mode, "attention": backend,
        "microbatch": shape.microbatch, "microbatches_per_step": shape.microbatches, "seq_len": shape.seq_len,
        "loss_chunk_tokens": config.training.loss_chunk_tokens,
    }  # fmt: skip


def _compute(config: JobConfig, dims: ParallelDims, device: DeviceSpec, vocab: int, stages) -> dict:
    """FLOPs per rank per step, and the step time and MFU they allow on this device: compute at peak,
    stretched by the pipeline bubble, plus the optimizer step at memory bandwidth (AdamW reads the fp32
    parameter, gradient and two moments and writes three of them: 28 bytes per local parameter), against
    the busiest link (communication fully overlapped)."""
    spec, args = model_args(config.model, vocab, config.training.seq_len)
    with torch.device("meta"):
        model = spec.build(args, "sdpa")
    shape = StepShape.of(config, dims)
    tokens = shape.microbatch * shape.microbatches * shape.seq_len * dims.dp
    model_flops = model.num_flops_per_token(shape.seq_len) * tokens / dims.world_size
    recompute = {"none": 0.0, "selective": 0.0, "full": 1 / 3}[config.activation_checkpoint.mode]
    if config.activation_checkpoint.mode == "selective" and config.activation_checkpoint.selective_ac_option != "op":
        recompute = 1 / 3 / int(config.activation_checkpoint.selective_ac_option)
    hardware_flops = model_flops * (1 + recompute)
    peak = device.peak_tflops[config.training.mixed_precision] * 1e12
    bubble = (dims.pp - 1) / (shape.microbatches + dims.pp - 1) if dims.pp > 1 else 0.0
    optimizer_s = 28 * max(s.local_params for s in stages) / (device.hbm_gbps * 1e9)
    compute_s = hardware_flops / peak / (1 - bubble) + optimizer_s
    worst = max(stages, key=lambda s: sum(v["inter_gb"] for v in s.traffic.values()))
    intra_s = sum(v["intra_gb"] for v in worst.traffic.values()) / device.intra_node_gbps
    inter_s = sum(v["inter_gb"] for v in worst.traffic.values()) / device.inter_node_gbps
    step_s = max(compute_s, intra_s, inter_s)
    return {
        "model_tflop_per_rank": round(model_flops / 1e12, 3), "hardware_tflop_per_rank": round(hardware_flops / 1e12, 3),
        "pipeline_bubble": round(bubble, 4), "optimizer_s": round(optimizer_s, 4), "compute_s": round(compute_s, 4), "intra_node_s": round(intra_s, 4),
        "inter_node_s": round(inter_s, 4), "step_s": round(step_s, 4),
        "mfu_ceiling_percent": round(100 * model_flops / peak / step_s, 1) if step_s else 0.0,
        "bound_by": "compute" if step_s == compute_s else ("inter-node links" if step_s == inter_s else "NVLink"),
        "tokens_per_step": tokens,
    }  # fmt: skip


def _verdict(stages: list[StageEstimate], device: DeviceSpec) -> dict:
    worst = max(stages, key=lambda s: s.total_gib)
    terms = {k: v for k, v in worst.memory.items() if k not in ("fragmentation_margin", "cuda_context_and_nccl")}
    biggest = max(terms, key=terms.get)
    return {
        "fits": worst.total_gib <= device.memory_gib,
        "worst_stage": worst.stage,
        "peak_gib": worst.total_gib,
        "device_gib": device.memory_gib,
        "headroom_gib": round(device.memory_gib - worst.total_gib, 2),
        "biggest_term": biggest,
        "biggest_term_gib": round(terms[biggest], 2),
    }


def fits_clearly_not(result: Estimate, margin: float = 0.1) -> bool:
    """The estimate is above the device's memory by more than `margin` (the refusal threshold of
    ``lockstep train``, which leaves the borderline cases to the run)."""
    return result.verdict["peak_gib"] > result.verdict["device_gib"] * (1 + margin)

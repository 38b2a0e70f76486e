"""Determinism audit: run a few steps with torch's deterministic mode in warn-only form, collect every
op PyTorch reports as nondeterministic, and add what lockstep knows about the configured features.

Two kinds of findings: run-to-run nondeterminism (the same command can give other bits), and layout
dependence (the same numbers are not reproduced by another parallel layout or implementation).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lockstep.config.sections import (
    ZERO_BUBBLE_SCHEDULES,
    CompileConfig,
    DebugConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelismConfig,
    TrainingConfig,
)
from lockstep.models.common.attention import resolve_attention_backend

_TORCH_ALERT = re.compile(r"^(\S+) does not have a deterministic implementation")
_ATTENTION_ALERT = re.compile(r"^(.+?) defaults to a non-deterministic algorithm")
"""Flash and memory-efficient SDPA on CUDA warn this in warn-only mode; in strict debug.deterministic
they take a deterministic backward instead."""


@dataclass(frozen=True)
class AuditFinding:
    source: str
    """torch (reported by an op at run time) or lockstep (known from the config)."""
    item: str
    verdict: str
    """nondeterministic, layout-dependent, or ok."""
    note: str


def config_findings(
    *,
    debug: DebugConfig,
    parallelism: ParallelismConfig,
    optimizer: OptimizerConfig,
    training: TrainingConfig,
    compile_config: CompileConfig,
    model: ModelConfig,
    document_masking: bool = True,
) -> list[AuditFinding]:
    """What lockstep knows about the configured features, from the config alone (`document_masking`:
    data.document_masking; without it attention takes SDPA whatever the backend)."""
    found = []
    if not debug.layout_invariant_reductions:
        found.append(AuditFinding("lockstep", "debug.layout_invariant_reductions = false", "layout-dependent",
                                  "all_reduce / reduce-scatter order depends on the number of ranks; what it buys is "
                                  "NCCL's fused kernels, not bandwidth (the canonical sums send a hierarchical "
                                  "ring's bytes per link)"))  # fmt: skip
    else:
        found.append(AuditFinding("lockstep", "canonical reductions (the default)", "ok",
                                  f"gradients, loss and grad norm summed in one tree in {training.mixed_precision}: "
                                  "FSDP's reduce-scatter and the replica sum run inside each node first, then across "
                                  "nodes, a hierarchical ring's bytes per link (lockstep estimate prints them)"))  # fmt: skip
    if parallelism.pipeline_parallel_degree > 1 and parallelism.pipeline_parallel_schedule in ZERO_BUBBLE_SCHEDULES:
        found.append(AuditFinding("lockstep", f"schedule {parallelism.pipeline_parallel_schedule}", "layout-dependent",
                                  "weight gradients are accumulated outside autograd, in schedule order"))  # fmt: skip
    if debug.deterministic:
        chunks = debug.deterministic_chunks or parallelism.tensor_parallel_degree
        note = (f"split sums in {chunks} fixed chunks (debug.deterministic_chunks): bitwise at every degree up to "
                f"{chunks}, refused above; no sequence or loss parallelism under debug.deterministic") if chunks > 1 else (
                "plain linear layers: the same bits at TP 1 only (a resume at TP > 1 is refused); set "
                "debug.deterministic_chunks to the largest TP degree to compare or resume at")  # fmt: skip
        found.append(AuditFinding("lockstep", "tensor parallelism", "ok", note))
    elif parallelism.tensor_parallel_degree > 1:
        found.append(AuditFinding("lockstep", "tensor parallelism", "layout-dependent",
                                  "row-parallel matmuls, column-parallel input gradients and sequence-parallel norm "
                                  "weight gradients are summed across ranks in the backend's order (1e-5, not "
                                  "bitwise; debug.deterministic makes them canonical)"))  # fmt: skip
    if parallelism.expert_parallel_degree != 1 and debug.layout_invariant_reductions:
        found.append(AuditFinding("lockstep", "expert parallelism", "ok",
                                  "local experts run once per source microbatch, weight gradients summed in the "
                                  "canonical tree (bitwise)"))  # fmt: skip
    if optimizer.implementation == "fused":
        found.append(AuditFinding("lockstep", "optimizer.implementation = fused", "layout-dependent",
                                  "fused AdamW rounds differently from foreach/for-loop (each is repeatable)"))  # fmt: skip
    if training.mixed_precision == "bf16" and debug.layout_invariant_reductions:
        found.append(AuditFinding("lockstep", "training.mixed_precision = bf16", "ok",
                                  "FSDP's bf16 policy in every layout, fp32 gradients in the canonical tree: bitwise "
                                  "across DP/FSDP/HSDP/PP (not fp32's numbers)"))  # fmt: skip
    if compile_config.enable:
        found.append(AuditFinding("lockstep", "compile.enable", "ok",
                                  "inductor without max-autotune: kernel choice is fixed; eager and compiled differ"))  # fmt: skip
    on_cuda = training.device == "cuda" or (training.device == "auto" and torch.cuda.is_available())
    backend = resolve_attention_backend(model.attention, "cuda" if on_cuda else "cpu")
    flex = backend == "flex" and document_masking
    if on_cuda and not flex:
        strict = debug.deterministic and not debug.deterministic_warn_only
        found.append(AuditFinding("lockstep", "SDPA on CUDA (flash, memory-efficient, cuDNN)",
                                  "ok" if strict else "nondeterministic",
                                  "backward is deterministic only under strict debug.deterministic: flash and "
                                  "memory-efficient switch to their deterministic kernels, cuDNN attention (which "
                                  "raises no alert) is turned off by lockstep"))  # fmt: skip
    if flex:
        found.append(AuditFinding("lockstep", "FlexAttention (model.attention resolves to flex)", "ok",
                                  "Triton backward writes each dQ and dK/dV block once, no atomics; compiled "
                                  "without max-autotune, one kernel config (see models/common/attention.py)"))  # fmt: skip
    if not debug.deterministic:
        found.append(AuditFinding("lockstep", "debug.deterministic = false", "nondeterministic",
                                  "nondeterministic kernels (e.g. CUDA atomics) are allowed; turn it on"))  # fmt: skip
    return found


def audit_overrides(steps: int, dump_folder: str) -> list[str]:
    """Config overrides for the audit run: a few steps, deterministic in warn-only form, no checkpoints."""
    return [
        "--debug.deterministic", "--debug.deterministic_warn_only", "--debug.layout_invariant_reductions",
        "--training.steps", str(steps), "--checkpoint.no-enable", "--job.dump_folder", dump_folder,
    ]  # fmt: skip


def torch_alerts(run: Callable[[], None]) -> list[AuditFinding]:
    """Call `run` (a training run) and return every op torch flagged as nondeterministic, once each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    found: dict[str, str] = {}
    for warning in caught:
        message = str(warning.message)
        if match := _TORCH_ALERT.match(message):
            found.setdefault(match.group(1), "no deterministic kernel on this device")
        elif match := _ATTENTION_ALERT.match(message):
            found.setdefault(match.group(1), "nondeterministic backward unless debug.deterministic is strict")
    return [AuditFinding("torch", op, "nondeterministic", note) for op, note in found.items()]


def format_findings(findings: list[AuditFinding]) -> str:
    lines = ["source | item | verdict | note", "--- | --- | --- | ---"]
    lines += [f"{f.source} | {f.item} | {f.verdict} | {f.note}" for f in findings]
    if all(f.verdict == "ok" for f in findings):
        lines.append(
            "- | nothing found | ok | every op that ran has a deterministic kernel; every feature keeps the bits"
        )
    return "\n".join(lines)

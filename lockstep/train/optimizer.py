"""AdamW and the warmup-stable-decay learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from lockstep.config.sections import LRSchedulerConfig, OptimizerConfig


def build_optimizer(
    named_params: Iterable[tuple[str, torch.nn.Parameter]], optimizer: OptimizerConfig
) -> torch.optim.Optimizer:
    """AdamW in the chosen implementation (foreach and for-loop give bitwise-equal updates). DTensor and
    plain parameters (e.g. tensor-parallel weights beside replicated ones) go in separate parameter
    groups, because one foreach call cannot mix them, and so do the parameters that
    optimizer.weight_decay_exempt takes out of the decay; the update of each parameter is unchanged."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in named_params:
        key = (isinstance(param, DTensor), not _exempt(name, param, optimizer.weight_decay_exempt))
        groups.setdefault(key, []).append(param)
    params = [
        {"params": members} | ({} if decays else {"weight_decay": 0.0})
        for (_, decays), members in sorted(groups.items())
    ]
    implementation = {
        "foreach": {"foreach": True},
        "for-loop": {"foreach": False},
        "fused": {"fused": True},
    }[optimizer.implementation]
    return torch.optim.AdamW(
        params if len(params) > 1 or not params or "weight_decay" in params[0] else params[0]["params"],
        lr=optimizer.lr,
        betas=tuple(optimizer.betas),
        eps=optimizer.eps,
        weight_decay=optimizer.weight_decay,
        **implementation,
    )


def _exempt(name: str, param: torch.nn.Parameter, kinds: list[str]) -> bool:
    """Whether `name` is one of the kinds of parameter optimizer.weight_decay_exempt names."""
    leaf = name.rsplit(".", 1)[-1]
    return (
        ("norms" in kinds and param.ndim == 1 and "norm" in name)
        or ("biases" in kinds and leaf == "bias")
        or ("embeddings" in kinds and name.startswith("tok_embeddings."))
    )


def lr_factor(step: int, total_steps: int, schedule: LRSchedulerConfig) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, a stable phase,
    then a decay to min_lr_factor over the last decay_ratio of the steps (all steps after warmup
    when decay_ratio is -1). With lr_scheduler.formula = torchtitan, torchtitan's own formulas."""
    if schedule.formula == "torchtitan":
        return torchtitan_lr_factor(step, total_steps, schedule)
    warmup = schedule.warmup_steps
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule.decay_ratio == -1.0:
        decay_start = warmup
    else:
        decay_start = max(warmup, total_steps - round(schedule.decay_ratio * total_steps))
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
    return _decayed(progress, schedule)


def torchtitan_lr_factor(step: int, total_steps: int, schedule: LRSchedulerConfig) -> float:
    """torchtitan's warmup-stable-decay multiplier, for runs that must follow a torchtitan job's lr step
    for step: the warmup rises as (k + 1) / warmup (lockstep's as (k + 1) / (warmup + 1), so it never
    starts at the full rate), and the decay runs over its steps plus one virtual step after the last,
    so the last step's lr stays above min_lr (lockstep reaches min_lr on the last step)."""
    warmup = min(schedule.warmup_steps, total_steps)
    decay = total_steps - warmup
    if schedule.decay_ratio != -1.0:
        decay = min(round(total_steps * schedule.decay_ratio), total_steps - warmup)
    stable_end = warmup + (total_steps + 1 - warmup - decay)
    if step < warmup:
        return (step + 1) / warmup
    if step < stable_end:
        return 1.0
    progress = (step + 1 - stable_end) / decay
    return _decayed(progress, schedule)


def _decayed(progress: float, schedule: LRSchedulerConfig) -> float:
    """The multiplier `progress` (0 to 1) into the decay: from 1 down to min_lr_factor, by decay_type."""
    remaining = {
        "linear": 1.0 - progress,
        "sqrt": 1.0 - math.sqrt(progress),
        "cosine": 0.5 * (1.0 + math.cos(math.pi * progress)),
    }[schedule.decay_type]
    return schedule.min_lr_factor + (1.0 - schedule.min_lr_factor) * remaining


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: LRSchedulerConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, schedule))


def optimizer_hyperparameters(optimizers: list[torch.optim.Optimizer]) -> list[list[dict[str, Any]]]:
    """Every param group's settings but its parameters, as built from the config (taken before a
    resume loads the checkpoint's param groups over them)."""
    return [[{k: v for k, v in group.items() if k != "params"} for group in o.param_groups] for o in optimizers]


def reset_optimizer_hyperparameters(
    optimizers: list[torch.optim.Optimizer], from_config: list[list[dict[str, Any]]]
) -> None:
    """After a resume, set every param-group setting the checkpoint carried (lr, betas, eps,
    weight_decay, the implementation: foreach/fused...) back to what the config built
    (`optimizer_hyperparameters` before the load); the lr itself is then set by the schedule
    (SchedulerState.apply). Unchanged values are rewritten as the same numbers."""
    for each, groups in zip(optimizers, from_config, strict=True):
        for group, settings in zip(each.param_groups, groups, strict=True):
            group.update(settings | {"initial_lr": settings.get("initial_lr", settings["lr"])})

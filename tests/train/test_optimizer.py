"""lr_scheduler.formula = torchtitan gives torchtitan's own learning rate at every step: checked against
the schedule function of the torchtitan release carried for the GPU acceptance run, read from its
wheel (torchtitan's package imports triton, so the function is taken out of its source, not imported)."""

import ast
import math
import zipfile
from pathlib import Path

import pytest
import torch

from lockstep.config.sections import LRSchedulerConfig
from lockstep.train.optimizer import lr_factor, optimizer_hyperparameters, reset_optimizer_hyperparameters

WHEEL = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_wheels" / "torchtitan-0.2.2-py3-none-any.whl"


def _torchtitan_schedule():
    """torchtitan's build_lr_schedulers, turned into (total, warmup, decay_ratio, type, min) -> lambda."""
    source = zipfile.ZipFile(WHEEL).read("torchtitan/components/lr_scheduler.py").decode()
    build = next(
        n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "build_lr_schedulers"
    )
    inner = next(n for n in build.body if isinstance(n, ast.FunctionDef))
    namespace = {"math": math}
    exec(compile(ast.Module([inner], []), "torchtitan_lr", "exec"), namespace)  # noqa: S102 - our own carried wheel

    def schedule(total: int, warmup: int, decay_ratio: float | None, decay_type: str, min_lr: float):
        warmup = min(warmup, total)
        decay = total - warmup if decay_ratio is None else min(round(total * decay_ratio), total - warmup)
        stable = total + 1 - warmup - decay
        return lambda step: namespace[inner.name](step, warmup, stable, decay, decay_type, min_lr)

    return schedule


@pytest.mark.parametrize(
    "total, warmup, decay_ratio, decay_type, min_lr",
    [(12, 2, None, "linear", 0.0), (30, 5, 0.2, "cosine", 0.1), (10, 0, None, "sqrt", 0.0), (7, 9, 0.5, "linear", 0.3)],
)
def test_the_torchtitan_formula_equals_torchtitans_schedule(total, warmup, decay_ratio, decay_type, min_lr):
    theirs = _torchtitan_schedule()(total, warmup, decay_ratio, decay_type, min_lr)
    ours = LRSchedulerConfig(
        warmup_steps=warmup, decay_ratio=-1.0 if decay_ratio is None else decay_ratio, decay_type=decay_type,
        min_lr_factor=min_lr, formula="torchtitan",
    )  # fmt: skip
    assert [lr_factor(k, total, ours) for k in range(total)] == [theirs(k) for k in range(total)]


def test_the_two_formulas_differ_where_the_issue_says():
    """lockstep's warmup is (k+1)/(w+1) and reaches min_lr on the last step; torchtitan's is (k+1)/w."""
    ours = LRSchedulerConfig(warmup_steps=2, min_lr_factor=0.0)
    titan = LRSchedulerConfig(warmup_steps=2, min_lr_factor=0.0, formula="torchtitan")
    assert [lr_factor(k, 6, ours) for k in range(2)] == [1 / 3, 2 / 3]
    assert [lr_factor(k, 6, titan) for k in range(2)] == [1 / 2, 1.0]
    assert lr_factor(5, 6, ours) == 0.0 and lr_factor(5, 6, titan) > 0.0


def test_weight_decay_exemptions_leave_norms_biases_and_embeddings_undecayed():
    """With no gradient, AdamW's update is the decay alone: exempted parameters keep their values, the
    others shrink; by default (torchtitan's) every parameter decays."""
    import torch
    from torch import nn

    from lockstep.config.sections import OptimizerConfig
    from lockstep.train.optimizer import build_optimizer

    def step(exempt):
        torch.manual_seed(0)
        model = nn.ModuleDict(
            {"tok_embeddings": nn.Embedding(5, 4), "attention_norm": nn.RMSNorm(4), "w": nn.Linear(4, 4)}
        )
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = build_optimizer(model.named_parameters(), OptimizerConfig(lr=0.1, weight_decay_exempt=exempt))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        return {n: torch.equal(p, before[n]) for n, p in model.named_parameters()}

    assert step([]) == dict.fromkeys(["tok_embeddings.weight", "attention_norm.weight", "w.weight", "w.bias"], False)
    assert step(["norms", "biases", "embeddings"]) == {
        "tok_embeddings.weight": True, "attention_norm.weight": True, "w.weight": False, "w.bias": True,
    }  # fmt: skip


def test_a_resume_keeps_the_configs_hyperparameters_not_the_checkpoints():
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    from_config = optimizer_hyperparameters([optimizer])
    assert "params" not in from_config[0][0] and from_config[0][0]["betas"] == (0.9, 0.95)
    optimizer.param_groups[0].update(lr=5.0, betas=(0.5, 0.5), weight_decay=0.0)  # as a checkpoint's load would
    reset_optimizer_hyperparameters([optimizer], from_config)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["initial_lr"]) == (1e-3, (0.9, 0.95), 0.1, 1e-3)
    assert group["params"] == [weight]

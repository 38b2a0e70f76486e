"""The non-finite guard: a run that stops names the first module with a NaN or Inf (its forward output or
its gradient), and too many skipped steps in a row stop the run."""

import math

import pytest
import torch
from torch import nn

from lockstep.errors import LockstepError
from lockstep.run.folder import read_metrics
from lockstep.train.guards.nonfinite import ConsecutiveSkips, NonFiniteError, first_nonfinite_module
from lockstep.train.trainer import Trainer
from tests.helpers import tiny_config


def _poison_from_step(trainer: Trainer, module: torch.nn.Module, step: int) -> None:
    """Make `module` output NaN from the given step on (whatever the hooks replay)."""

    def hook(mod, args, output):
        return output * float("nan") if trainer.state.step + 1 >= step else output

    module.register_forward_hook(hook)


def test_nonfinite_guard_stops_and_names_the_module(tmp_path):
    trainer = Trainer(tiny_config(tmp_path), show_progress=False)
    _poison_from_step(trainer, trainer.model.parts[0].layers["1"].feed_forward, 3)
    with pytest.raises(
        NonFiniteError, match=r"at step 3; first non-finite value: layers\.1\.feed_forward \(FeedForward"
    ):
        trainer.train()
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2]


def test_nonfinite_guard_can_skip_the_update(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "--debug.nonfinite", "skip"), show_progress=False)
    block = trainer.model.parts[0].layers["0"]
    _poison_from_step(trainer, block.attention, 5)
    trainer.train()
    records = read_metrics(tmp_path / "run")
    assert [m["step"] for m in records] == [1, 2, 3, 4, 5, 6]
    assert all(m["loss"] != m["loss"] for m in records[4:])  # NaN logged
    assert all(torch.isfinite(p).all() for p in trainer.model.parts[0].parameters())  # no NaN update


def test_consecutive_skips_stop_at_the_limit_naming_the_steps_and_a_finite_step_restarts_the_count():
    skips = ConsecutiveSkips(3)
    skips.skipped(5, "a")
    skips.skipped(6, "b")
    skips.finite()
    skips.skipped(7, "c")
    skips.skipped(8, "d")
    with pytest.raises(NonFiniteError, match=r"^steps 7-9 were all non-finite .*= 3\); last one: e;"):
        skips.skipped(9, "e")


def test_a_limit_of_one_stops_at_the_first_skip_and_the_error_is_a_user_error():
    with pytest.raises(NonFiniteError, match=r"^step 4 was non-finite") as raised:
        ConsecutiveSkips(1).skipped(4, "x")
    assert isinstance(raised.value, LockstepError) and isinstance(raised.value, RuntimeError)


class Times(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class Sqrt(nn.Module):
    def forward(self, x):
        return x.sqrt()


def _replay(model: nn.Module):
    def replay() -> None:
        model(torch.ones(2, 3)).sum().backward()

    return replay


def test_the_first_module_in_execution_order_with_a_non_finite_output_is_named():
    model = nn.Sequential(nn.Linear(3, 3), Times(1.0), Times(math.inf), Times(math.nan), nn.Linear(3, 1))
    assert first_nonfinite_module(model, _replay(model)) == "2 (Times, forward output)"


def test_a_non_finite_gradient_is_named_when_every_output_is_finite():
    """sqrt(0) is finite, its gradient is not: the gradient flowing into the zero-output Linear is inf."""
    model = nn.Sequential(nn.Linear(3, 3), Sqrt(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    assert first_nonfinite_module(model, _replay(model)) == "0 (Linear, gradient)"


def test_a_finite_step_names_nothing_and_every_hook_is_removed_even_when_the_replay_fails():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    assert first_nonfinite_module(model, _replay(model)) is None

    def failing() -> None:
        raise RuntimeError("replay failed")

    with pytest.raises(RuntimeError, match="replay failed"):
        first_nonfinite_module(model, failing)
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())

"""TrainStep on its own, with no Trainer: a gradient source hands it the step's gradients and it clips,
steps the optimizer and the schedule, drops an update its guards refuse, and does nothing to the
parameters for a step that was not committed (fault tolerance redoes it)."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lockstep.config.sections import DebugConfig
from lockstep.train.guards.step_guards import StepGuards
from lockstep.train.observe.step_metrics import StepMetrics
from lockstep.train.step import Gradients, TrainStep


class FixedGradients:
    """A gradient source that puts `grad` on every parameter (None: the step is not committed)."""

    def __init__(self, params, grad: float | None, loss: float = 2.0):
        self.params, self.grad, self.loss, self.steps = params, grad, loss, []

    def gradients(self, step: int) -> Gradients | None:
        self.steps.append(step)
        if self.grad is None:
            return None
        for p in self.params:
            p.grad = torch.full_like(p, self.grad)
        return Gradients(torch.tensor(self.loss), [], 0, samples=4)


def _step(tmp_path, grad, *, max_norm=0.0, nonfinite="stop", loss=2.0):
    torch.manual_seed(0)
    part = nn.Module()
    part.layers = nn.ModuleDict({"0": nn.Linear(3, 2)})  # a decoder's shape: blocks under .layers
    layer = part.layers["0"]
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    source = FixedGradients(list(layer.parameters()), grad, loss)
    model = SimpleNamespace(parts=[part], param_names=[n for n, _ in part.named_parameters()], pipeline=None, args=None)
    step = TrainStep(
        source,
        model=model, forward_backward=SimpleNamespace(run=lambda *_: layer(torch.full((1, 3), math.nan)).sum().backward()),
        reducer=SimpleNamespace(pp_group=None, dp_group=None),
        optimizers=[optimizer], lr_schedulers=[scheduler],
        guards=StepGuards(DebugConfig(nonfinite=nonfinite), loss_window=[], run_folder=tmp_path, writes=False, log=print),
        step_metrics=StepMetrics(torch.device("cpu")), loader=SimpleNamespace(step_start=0), place=None,
        max_norm=max_norm, fingerprint_outputs=True, device=torch.device("cpu"), sample_losses_available=False,
    )  # fmt: skip
    return step, layer, source, scheduler


def test_a_step_clips_updates_and_moves_the_schedule(tmp_path):
    step, layer, source, scheduler = _step(tmp_path, grad=1.0, max_norm=0.5)
    before = layer.weight.detach().clone()
    result = step.run(7)
    count = sum(p.numel() for p in layer.parameters())
    assert source.steps == [7] and result.committed and result.samples == 4
    assert result.loss_value == 2.0 and result.grad_norm_value == pytest.approx(math.sqrt(count))
    clipped = 0.5 / math.sqrt(count)  # each gradient element after clipping to norm 0.5
    torch.testing.assert_close(layer.weight.detach(), before - 0.5 * clipped)
    assert scheduler.last_epoch == 1 and all(p.grad is None for p in layer.parameters())


def test_an_uncommitted_step_changes_nothing(tmp_path):
    step, layer, source, scheduler = _step(tmp_path, grad=None)
    before = layer.weight.detach().clone()
    result = step.run(3, stop_requested=True)
    assert not result.committed and result.stop
    assert torch.equal(layer.weight, before) and scheduler.last_epoch == 0


def test_a_nonfinite_step_is_dropped_or_stops_the_run(tmp_path):
    step, layer, _, scheduler = _step(tmp_path / "skip", grad=float("nan"), nonfinite="skip")
    before = layer.weight.detach().clone()
    step.run(1)
    assert torch.equal(layer.weight, before) and scheduler.last_epoch == 0
    assert all(p.grad is None for p in layer.parameters())
    step, *_ = _step(tmp_path / "stop", grad=float("nan"))
    with pytest.raises(Exception, match="non-finite loss .* at step 2; first non-finite value: .*layers.0"):
        step.run(2)


def test_fingerprints_of_gradients_and_parameters_are_reported(tmp_path):
    step, *_ = _step(tmp_path, grad=1.0)
    result = step.run(1, fingerprint=True)
    assert {"grad_fingerprint", "param_fingerprint"} <= set(result.fingerprints)
    assert result.local_digests["outputs"] is not None

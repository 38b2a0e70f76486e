"""StepGuards alone: whether a step's update is dropped, from its loss and grad norm (debug.nonfinite)
and from a loss spike (debug.spike_window), with the replay and the per-sample losses asked for only
when they are needed."""

import json
import math

import pytest

from lockstep.config.sections import DebugConfig
from lockstep.train.guards.nonfinite import NonFiniteError
from lockstep.train.guards.step_guards import StepGuards
from lockstep.train.observe.sample_losses import SampleLosses


class Calls:
    """The guard's callbacks, counting their calls."""

    def __init__(self, where: str = "layers.0 (Linear, forward output)") -> None:
        self.where, self.located, self.sampled, self.logged = where, 0, 0, []

    def locate(self) -> str:
        self.located += 1
        return self.where

    def sample_losses(self) -> SampleLosses:
        self.sampled += 1
        return SampleLosses([10, 11], [4.0, 40.0], [2, 2])


def _guards(tmp_path, calls: Calls, window: list[float] | None = None, **debug) -> StepGuards:
    return StepGuards(
        DebugConfig(**debug), loss_window=[] if window is None else window, run_folder=tmp_path, writes=True,
        log=calls.logged.append,
    )  # fmt: skip


def _skip(guards: StepGuards, calls: Calls, step: int, loss: float, grad_norm: float = 1.0) -> bool:
    return guards.skip(step, loss, grad_norm, [10, 11], calls.locate, calls.sample_losses)


@pytest.mark.parametrize("nonfinite", ["stop", "skip", "ignore"])
def test_a_finite_step_is_kept_without_replaying_it(tmp_path, nonfinite):
    calls = Calls()
    assert not _skip(_guards(tmp_path, calls, nonfinite=nonfinite), calls, 1, 2.0)
    assert calls.located == 0 and calls.sampled == 0 and calls.logged == []


def test_ignore_keeps_a_non_finite_step_without_replaying_it(tmp_path):
    calls = Calls()
    assert not _skip(_guards(tmp_path, calls, nonfinite="ignore"), calls, 1, math.nan, math.inf)
    assert calls.located == 0


@pytest.mark.parametrize(("loss", "grad_norm"), [(math.nan, 1.0), (2.0, math.inf)])
def test_stop_raises_one_line_naming_the_step_and_the_first_non_finite_value(tmp_path, loss, grad_norm):
    calls = Calls(where="  layers.1 (Block, forward output)\n\n  from attention  \n")  # a multi-line location
    with pytest.raises(NonFiniteError) as raised:
        _skip(_guards(tmp_path, calls), calls, 3, loss, grad_norm)
    message = str(raised.value)
    assert "\n" not in message and calls.located == 1
    assert "at step 3; first non-finite value: layers.1 (Block, forward output) | from attention" in message


def test_skip_drops_non_finite_steps_until_too_many_come_in_a_row(tmp_path):
    calls = Calls()
    guards = _guards(tmp_path, calls, nonfinite="skip", max_consecutive_skips=2)
    assert _skip(guards, calls, 1, math.nan)
    assert not _skip(guards, calls, 2, 2.0)  # a finite step restarts the count
    assert _skip(guards, calls, 3, math.nan)
    assert len(calls.logged) == 2 and all(line.endswith("; step skipped") for line in calls.logged)
    with pytest.raises(NonFiniteError, match=r"steps 3-4 were all non-finite"):
        _skip(guards, calls, 4, math.inf)


def _spiking_guards(tmp_path, calls, action: str, **debug) -> tuple[StepGuards, list[float]]:
    window = [2.0, 2.1, 1.9, 2.0]  # the train state's list: a full window of ordinary losses
    guards = _guards(tmp_path, calls, window, spike_window=4, spike_action=action, **debug)
    return guards, window


@pytest.mark.parametrize(("action", "dropped"), [("log", False), ("skip", True)])
def test_a_spike_is_recorded_with_its_sample_losses_and_dropped_only_under_skip(tmp_path, action, dropped):
    calls = Calls()
    guards, window = _spiking_guards(tmp_path, calls, action)
    assert not _skip(guards, calls, 5, 2.05) and calls.sampled == 0  # ordinary: joins the shared window
    assert window[-1] == 2.05
    assert _skip(guards, calls, 6, 50.0) is dropped
    assert calls.sampled == 1 and window[-1] == 2.05  # the spike stays out of the window
    (entry,) = [json.loads(line) for line in (tmp_path / "spikes.jsonl").read_text().splitlines()]
    assert entry["step"] == 6 and entry["samples"] == [10, 11] and entry["sample_losses"] == [2.0, 20.0]
    assert entry["action"] == action
    assert calls.logged[-1].startswith("warning: loss spike at step 6: 50.0000")
    assert calls.logged[-1].endswith("step skipped" if dropped else "training on")


def test_spikes_in_a_row_under_skip_are_a_level_shift_that_stops_the_run(tmp_path):
    calls = Calls()
    guards, _ = _spiking_guards(tmp_path, calls, "skip", max_consecutive_skips=2)
    assert _skip(guards, calls, 5, 50.0)
    with pytest.raises(NonFiniteError, match=r"steps 5-6 were all loss spikes and skipped"):
        _skip(guards, calls, 6, 50.0)


def test_without_a_spike_window_a_jump_in_the_loss_is_kept(tmp_path):
    calls = Calls()
    guards = _guards(tmp_path, calls, [2.0] * 4)
    assert guards.spikes is None and not _skip(guards, calls, 5, 1e6) and calls.sampled == 0

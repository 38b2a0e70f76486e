"""RunCheckpoints without a trainer and without writing checkpoints: a fake manager stands for
lockstep.checkpoint's, and the tests check what the launch asks of it: when a step is saved (once, and
what it holds), and how a launch starts (resume, initial weights, or fresh weights)."""

import contextlib

import pytest
import torch
from torch import nn

from lockstep.checkpoint.states import ModelState
from lockstep.config.sections import CheckpointConfig
from lockstep.train import checkpointing
from lockstep.train.checkpointing import RunCheckpoints


class FakeManager:
    """What RunCheckpoints calls on CheckpointManager, recorded."""

    def __init__(self, config, *, dump_folder, identity, device, log) -> None:
        self.calls: list = []
        self.due: set[int] = set()
        self.resumable: str | None = None
        self.loaded_parts: set[str] = set()
        self.identity, self.root, self.saving = identity, dump_folder / "checkpoint", False

    def poll(self) -> None:
        self.calls.append("poll")

    def should_save(self, step, last_step, stopping) -> bool:
        return step in self.due

    def save(self, step, states, *, model_only) -> None:
        self.calls.append(("save", step, model_only, states))

    def close(self) -> None:
        self.calls.append("close")

    def resume(self, states, *, accept):
        self.calls.append("resume")
        if self.resumable is None:
            return None
        # a checkpoint's optimizer param groups load over those the config built
        states["optimizer"].param_groups[0]["lr"] = 123.0
        return self.resumable


class Schedule:
    def __init__(self) -> None:
        self.applied = 0

    def apply(self) -> None:
        self.applied += 1


@pytest.fixture
def fake_manager(monkeypatch):
    monkeypatch.setattr(checkpointing, "CheckpointManager", FakeManager)


def _checkpoints(tmp_path, around_save=contextlib.nullcontext, **config) -> RunCheckpoints:
    layer = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    states = {"model": "model state", "optimizer": optimizer, "lr_scheduler": Schedule()}
    return RunCheckpoints(
        CheckpointConfig(enable=True, **config), run_folder=tmp_path, identity={"config": {}}, states=states,
        device=torch.device("cpu"), log=print, around_save=around_save,
    )  # fmt: skip


def _saves(checkpoints: RunCheckpoints) -> list[tuple]:
    return [call[:3] for call in checkpoints.manager.calls if call[0] == "save"]


def test_a_due_step_is_saved_once_even_when_it_is_redone(tmp_path, fake_manager):
    """Fault tolerance can run a step again: its checkpoint is not written twice."""
    checkpoints = _checkpoints(tmp_path)
    checkpoints.manager.due = {2}
    for step in (1, 2, 2):
        checkpoints.save_if_due(step, last_step=4, stopping=False, parts=[])
    assert _saves(checkpoints) == [("save", 2, False)] and checkpoints.saved_step == 2
    assert checkpoints.manager.calls.count("poll") == 3  # an async save is polled at every step


@pytest.mark.parametrize(
    ("config", "step", "model_only"),
    [
        ({}, 4, False),
        ({"model_only": True}, 2, True),
        ({"last_save_model_only": True}, 2, False),  # not the last step: everything
        ({"last_save_model_only": True}, 4, True),
    ],
)
def test_what_a_save_holds(tmp_path, fake_manager, config, step, model_only):
    checkpoints = _checkpoints(tmp_path, **config)
    checkpoints.manager.due = {step}
    checkpoints.save_if_due(step, last_step=4, stopping=False, parts=[])
    assert _saves(checkpoints) == [("save", step, model_only)]


@pytest.mark.parametrize("model_only", [True, False])
def test_a_bf16_export_saves_bf16_weights_only_in_a_model_only_checkpoint(tmp_path, fake_manager, model_only):
    """A full checkpoint keeps fp32 weights for an exact resume; the export dtype is for model-only saves."""
    checkpoints = _checkpoints(tmp_path, export_dtype="bf16", model_only=model_only)
    checkpoints.manager.due = {1}
    checkpoints.save_if_due(1, last_step=4, stopping=False, parts=[nn.Linear(2, 2)])
    (states,) = [call[3] for call in checkpoints.manager.calls if call[0] == "save"]
    if model_only:
        assert isinstance(states["model"], ModelState) and checkpoints.states["model"] == "model state"
    else:
        assert states["model"] == "model state"


def test_each_save_runs_inside_around_save(tmp_path, fake_manager):
    events = []

    @contextlib.contextmanager
    def around():
        events.append("enter")
        yield
        events.append(("exit", len(_saves(checkpoints))))

    checkpoints = _checkpoints(tmp_path, around_save=around)
    checkpoints.manager.due = {3}
    checkpoints.save_if_due(2, last_step=4, stopping=False, parts=[])
    assert events == []  # not due: nothing entered
    checkpoints.save_if_due(3, last_step=4, stopping=False, parts=[])
    assert events == ["enter", ("exit", 1)]


def test_a_fresh_launch_fills_the_weights_and_loads_initial_weights_if_configured(tmp_path, fake_manager, monkeypatch):
    loaded = []
    monkeypatch.setattr(checkpointing, "load_initial", lambda path, **parts: loaded.append(path))
    filled = []
    checkpoints = _checkpoints(tmp_path, initial_load_path=str(tmp_path / "weights"))
    optimizer = checkpoints.states["optimizer"]
    assert checkpoints.start([optimizer], None, None, [], lambda: filled.append(1)) is False
    assert filled == [1] and loaded == [tmp_path / "weights"] and checkpoints.resumed_from is None
    assert checkpoints.states["lr_scheduler"].applied == 0


def test_a_resume_keeps_the_configs_optimizer_settings_and_skips_filling_loaded_weights(tmp_path, fake_manager):
    checkpoints = _checkpoints(tmp_path)
    checkpoints.manager.resumable = tmp_path / "checkpoint" / "step-2"
    checkpoints.manager.loaded_parts = {"model", "optimizer"}
    optimizer = checkpoints.states["optimizer"]
    filled = []
    assert checkpoints.start([optimizer], None, None, [], lambda: filled.append(1)) is True
    assert filled == []  # the checkpoint's weights overwrite them: not drawn for nothing
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the config's, not the 123.0 the checkpoint carried
    assert checkpoints.states["lr_scheduler"].applied == 1  # then the schedule sets the lr
    assert checkpoints.resumed_from == tmp_path / "checkpoint" / "step-2"


def test_a_resume_that_loaded_no_model_still_fills_the_weights(tmp_path, fake_manager):
    checkpoints = _checkpoints(tmp_path)
    checkpoints.manager.resumable = tmp_path / "checkpoint" / "step-2"
    checkpoints.manager.loaded_parts = {"optimizer"}  # e.g. checkpoint.exclude_from_loading = ["model"]
    filled = []
    checkpoints.start([checkpoints.states["optimizer"]], None, None, [], lambda: filled.append(1))
    assert filled == [1]


def test_a_seed_checkpoint_is_the_model_alone_at_step_0_published_before_returning(tmp_path, fake_manager):
    checkpoints = _checkpoints(tmp_path)
    assert checkpoints.save_seed() == tmp_path / "checkpoint"
    assert [c if isinstance(c, str) else c[:3] for c in checkpoints.manager.calls] == [("save", 0, True), "close"]

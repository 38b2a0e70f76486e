"""The non-finite guard."""

import pytest
import torch

from lockstep.run.folder import read_metrics
from lockstep.train.guards.nonfinite import NonFiniteError
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

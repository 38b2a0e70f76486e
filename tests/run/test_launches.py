"""Every launch keeps its own config and environment; a resumed run trains at what its config says."""

import json
import shutil

import pytest
import tomllib
import torch

from lockstep.checkpoint import folders
from lockstep.checkpoint.manager import CheckpointManager, CheckpointMismatch
from lockstep.cli import main
from lockstep.config.sections import CheckpointConfig
from lockstep.run.folder import read_metrics
from lockstep.run.resume import changes_the_numbers
from lockstep.train.optimizer import lr_factor
from lockstep.train.trainer import Trainer
from tests.helpers import tiny_config, tiny_overrides

SAVING = ["--checkpoint.enable", "--checkpoint.interval", "2", "--training.steps", "4"]


def launch(run, number: int) -> dict:
    return json.loads((run / "launches" / f"{number:03d}" / "launch.json").read_text())


def train(folder, *overrides: str) -> Trainer:
    with Trainer(tiny_config(folder, *overrides), show_progress=False) as trainer:
        trainer.train()
    return trainer


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A run saved at step 4 of 4, copied by each test that resumes it."""
    folder = tmp_path_factory.mktemp("four_steps")
    train(folder, *SAVING)
    return folder


def test_rerun_into_an_old_folder_keeps_every_launch(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('[job]\ndescription = "before launches/ existed"\n')
    (run / "env.json").write_text('{"world_size": 1}\n')
    train(tmp_path, "--training.steps", "2")
    train(tmp_path, "--training.steps", "1")
    assert (run / "launches" / "001" / "config.toml").read_text().endswith('"before launches/ existed"\n')
    assert json.loads((run / "launches" / "001" / "env.json").read_text()) == {"world_size": 1}
    for number, steps in ((2, 2), (3, 1)):
        folder = run / "launches" / f"{number:03d}"
        assert tomllib.loads((folder / "config.toml").read_text())["training"]["steps"] == steps
        assert json.loads((folder / "env.json").read_text())["world_size"] == 1
        assert launch(run, number)["start_step"] == 0 and launch(run, number)["end_step"] == steps
    assert launch(run, 3)["changed_since_previous_launch"] == {"training.steps": [2, 1]}
    assert (run / "config.toml").read_text() == (run / "launches" / "003" / "config.toml").read_text()


def test_resume_with_more_steps_follows_the_new_schedule(tmp_path, four_steps):
    shutil.copytree(four_steps, tmp_path, dirs_exist_ok=True)
    config = tiny_config(tmp_path, *SAVING, "--training.steps", "6")
    trainer = train(tmp_path, *SAVING, "--training.steps", "6", "--debug.seed", "none")
    assert trainer.config.debug.seed == 7  # no seed given: the resumed run's, not a fresh draw
    run = tmp_path / "run"
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert (launch(run, 1)["start_step"], launch(run, 1)["end_step"]) == (0, 4)
    record = launch(run, 2)
    assert (record["start_step"], record["end_step"], record["completed"]) == (4, 6, True)
    changed = record["changed_since_previous_launch"]
    assert changed.pop("job.dump_folder")[1] == str(run)  # the run was copied
    assert changed == {"training.steps": [4, 6]}
    expected = [config.optimizer.lr * lr_factor(s - 1, 6, config.lr_scheduler) for s in (5, 6)]
    assert [m["lr"] for m in read_metrics(run)[4:]] == expected


def test_changed_lr_is_refused_then_takes_effect_when_allowed(tmp_path, four_steps, capsys):
    shutil.copytree(four_steps, tmp_path, dirs_exist_ok=True)
    changed = ["--training.steps", "6", "--optimizer.lr", "0.0123", "--optimizer.weight_decay", "0.05"]
    changed += ["--optimizer.implementation", "for-loop"]
    assert main(["train", "--config", "llama3_debug", *tiny_overrides(tmp_path), *SAVING, *changed]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "optimizer.lr: 0.003 -> 0.0123; optimizer.weight_decay: 0.1 -> 0.05;" in error[0]
    assert "training.steps" not in error[0] and "checkpoint.allow_config_change" in error[0]
    assert not (tmp_path / "run" / "launches" / "002").exists()

    config = tiny_config(tmp_path, *SAVING, *changed, "--checkpoint.allow_config_change")
    with Trainer(config, show_progress=False) as trainer:
        group = trainer.optimizers[0].param_groups[0]
        assert (group["initial_lr"], group["weight_decay"], group["foreach"]) == (0.0123, 0.05, False)
        assert group["lr"] == 0.0123 * lr_factor(4, 6, config.lr_scheduler)
        trainer.train()
    assert [m["lr"] for m in read_metrics(tmp_path / "run")[4:]] == [
        0.0123 * lr_factor(s, 6, config.lr_scheduler) for s in (4, 5)
    ]
    assert launch(tmp_path / "run", 2)["changed_since_previous_launch"]["optimizer.lr"] == [0.003, 0.0123]


def test_identity_mismatch_names_only_the_differing_keys(tmp_path):
    identity = {"model": {"name": "llama3", "args": {"dim": 128, "n_layers": 2}}, "layout": {"dp_shard": 1}}
    checkpoint = tmp_path / "step-00000004"
    checkpoint.mkdir()
    manifest = {
        "step": 4,
        "files": {},
        "model": {"name": "llama3", "args": {"dim": 64, "n_layers": 2}},
        "layout": {"dp_shard": 2},
    }
    (checkpoint / folders.MANIFEST).write_text(json.dumps(manifest))
    manager = CheckpointManager(CheckpointConfig(), dump_folder=tmp_path, identity=identity, device=torch.device("cpu"))
    with pytest.raises(CheckpointMismatch, match=r"\(checkpoint -> this run: model\.args\.dim: 64 -> 128\)\. Use"):
        manager.check_identity(checkpoint)


def test_the_attention_kernel_is_recorded_not_refused():
    """Like the device: a run from before model.attention = auto (recorded sdpa) resumes under auto."""
    assert not changes_the_numbers("model.attention")
    assert changes_the_numbers("model.flavor")

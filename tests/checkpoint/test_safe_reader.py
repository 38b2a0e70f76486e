"""Loading a checkpoint never runs code from it: not the metadata, not any non-tensor item, not on
resume, initial_load_path, convert or replay; a crafted checkpoint is refused by name and resume
falls back to the next older one."""

import os
import pickle

import pytest
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from lockstep.checkpoint import folders
from lockstep.checkpoint.errors import CheckpointError
from lockstep.checkpoint.hf import export_to_hf
from lockstep.checkpoint.safe_reader import SafeFileSystemReader, SafeLoadPlanner, load_metadata_safely
from lockstep.train.trainer import Trainer
from tests.checkpoint.conftest import EIGHT
from tests.checkpoint.crafting import plant_payload
from tests.checkpoint.helpers import CHECKPOINTED
from tests.helpers import tiny_config, tiny_overrides

ITEMS = [
    "train_state.step",
    "dataloader.next_sample_index",
    "rng.pipeline_rank_0.python.state",
    "lr_scheduler.last_epoch",
    "optimizer.param_groups.output.weight.lr",
]


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_metadata_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        load_metadata_safely(pickle.dumps(_Payload()))
    assert not (tmp_path / "pwned").exists()


def test_metadata_cannot_reach_callables_through_allowed_modules():
    """Pickle resolves dotted names by attribute walk: ``filesystem`` + ``os.system`` is os.system."""
    raw = (
        b"\x80\x04\x95" + b"\x00" * 8 + b"\x8c'torch.distributed.checkpoint.filesystem\x94\x8c\tos.system\x94\x93\x94."
    )
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        load_metadata_safely(raw)
    with pytest.raises(pickle.UnpicklingError, match="_load_from_bytes"):
        load_metadata_safely(b"\x80\x04\x8c\rtorch.storage\x8c\x10_load_from_bytes\x93.")


def test_real_metadata_is_readable(trained):
    folder = folders.step_folder(trained / "run" / "checkpoint", 4)
    keys = SafeFileSystemReader(str(folder)).read_metadata().state_dict_metadata
    assert "model.output.weight" in keys
    assert any(k.startswith("optimizer.state.output.weight.exp_avg") for k in keys)
    assert any(k.startswith("rng.pipeline_rank_0.torch_cpu") for k in keys)


@pytest.mark.parametrize("item", ITEMS)
def test_a_payload_in_any_item_is_refused_by_name(run, item):
    folder = folders.step_folder(run / "run" / "checkpoint", 8)
    marker = run / "pwned"
    data_file = plant_payload(folder, item, marker)
    problem = folders.problem_with(folder)
    assert data_file in problem and item in problem and "posix.system" in problem
    reader = SafeFileSystemReader(str(folder))
    state = {item: None}  # DCP fills BYTE_IO items in place
    with pytest.raises(dcp.api.CheckpointException) as failure:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    (error, _), *_ = failure.value.failures.values()
    assert isinstance(error, CheckpointError) and str(folder) in str(error) and item in str(error)
    assert "\n" not in str(error)
    with pytest.raises(dcp.api.CheckpointException, match="SafeLoadPlanner"):
        dcp.load(state, storage_reader=reader, planner=DefaultLoadPlanner(), no_dist=True)
    assert not marker.exists()


def test_resume_skips_a_crafted_checkpoint_for_the_older_one(run, capsys):
    root = run / "run" / "checkpoint"
    marker = run / "pwned"
    plant_payload(folders.step_folder(root, 8), "train_state.step", marker)
    with Trainer(tiny_config(run, *CHECKPOINTED, *EIGHT), show_progress=False) as trainer:
        assert trainer.state.step == 4
    out = capsys.readouterr().out
    assert "skipping damaged checkpoint" in out and "train_state.step" in out and "posix.system" in out
    assert (root / "step-00000008.unloadable").is_dir()  # set aside, not deleted or overwritten
    with pytest.raises(CheckpointError, match="train_state.step"):
        Trainer(tiny_config(run, *CHECKPOINTED, *EIGHT, "--checkpoint.folder", "elsewhere",
                            "--checkpoint.initial_load_path", str(root / "step-00000008.unloadable")))  # fmt: skip
    assert not marker.exists()


def test_cli_resume_into_a_crafted_only_checkpoint_is_one_line(tmp_path, capsys):
    """`lockstep train` run again on its own folder, whose only checkpoint now carries a payload."""
    from lockstep.cli import main

    argv = ["train", "--config", "llama3_debug", *tiny_overrides(tmp_path), *CHECKPOINTED, "--training.steps", "4"]
    assert main(argv) == 0
    marker = tmp_path / "pwned"
    data_file = plant_payload(folders.step_folder(tmp_path / "run" / "checkpoint", 4), "train_state.step", marker)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("lockstep train: error: ")
    assert data_file in err and "train_state.step" in err
    assert not marker.exists()


def test_initial_load_path_convert_and_replay_refuse_a_crafted_checkpoint(run, tmp_path):
    from lockstep.tools.replay import main as replay

    root = run / "run" / "checkpoint"
    marker = tmp_path / "pwned"
    for step in (4, 8):
        plant_payload(folders.step_folder(root, step), "optimizer.param_groups.output.weight.lr", marker)
    other = tmp_path / "other"
    with pytest.raises(CheckpointError, match="optimizer.param_groups"):
        Trainer(tiny_config(other, *CHECKPOINTED, "--checkpoint.initial_load_path", str(folders.step_folder(root, 8))))
    with pytest.raises(CheckpointError, match="optimizer.param_groups"):
        export_to_hf(folders.step_folder(root, 8), tmp_path / "hf")
    with pytest.raises(CheckpointError, match="optimizer.param_groups"):
        replay(["--replay-run", str(run / "run"), "--replay-step", "6", "--replay-out", str(tmp_path / "cap")])
    assert not marker.exists()


def test_a_pickle_at_a_tensor_item_is_set_aside_for_the_older_checkpoint(run, capsys):
    """The pre-check unpickles the small non-tensor items; a tensor item is read during the load itself,
    by the weights-only loader, which refuses the payload. That refusal (checksums recomputed, so no
    mismatch explains it) sets the step aside like a damaged one, in one line, and the resume falls back."""
    root = run / "run" / "checkpoint"
    marker = run / "pwned"
    metadata = SafeFileSystemReader(str(folders.step_folder(root, 8))).read_metadata()
    tensor_item = next(k for k in metadata.state_dict_metadata if k.startswith("model.") and k.endswith("weight"))
    plant_payload(folders.step_folder(root, 8), tensor_item, marker)
    with Trainer(tiny_config(run, *CHECKPOINTED, *EIGHT), show_progress=False) as trainer:
        assert trainer.state.step == 4
    out = capsys.readouterr().out
    assert "does not load safely" in out and "UnpicklingError" in out
    assert (root / "step-00000008.unloadable").is_dir()
    assert not marker.exists()

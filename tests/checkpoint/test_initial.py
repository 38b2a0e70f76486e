"""checkpoint.initial_load_path with initial_load_model_only = false: a lockstep checkpoint of another run
gives the model, the optimizer, the schedule and the step, and the run goes on from that step in its own
data order, as if it had trained those steps itself (bitwise here: the same seed and config). What holds no
training state (a Hugging Face folder, a model-only save) is refused in one line."""

import json

import pytest

from lockstep.checkpoint import folders
from lockstep.checkpoint.errors import CheckpointError, CheckpointMismatch
from lockstep.train.trainer import Trainer
from tests.checkpoint.helpers import CHECKPOINTED, EIGHT, result, train
from tests.helpers import tiny_config


def test_another_runs_checkpoint_goes_on_from_its_step_as_the_run_itself_did(tmp_path, trained):
    step_4 = folders.step_folder(trained / "run" / "checkpoint", 4)
    train(
        tmp_path,
        [*EIGHT, "--checkpoint.initial_load_path", str(step_4), "--checkpoint.initial_load_model_only", "false"],
    )
    (metrics, weights), (reference, reference_weights) = result(tmp_path), result(trained)
    assert [m[0] for m in metrics] == [5, 6, 7, 8]
    assert metrics == reference[4:]
    assert all((weights[k] == reference_weights[k]).all() for k in reference_weights)


def test_what_holds_no_training_state_is_refused_when_training_state_is_asked_for(tmp_path):
    train(tmp_path / "short", ["--training.steps", "4", "--checkpoint.last_save_model_only"])
    model_only = folders.step_folder(tmp_path / "short" / "run" / "checkpoint", 4)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (hf / "model.safetensors").write_bytes(b"")
    for path, error, match in (
        (model_only, CheckpointMismatch, "holds the model only: set checkpoint.initial_load_model_only = true"),
        (hf, CheckpointError, "is a Hugging Face folder, which holds weights only"),
    ):
        config = tiny_config(tmp_path / "b", *CHECKPOINTED, "--checkpoint.initial_load_path", str(path),
                             "--checkpoint.initial_load_model_only", "false")  # fmt: skip
        with pytest.raises(error, match=match), Trainer(config, show_progress=False):
            pass

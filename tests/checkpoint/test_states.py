"""A tied model (qwen3 debug, and the tiny llama3 tied as Llama 3.2 is: the output projection is the
embedding matrix) in checkpoints: one tensor, saved as tok_embeddings.weight, and a run stopped under
FSDP 2 resumes in one process bitwise."""

import json

import pytest

from lockstep.checkpoint import folders
from lockstep.checkpoint.errors import CheckpointMismatch
from lockstep.checkpoint.safe_reader import SafeFileSystemReader
from lockstep.train.trainer import Trainer
from tests.checkpoint.helpers import assert_bitwise, result, train
from tests.distributed import run_on_ranks
from tests.helpers import tiny_config

QWEN3 = ["--model.name", "qwen3", "--model.flavor", "debug", "--training.steps", "8"]
LLAMA3 = ["--model.overrides.tie_embeddings", "true", "--training.steps", "8"]


@pytest.mark.parametrize("model", [QWEN3, LLAMA3], ids=["qwen3", "llama3"])
def test_tied_embeddings_are_saved_once_and_resume_bitwise_across_layouts(tmp_path, model):
    (tmp_path / "whole").mkdir()
    train(tmp_path / "whole", model)
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    run_on_ranks(train, 2, stopped, model, 4, "first")  # FSDP 2, stopped (and saved) after step 4 or so
    step, folder = folders.published_steps(stopped / "run" / "checkpoint")[-1]
    assert 4 <= step < 8
    keys = SafeFileSystemReader(str(folder)).read_metadata().state_dict_metadata
    assert "model.tok_embeddings.weight" in keys and "model.output.weight" not in keys
    train(stopped, model)  # one process from here
    got = result(stopped)
    assert "output.weight" not in got[1]
    assert_bitwise(got, result(tmp_path / "whole"))


def test_a_llama3_checkpoint_from_before_tie_embeddings_resumes_and_loads(tmp_path):
    """Its manifest records no tie_embeddings: the model was built untied, the default, so a run that
    keeps the default resumes it and takes it as initial weights; a tied run is refused."""
    with Trainer(tiny_config(tmp_path, "--training.steps", "2", "--checkpoint.enable"), show_progress=False) as trainer:
        trainer.train()
    step = folders.published_steps(tmp_path / "run" / "checkpoint")[-1][1]
    manifest = json.loads((step / folders.MANIFEST).read_text())
    del manifest["model"]["args"]["tie_embeddings"]
    (step / folders.MANIFEST).write_text(json.dumps(manifest))
    with Trainer(tiny_config(tmp_path, "--training.steps", "3", "--checkpoint.enable"), show_progress=False) as trainer:
        assert trainer.state.step == 2
    initial = ["--checkpoint.initial_load_path", str(step)]
    with Trainer(tiny_config(tmp_path / "new", *initial), show_progress=False) as trainer:
        assert trainer.state.step == 0
    with pytest.raises(CheckpointMismatch, match=r"other model args \(tie_embeddings\)"):
        Trainer(tiny_config(tmp_path / "tied", *initial, *LLAMA3[:2]), show_progress=False)

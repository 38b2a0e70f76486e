"""A tied model (qwen3 debug: the output projection is the embedding matrix) in checkpoints: one tensor,
saved as tok_embeddings.weight, and a run stopped under FSDP 2 resumes in one process bitwise."""

from lockstep.checkpoint import folders
from lockstep.checkpoint.safe_reader import SafeFileSystemReader
from tests.checkpoint.helpers import assert_bitwise, result, train
from tests.distributed import run_on_ranks

QWEN3 = ["--model.name", "qwen3", "--model.flavor", "debug", "--training.steps", "8"]


def test_tied_embeddings_are_saved_once_and_resume_bitwise_across_layouts(tmp_path):
    (tmp_path / "whole").mkdir()
    train(tmp_path / "whole", QWEN3)
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    run_on_ranks(train, 2, stopped, QWEN3, 4, "first")  # FSDP 2, stopped (and saved) after step 4 or so
    step, folder = folders.published_steps(stopped / "run" / "checkpoint")[-1]
    assert 4 <= step < 8
    keys = SafeFileSystemReader(str(folder)).read_metadata().state_dict_metadata
    assert "model.tok_embeddings.weight" in keys and "model.output.weight" not in keys
    train(stopped, QWEN3)  # one process from here
    got = result(stopped)
    assert "output.weight" not in got[1]
    assert_bitwise(got, result(tmp_path / "whole"))

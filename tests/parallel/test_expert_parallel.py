"""The MoE model across layouts: FSDP is bitwise, expert parallelism agrees to 1e-5 (its expert GEMMs
see the tokens of all ranks in one call, so the sums are not batch-invariant), and checkpoints carry
the router bias and reshard from EP 2 to one process."""

import shutil

import pytest
import torch

from lockstep.checkpoint import folders
from lockstep.checkpoint.safe_reader import SafeFileSystemReader
from lockstep.train.run_folder import read_metrics
from tests.checkpoint.helpers import assert_bitwise, result, train
from tests.distributed import run_on_ranks

MOE = ["--model.name", "deepseek_v3", "--model.flavor", "debug", "--training.steps", "10"]
EP2 = ["--parallelism.expert_parallel_degree", "2"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    folder = tmp_path_factory.mktemp("moe-one")
    train(folder, MOE)
    return result(folder)


def test_repeat_and_fsdp_runs_are_bitwise(tmp_path, one_process):
    (tmp_path / "again").mkdir()
    train(tmp_path / "again", MOE)
    assert_bitwise(result(tmp_path / "again"), one_process)
    (tmp_path / "fsdp").mkdir()
    run_on_ranks(train, 2, tmp_path / "fsdp", MOE)
    assert_bitwise(result(tmp_path / "fsdp"), one_process)


def _assert_close(got, expected) -> None:
    (metrics, weights), (ref_metrics, ref_weights) = got, expected
    for (step, loss, _), (_, ref_loss, _) in zip(metrics, ref_metrics, strict=True):
        assert abs(loss - ref_loss) <= 1e-5 * ref_loss, step
    assert weights.keys() == ref_weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, ref_weights[name], rtol=1e-4, atol=1e-5)


def test_expert_parallel_2_is_within_1e5_of_one_process(tmp_path, one_process):
    run_on_ranks(train, 2, tmp_path, MOE + EP2)
    _assert_close(result(tmp_path), one_process)


def test_expert_parallel_checkpoint_resumes_in_one_process(tmp_path, one_process):
    """Stopped at EP 2 after step 6 or so; the checkpoint holds the router biases; one process goes on."""
    first = tmp_path / "first"
    first.mkdir()
    run_on_ranks(train, 2, first, MOE + EP2, 6, "first")
    step, folder = folders.published_steps(first / "run" / "checkpoint")[-1]
    keys = SafeFileSystemReader(str(folder)).read_metadata().state_dict_metadata
    assert "model.layers.1.moe.expert_bias" in keys
    continued = tmp_path / "continued"
    shutil.copytree(first, continued)
    train(continued, MOE)
    _assert_close(result(continued), one_process)


def test_moe_resume_is_bitwise(tmp_path, one_process):
    train(tmp_path, MOE, stop_at=5)
    train(tmp_path, MOE)
    assert_bitwise(result(tmp_path), one_process)
    last = read_metrics(tmp_path / "run")[-1]
    assert last["moe/layers.1/bias_absmax"] > 0  # the router bias moved, and was restored on resume
    assert last["moe/layers.1/load_min"] > 0


def test_pipeline_and_activation_checkpointing_keep_moe_bitwise(tmp_path, one_process):
    """Token counts (which move the router bias) must ignore a stage's shape-inference pass and
    activation-checkpoint recomputes; both layouts then match one process bitwise."""
    (tmp_path / "pp").mkdir()
    pipeline = ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_microbatch_size", "2"]
    run_on_ranks(train, 2, tmp_path / "pp", MOE + pipeline)
    assert_bitwise(result(tmp_path / "pp"), one_process)
    last = read_metrics(tmp_path / "pp" / "run")[-1]
    assert {"moe/layers.1/load_cv", "moe/layers.3/load_cv"} <= last.keys()  # both stages' layers reported
    (tmp_path / "ac").mkdir()
    train(tmp_path / "ac", MOE + ["--activation_checkpoint.mode", "full"])
    assert_bitwise(result(tmp_path / "ac"), one_process)


@pytest.mark.parametrize("world_size", [2, 4], ids=["tp2", "fsdp2xtp2"])
def test_tensor_parallel_attention_is_within_1e5(tmp_path, one_process, world_size):
    """MLA heads split over 2 ranks (MoE blocks whole on each), alone and under FSDP."""
    run_on_ranks(train, world_size, tmp_path, MOE + ["--parallelism.tensor_parallel_degree", "2"])
    _assert_close(result(tmp_path), one_process)


def test_tensor_parallel_checkpoint_resumes_in_one_process(tmp_path, one_process):
    """TP keeps plain and DTensor parameters in two AdamW groups; state is keyed by name, so one
    process (one group) resumes it."""
    first = tmp_path / "first"
    first.mkdir()
    run_on_ranks(train, 2, first, MOE + ["--parallelism.tensor_parallel_degree", "2"], 5, "first")
    train(first, MOE)
    _assert_close(result(first), one_process)

"""Data parallelism that cannot change the numbers: DP=1, 2 and 4 give bitwise-identical losses,
grad norms and final weights for the same global batch and microbatch size."""

import os
import subprocess
import sys

import pytest
import torch

from lockstep.train.run_folder import read_metrics
from lockstep.train.trainer import Trainer
from tests.distributed import run_on_ranks
from tests.helpers import tiny_config, tiny_overrides

SAME_GLOBAL_BATCH = ["--training.global_batch_size", "8", "--training.local_batch_size", "2", "--debug.deterministic"]


def _train(folder, replicate: int, weights_file) -> None:
    config = tiny_config(folder, *SAME_GLOBAL_BATCH, "--parallelism.data_parallel_replicate_degree", str(replicate))
    with Trainer(config, show_progress=False) as trainer:
        trainer.train()
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(trainer.full_weights(), weights_file)


def _result(folder, weights_file):
    metrics = [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(folder / "run")]
    return metrics, torch.load(weights_file)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dp1")
    _train(folder, 1, folder / "weights.pt")
    return _result(folder, folder / "weights.pt")


@pytest.mark.parametrize("replicate", [2, 4])
def test_data_parallel_is_bitwise_identical_to_one_process(tmp_path, single_process, replicate):
    run_on_ranks(_train, replicate, tmp_path, replicate, tmp_path / "weights.pt")
    metrics, weights = _result(tmp_path, tmp_path / "weights.pt")
    reference_metrics, reference_weights = single_process
    assert len(metrics) == 6
    assert metrics == reference_metrics
    assert all(torch.equal(weights[k], reference_weights[k]) for k in weights)


def test_nproc_launch_through_torchrun_matches_one_process(tmp_path, single_process):
    """`lockstep train --nproc 2` (torchrun underneath; FSDP fills the two ranks) is bitwise the one process."""
    lockstep = os.path.join(os.path.dirname(sys.executable), "lockstep")
    args = ["--config", "llama3_debug", *tiny_overrides(tmp_path), *SAME_GLOBAL_BATCH]
    done = subprocess.run(
        [lockstep, "train", "--nproc", "2", *args],
        capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(tmp_path / "run")]
    assert metrics == single_process[0]


def test_nproc_refuses_a_bad_layout_before_starting_processes(tmp_path):
    lockstep = os.path.join(os.path.dirname(sys.executable), "lockstep")
    args = ["--config", "llama3_debug", *tiny_overrides(tmp_path), "--parallelism.tensor_parallel_degree", "3"]
    done = subprocess.run([lockstep, "train", "--nproc", "2", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "not divisible by replicate x tp x pp x cp = 3" in done.stderr

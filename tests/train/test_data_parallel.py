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


def test_torchrun_launch_matches_one_process(tmp_path, single_process):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")  # installed with torch
    args = ["--config", "llama3_debug", *tiny_overrides(tmp_path), *SAME_GLOBAL_BATCH]
    args += ["--parallelism.data_parallel_replicate_degree", "2"]
    command = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "lockstep.train", *args]
    done = subprocess.run(
        command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(tmp_path / "run")]
    assert metrics == single_process[0]

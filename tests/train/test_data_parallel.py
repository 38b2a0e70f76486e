"""Data parallelism that cannot change the numbers: DP=1, 2 and 4 give bitwise-identical losses,
grad norms and final weights for the same global batch and microbatch size."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lockstep.run.folder import read_metrics
from lockstep.train.trainer import Trainer
from tests.distributed import run_on_ranks
from tests.helpers import tiny_config, tiny_overrides

SAME_GLOBAL_BATCH = ["--training.global_batch_size", "8", "--training.local_batch_size", "2", "--debug.deterministic"]


def _train(folder, replicate: int, weights_file, *overrides: str) -> None:
    config = tiny_config(
        folder, *SAME_GLOBAL_BATCH, "--parallelism.data_parallel_replicate_degree", str(replicate), *overrides
    )
    with Trainer(config, show_progress=False) as trainer:
        trainer.train()
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(trainer.full_weights(), weights_file)
            if trainer.replica_sum is not None:  # how the last step's replicate-axis sum ran
                buckets = {"buckets": len(trainer.replica_sum._buckets)}
                buckets["launched_in_backward"] = trainer.replica_sum.launched_in_backward
                (folder / "buckets.json").write_text(json.dumps(buckets))


def _result(folder, weights_file):
    metrics = [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(folder / "run")]
    return metrics, torch.load(weights_file)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dp1")
    _train(folder, 1, folder / "weights.pt")
    return _result(folder, folder / "weights.pt")


@pytest.mark.parametrize("replicate, bucket_mb", [(2, "25"), (4, "0.002")])
def test_data_parallel_is_bitwise_identical_to_one_process(tmp_path, single_process, replicate, bucket_mb):
    """Also with the replicate-axis sum cut into many small buckets (2 KB): each bucket's sum starts
    from the gradient hooks during the last microbatch's backward, and the bits do not move."""
    overrides = ["--parallelism.replicate_bucket_mb", bucket_mb]
    run_on_ranks(_train, replicate, tmp_path, replicate, tmp_path / "weights.pt", *overrides)
    metrics, weights = _result(tmp_path, tmp_path / "weights.pt")
    reference_metrics, reference_weights = single_process
    assert len(metrics) == 6
    assert metrics == reference_metrics
    assert all(torch.equal(weights[k], reference_weights[k]) for k in weights)
    buckets = json.loads((tmp_path / "buckets.json").read_text())
    assert buckets["launched_in_backward"] == buckets["buckets"]  # none waited for the end of backward
    assert buckets["buckets"] > (10 if bucket_mb == "0.002" else 0)


def test_native_replicate_sum_agrees_to_rounding(tmp_path, single_process):
    """Without the canonical reductions the buckets use the backend's all_reduce (overlapped too)."""
    overrides = ["--debug.no-deterministic", "--debug.no-layout-invariant-reductions"]
    overrides += ["--parallelism.replicate_bucket_mb", "0.002"]
    run_on_ranks(_train, 2, tmp_path, 2, tmp_path / "weights.pt", *overrides)
    metrics, _ = _result(tmp_path, tmp_path / "weights.pt")
    for (step, loss, norm), (ref_step, ref_loss, ref_norm) in zip(metrics, single_process[0], strict=True):
        assert (
            step == ref_step and loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-4)
        )
    buckets = json.loads((tmp_path / "buckets.json").read_text())
    assert buckets["launched_in_backward"] == buckets["buckets"] > 10


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

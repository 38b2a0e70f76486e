"""A Trainer whose start fails at any stage ends what the earlier stages started: the run lock is
released, the process group it started is destroyed, the torchft manager is shut down and the
metrics file is closed. Each stage is made to fail in turn."""

import fcntl
import os

import pytest
import torch.distributed as dist

from lockstep.train import runtime as runtime_module
from lockstep.train import trainer as trainer_module
from lockstep.train.trainer import Trainer
from tests.helpers import tiny_config

STAGES = [
    (runtime_module, "resolve_device"),
    (runtime_module, "CommTimeouts"),
    (runtime_module, "configure_determinism"),
    (trainer_module, "build_token_windows"),
    (runtime_module, "init_process_group"),
    (runtime_module, "build_mesh"),
    (runtime_module, "seed_everything"),
    (trainer_module, "build_model"),
    (trainer_module, "RunCheckpoints"),
    (trainer_module, "record_launch"),
    (trainer_module, "peak_flops"),
]
"""In the order __init__ reaches them (start_runtime's stages, then the trainer's); the torchft manager is
built after the seeds."""
AFTER_THE_MANAGER = [name for _, name in STAGES[7:]]


class FakeFaultTolerance:
    """Stands for the torchft manager (built before the process group): records its shutdown."""

    closed = 0

    def close(self) -> None:
        FakeFaultTolerance.closed += 1

    def attach(self, *args) -> None:
        pass


def _lock_is_free(run_folder) -> bool:
    fd = os.open(run_folder / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return (run_folder / ".lock").read_text() == ""
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize(("module", "stage"), STAGES, ids=[name for _, name in STAGES])
def test_a_start_that_fails_at_any_stage_leaves_nothing_running(tmp_path, monkeypatch, module, stage):
    def fail(*args, **kwargs):
        raise RuntimeError(f"{stage} failed")

    monkeypatch.setattr(module, stage, fail)
    monkeypatch.setattr(Trainer, "_fault_tolerance", lambda self, *args: FakeFaultTolerance())
    config = tiny_config(tmp_path, "--training.mixed_precision", "bf16")  # a process group of one (FSDP)
    config.fault_tolerance.enable = True  # the fake manager above, built before the process group
    config.fault_tolerance.lighthouse = "http://localhost:1"  # never contacted: the manager is the fake
    monkeypatch.setattr(trainer_module, "resolve_group_batch_size", lambda config, dims: (4, 4))
    before = FakeFaultTolerance.closed
    with pytest.raises(RuntimeError, match=f"{stage} failed"):
        Trainer(config, show_progress=False)
    assert not dist.is_initialized()
    assert FakeFaultTolerance.closed == before + (stage in AFTER_THE_MANAGER)
    assert _lock_is_free(tmp_path / "run" / "replica_0")


def test_a_process_group_started_by_the_caller_is_left_to_the_caller(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "build_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no")))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError):
            Trainer(tiny_config(tmp_path, "--training.mixed_precision", "bf16"), show_progress=False)
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text('{"host": "h", "pid": 999999999, "started_at": "then", "command": ["x"]}\n')
    with Trainer(tiny_config(tmp_path, "--training.steps", "1"), show_progress=False):
        assert "taking over the lock of run folder" in capsys.readouterr().out  # printed before the world is known
    assert _lock_is_free(run)

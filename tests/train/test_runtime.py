"""start_runtime without a trainer: the order of its stages as the caller's preparation sees it, the
caller's config left unchanged, the seed agreed and recorded, and whatever the earlier stages started
(the run lock, the process group) ended when a later stage fails."""

import os

import pytest
import torch
import torch.distributed as dist

from lockstep.config.errors import ConfigError
from lockstep.config.sections import TrainingConfig
from lockstep.parallel.mesh import AXES
from lockstep.train import runtime as runtime_module
from lockstep.train.runtime import resolve_device, start_runtime
from tests.helpers import tiny_config


def _lock_is_free(run_folder) -> bool:
    """A released lock is an empty file (the next run has nothing to take over)."""
    return (run_folder / ".lock").read_text() == ""


def _start(config, prepare=lambda runtime: None):
    runtime, prepared = start_runtime(config, before_process_group=prepare)
    return runtime, prepared


def test_the_preparation_runs_under_the_lock_with_the_device_set_before_the_process_group(tmp_path):
    seen = {}

    def prepare(runtime) -> str:
        lock_text = (runtime.run_folder / ".lock").read_text()
        seen.update(device=runtime.device, group=dist.is_initialized(), lock=runtime.run_lock is not None and lock_text)
        return "prepared"

    config = tiny_config(tmp_path, "--training.mixed_precision", "bf16")  # a process group of one (FSDP)
    runtime, prepared = _start(config, prepare)
    try:
        assert prepared == "prepared" and seen["device"] == torch.device("cpu") and not seen["group"]
        assert str(os.getpid()) in seen["lock"]  # the lock names its holder
        assert dist.is_initialized() and runtime.owns_process_group and runtime.mesh is not None
    finally:
        runtime.abandon()
    assert not dist.is_initialized() and _lock_is_free(tmp_path / "run")


def test_the_callers_config_is_unchanged_and_a_drawn_seed_is_recorded_in_the_runtimes(tmp_path):
    config = tiny_config(tmp_path)
    config.debug.seed = None
    runtime, _ = _start(config)
    try:
        assert config.debug.seed is None and runtime.config.debug is not config.debug
        assert isinstance(runtime.config.debug.seed, int) and runtime.seeds["root"] == runtime.config.debug.seed
    finally:
        runtime.abandon()


def test_the_configured_seed_seeds_every_stream_and_the_record_names_the_layout(tmp_path):
    runtime, _ = _start(tiny_config(tmp_path))  # --debug.seed 7
    try:
        assert runtime.seeds["root"] == 7 and runtime.config.debug.seed == 7
        record = runtime.environment_record(fingerprints={"data": "abc"}, reduction_levels={})
        assert record["seeds"] is runtime.seeds and record["fingerprints"] == {"data": "abc"}
        assert list(record["layout"]["degrees"]) == list(AXES) and all(
            v == 1 for v in record["layout"]["degrees"].values()
        )
        assert record["layout"]["attention"] == runtime.attention_backend != ""
    finally:
        runtime.abandon()


STAGES = [
    "resolve_device",
    "CommTimeouts",
    "configure_determinism",
    "init_process_group",
    "build_mesh",
    "seed_everything",
]
"""start_runtime's stages that can fail after the lock is taken, in order (the preparation between
configure_determinism and init_process_group is failed in its own test)."""


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_that_fails_releases_the_lock_and_ends_the_process_group_it_started(tmp_path, monkeypatch, stage):
    def fail(*args, **kwargs):
        raise RuntimeError(f"{stage} failed")

    monkeypatch.setattr(runtime_module, stage, fail)
    with pytest.raises(RuntimeError, match=f"{stage} failed"):
        _start(tiny_config(tmp_path, "--training.mixed_precision", "bf16"))
    assert not dist.is_initialized() and _lock_is_free(tmp_path / "run")


def test_a_failing_preparation_releases_the_lock(tmp_path):
    def prepare(runtime):
        raise ValueError("tokenizing failed")

    with pytest.raises(ValueError, match="tokenizing failed"):
        _start(tiny_config(tmp_path), prepare)
    assert _lock_is_free(tmp_path / "run")


def test_a_process_group_the_caller_started_is_left_running(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime_module, "seed_everything", lambda *a: (_ for _ in ()).throw(RuntimeError("no")))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError):
            _start(tiny_config(tmp_path, "--training.mixed_precision", "bf16"))
        assert dist.is_initialized() and _lock_is_free(tmp_path / "run")
    finally:
        dist.destroy_process_group()


def test_abandon_ends_the_process_group_even_when_releasing_the_lock_fails(tmp_path):
    runtime, _ = _start(tiny_config(tmp_path, "--training.mixed_precision", "bf16"))
    lock = runtime.run_lock

    class BrokenLock:
        def release(self) -> None:
            raise OSError("disk gone")

    runtime.run_lock = BrokenLock()
    runtime.abandon()
    assert not dist.is_initialized()
    lock.release()


def test_the_device_is_the_cpu_unless_cuda_is_there_or_asked_for(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(TrainingConfig(device="auto")) == torch.device("cpu")
    with pytest.raises(ConfigError, match="torch sees no CUDA device"):
        resolve_device(TrainingConfig(device="cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device(TrainingConfig(device="auto")) == torch.device("cuda", 3)  # this rank's own GPU
    assert resolve_device(TrainingConfig(device="cpu")) == torch.device("cpu")

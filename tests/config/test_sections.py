"""lockstep.config.sections: each section's own checks refuse an impossible value (fault tolerance, comm sizes
and timeouts included) before any process group starts, with an error that names the key and the fix."""

import pytest

from lockstep.config import ConfigError, load_config, validate_job_config


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        (["--training.steps", "0"], "training.steps", "must be > 0"),
        (["--training.global_batch_size", "12"], "training.global_batch_size", "use a multiple of 8"),
        (["--training.mixed_precision", "fp8"], "training.mixed_precision", "must be one of"),
        (["--parallelism.tensor_parallel_degree", "2"], "parallelism.data_parallel_shard_degree", "not divisible"),
        (["--parallelism.context_parallel_degree", "2"], "parallelism.context_parallel_degree", "only on CUDA"),
        (["--parallelism.expert_parallel_degree", "2"], "parallelism.expert_parallel_degree", "must equal"),
        (["--parallelism.pipeline_parallel_schedule", "1f1b"], "parallelism.pipeline_parallel_schedule", "one of"),
        (["--checkpoint.async_mode", "fast"], "checkpoint.async_mode", "must be one of"),
        (["--checkpoint.exclude_from_loading", "rngs"], "checkpoint.exclude_from_loading", "unknown parts"),
        (["--model.tokenizer", "hf"], "model.tokenizer_path", "is required"),
        (["--training.dataset", "parquet"], "training.dataset_path", "is required"),
        (["--debug.deterministic_warn_only"], "debug.deterministic_warn_only", "set both"),
        (["--lr_scheduler.decay_ratio", "1.5"], "lr_scheduler.decay_ratio", "must be in [0, 1]"),
        (
            ["--debug.deterministic", "--debug.no-layout-invariant-reductions"],
            "debug.layout_invariant_reductions",
            "needs the layout-invariant",
        ),
    ],
)
def test_impossible_values_are_refused(overrides, key, fragment):
    config = load_config("llama3_debug", overrides)
    with pytest.raises(ConfigError) as error:
        validate_job_config(config, world_size=1)
    assert error.value.key == key
    assert fragment in str(error.value)


@pytest.mark.parametrize(
    "overrides,key,fragment",
    [
        (["--fault_tolerance.group_size", "2", "--fault_tolerance.replica_id", "2"], "fault_tolerance.replica_id",
         "0 .. group_size - 1 = 1"),
        (["--fault_tolerance.min_replica_size", "3", "--fault_tolerance.group_size", "2"],
         "fault_tolerance.min_replica_size", "1 .. group_size = 2"),
        (["--fault_tolerance.lighthouse", ""], "fault_tolerance.lighthouse", "TORCHFT_LIGHTHOUSE"),
        (["--fault_tolerance.lighthouse", "not a url"], "fault_tolerance.lighthouse", "http://HOST:PORT"),
        (["--fault_tolerance.lighthouse", "http://host:notaport"], "fault_tolerance.lighthouse", "http://HOST:PORT"),
        (["--fault_tolerance.lighthouse", "ftp://host:1"], "fault_tolerance.lighthouse", "http://HOST:PORT"),
        (["--fault_tolerance.group_size", "2", "--training.global_batch_size", "6"], "training.global_batch_size",
         "data-parallel degree"),
        (["--fault_tolerance.group_size", "3", "--training.global_batch_size", "18"], "training.global_batch_size",
         "global_batch_size = 12 or 24"),
        (["--debug.seed", "none"], "debug.seed", "the same N to every group"),
    ],
)  # fmt: skip
def test_fault_tolerance_settings_are_checked_before_any_process_group(overrides, key, fragment, monkeypatch):
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    base = ["--fault_tolerance.enable", "--fault_tolerance.lighthouse", "http://localhost:29510", "--debug.seed", "1"]
    config = load_config("llama3_debug", base + ["--training.local_batch_size", "2"] + overrides)
    with pytest.raises(ConfigError) as error:
        validate_job_config(config, world_size=1)
    assert error.value.key == key and fragment in str(error.value)


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("comm.trace_buf_size", "100000000000", "must be in 0 .. 1000000 entries"),
        ("comm.train_timeout_seconds", "100000000000000", "must be in 1 .. 604800 seconds"),
        ("comm.init_timeout_seconds", "0", "must be in 1 .. 604800 seconds"),
    ],
)
def test_comm_sizes_and_timeouts_are_bounded_before_any_process_group(key, value, fragment):
    """A flight-recorder ring of 1e11 entries aborted both ranks (SIGABRT); a 1e14 s timeout overflowed."""
    config = load_config("llama3_debug", [f"--{key}", value])
    with pytest.raises(ConfigError) as error:
        validate_job_config(config, world_size=1)
    assert error.value.key == key and fragment in str(error.value)

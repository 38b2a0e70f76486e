"""lockstep.config.job: the checks that span sections: parallel degrees fill the world size, pipeline
settings fit the batch, a seed checkpoint is valid in any layout, and fault tolerance counts the global
batch over every replica group."""

import pytest

from lockstep.config import ConfigError, load_config, validate_job_config


def test_parallel_degrees():
    validate_job_config(load_config("llama3_debug", []), world_size=2)  # FSDP fills the world
    validate_job_config(load_config("llama3_debug", ["--parallelism.data_parallel_replicate_degree", "2"]), 2)
    overrides = ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "1"]
    with pytest.raises(ConfigError, match="world size is 4"):
        validate_job_config(load_config("llama3_debug", overrides), 4)
    with pytest.raises(ConfigError, match="not divisible by replicate x tp x pp x cp = 2"):
        validate_job_config(load_config("llama3_debug", ["--parallelism.tensor_parallel_degree", "2"]), 3)
    validate_job_config(load_config("llama3_debug", ["--parallelism.data_parallel_replicate_degree", "3"]), 3)
    overrides = ["--parallelism.data_parallel_replicate_degree", "2", "--training.global_batch_size", "48"]
    validate_job_config(load_config("llama3_debug", overrides), 2)  # 3 per replica: nodes of the tree
    overrides = ["--parallelism.data_parallel_replicate_degree", "2", "--training.global_batch_size", "96"]
    with pytest.raises(ConfigError, match="power-of-two number of microbatches"):  # HSDP 2x2, 3 per rank
        validate_job_config(load_config("llama3_debug", overrides), 4)
    validate_job_config(load_config("llama3_debug", overrides + ["--debug.no-layout-invariant-reductions"]), 4)
    pipeline = ["--parallelism.pipeline_parallel_degree", "2", "--training.local_batch_size", "8"]
    validate_job_config(load_config("llama3_debug", pipeline + ["--training.global_batch_size", "24"]), 2)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["--parallelism.pipeline_parallel_microbatch_size", "3"], "does not divide training.local_batch_size"),
        (["--parallelism.pipeline_parallel_microbatch_size", "8"], "needs at least pp degree = 2 microbatches"),
        (["--parallelism.pipeline_parallel_schedule", "ZBVZeroBubble"], "accumulates weight gradients outside"),
    ],
)
def test_pipeline_settings_are_checked(overrides, fragment):
    base = ["--parallelism.pipeline_parallel_degree", "2", "--training.local_batch_size", "8"]
    with pytest.raises(ConfigError, match=fragment):
        validate_job_config(load_config("llama3_debug", base + overrides), 2)


def test_seed_checkpoint_in_any_layout():
    config = load_config("llama3_debug", ["--checkpoint.create_seed_checkpoint"])
    validate_job_config(config, world_size=1)
    validate_job_config(config, world_size=2)  # each rank saves its shards of the same weights


def test_fault_tolerance_counts_the_global_batch_over_every_replica_group(monkeypatch):
    from lockstep.config.job import resolve_group_batch_size, resolve_parallel_dims

    monkeypatch.setenv("TORCHFT_LIGHTHOUSE", "http://localhost:29510")  # the default address
    config = load_config(
        "llama3_debug",
        [
            "--fault_tolerance.enable",
            "--fault_tolerance.group_size",
            "3",
            "--training.local_batch_size",
            "2",
            "--debug.seed",
            "1",
        ],  # fmt: skip
    )
    validate_job_config(config, world_size=2)
    dims = resolve_parallel_dims(config.parallelism, 2)
    assert resolve_group_batch_size(config, dims) == (12, 4)  # 2 samples x 2 ranks x 3 groups; a group's block

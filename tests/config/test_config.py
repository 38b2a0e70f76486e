import dataclasses
import sys
import textwrap

import pytest

from lockstep.cli import main
from lockstep.config import ConfigError, dump_toml, load_config, validate_job_config
from lockstep.config.loader import parse_overrides, preset_names
from lockstep.models.registry import MODELS


def test_presets_load_and_validate():
    assert {"llama3_debug", "llama3_8b", "qwen3_debug", "qwen3_moe_debug"} <= set(preset_names())
    for name in preset_names():
        config = load_config(name, [])
        assert config.model.name in MODELS and config.model.flavor in MODELS[config.model.name].flavors
        p = config.parallelism  # the smallest world a preset's fixed degrees fit (llama3_405b: tp 8 x pp 8)
        shard = max(p.data_parallel_shard_degree, 1)  # llama4_scout: 4 replicas of 16 shards
        fixed = p.data_parallel_replicate_degree * shard * p.tensor_parallel_degree * p.pipeline_parallel_degree
        validate_job_config(config, world_size=fixed)


def test_override_forms():
    config = load_config(
        "llama3_debug",
        ["--training.steps", "7", "--optimizer.lr=0.01", "--lr-scheduler.warmup-steps", "3",
         "--debug.deterministic", "--data.no-document-masking", "--optimizer.betas", "0.8,0.9",
         "--compile.components", "loss", "--debug.seed", "none"],
    )  # fmt: skip
    assert config.training.steps == 7
    assert config.optimizer.lr == 0.01
    assert config.lr_scheduler.warmup_steps == 3
    assert config.debug.deterministic is True
    assert config.data.document_masking is False
    assert config.optimizer.betas == (0.8, 0.9)
    assert config.compile.components == ["loss"]
    assert config.debug.seed is None


def test_bool_flag_with_explicit_value():
    assert load_config("llama3_debug", ["--debug.deterministic", "false"]).debug.deterministic is False
    assert load_config("llama3_debug", ["--debug.deterministic=true"]).debug.deterministic is True


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        (["--debug.sede", "3"], "debug.sede", "did you mean 'debug.seed'"),
        (["--trainig.steps", "3"], "trainig.steps", "did you mean 'training.steps'"),
        (["--training.steps", "ten"], "training.steps", "expected an integer"),
        (["--optimizer.lr", "fast"], "optimizer.lr", "expected a number"),
        (["--debug.deterministic", "maybe"], "debug.deterministic", "expected true or false"),
        (["--optimizer.betas", "0.9"], "optimizer.betas", "expected 2 values"),
        (["steps", "3"], "steps", "--section.key value"),
    ],
)
def test_parse_errors_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as error:
        load_config("llama3_debug", overrides)
    assert error.value.key == key
    assert fragment in str(error.value)


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


def test_unknown_section_in_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[trainng]\nsteps = 3\n")
    with pytest.raises(ConfigError, match="did you mean 'training'"):
        load_config(str(path), [])


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="did you mean 'llama3_debug'"):
        load_config("llama3_debugg", [])


def test_resolved_toml_reproduces_config(tmp_path):
    config = load_config(
        "llama3_debug", ["--training.steps", "11", "--optimizer.betas", "0.5,0.6", "--debug.seed", "3"]
    )
    path = tmp_path / "config.toml"
    path.write_text(dump_toml(config))
    assert load_config(str(path), []) == config


def test_cli_exits_nonzero_before_work(tmp_path, capsys):
    rc = main(["train", "--config", "llama3_debug", "--debug.sede", "1", "--job.dump_folder", str(tmp_path / "r")])
    assert rc == 2
    assert "did you mean 'debug.seed'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_custom_config_module(tmp_path, monkeypatch):
    (tmp_path / "my_sections.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass

            @dataclass
            class ExperimentConfig:
                enable: bool = False
                trace_steps: int = 3

                def validate(self):
                    if self.trace_steps < 1:
                        from lockstep.config import ConfigError
                        raise ConfigError("experiment.trace_steps", "must be >= 1")

            CONFIG_SECTIONS = {"experiment": ExperimentConfig}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = load_config(
        "llama3_debug",
        ["--job.custom_config_module", "my_sections", "--experiment.enable", "--experiment.trace_steps", "5"],
    )
    assert dataclasses.asdict(config.custom["experiment"]) == {"enable": True, "trace_steps": 5}
    assert "[experiment]" in dump_toml(config)
    with pytest.raises(ConfigError, match="did you mean 'experiment.trace_steps'"):
        load_config("llama3_debug", ["--job.custom_config_module", "my_sections", "--experiment.trace_step", "5"])
    bad = load_config("llama3_debug", ["--job.custom_config_module", "my_sections", "--experiment.trace_steps", "0"])
    with pytest.raises(ConfigError, match="experiment.trace_steps"):
        validate_job_config(bad, world_size=1)
    with pytest.raises(ConfigError, match="cannot import"):
        load_config("llama3_debug", ["--job.custom_config_module", "no_such_module_xyz"])


def test_a_module_a_config_file_names_is_imported_only_when_the_user_names_it_too(tmp_path, monkeypatch):
    """Importing runs code: a config file alone never imports; the command line or LOCKSTEP_CONFIG_MODULES
    does."""
    marker = tmp_path / "imported"
    (tmp_path / "loud_sections.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\nCONFIG_SECTIONS = {{}}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("LOCKSTEP_CONFIG_MODULES", raising=False)
    (tmp_path / "job.toml").write_text('[job]\ncustom_config_module = "loud_sections"\n')
    with pytest.raises(
        ConfigError, match=r"job.toml names module 'loud_sections'.*--job.custom_config_module loud_sections"
    ):
        load_config(str(tmp_path / "job.toml"), [])
    assert not marker.exists()
    load_config(str(tmp_path / "job.toml"), ["--job.custom_config_module", "loud_sections"])
    assert marker.read_text() == "ran"
    marker.unlink()
    monkeypatch.delitem(sys.modules, "loud_sections")  # forgotten: the next load imports it afresh
    monkeypatch.setenv("LOCKSTEP_CONFIG_MODULES", "other, loud_sections")
    assert load_config(str(tmp_path / "job.toml"), []).job.custom_config_module == "loud_sections"
    assert marker.read_text() == "ran"


def test_parse_overrides_keeps_strings():
    assert parse_overrides(["--a.b", "1", "--c.d"]) == [("a.b", "1"), ("c.d", True)]


def test_the_config_reference_page_is_current():
    from pathlib import Path

    from lockstep.config.reference import config_reference

    page = (Path(__file__).resolve().parents[2] / "docs" / "config-reference.md").read_text()
    assert config_reference() in page, "regenerate with: lockstep config-reference > docs/config-reference.md"


def test_seed_checkpoint_in_any_layout():
    config = load_config("llama3_debug", ["--checkpoint.create_seed_checkpoint"])
    validate_job_config(config, world_size=1)
    validate_job_config(config, world_size=2)  # each rank saves its shards of the same weights


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

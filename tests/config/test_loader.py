"""lockstep.config.loader: presets and TOML files load with `--section.key value` overrides in every form;
a misspelt key, section or preset and a value of the wrong type are refused naming the key (and the CLI
exits 2 before any work); the written TOML reloads to the same config; a custom config module adds its
sections, and is imported only when the user names it, never because a config file does."""

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

"""A torchtitan job (0.2 TOML, 0.3 job.json) becomes a lockstep config that loads and validates, with torchtitan's
learning-rate formulas and data order selected, and every key without an equivalent named."""

from pathlib import Path

import pytest
import tomllib

from lockstep.config import load_config, validate_job_config
from lockstep.config.errors import ConfigError
from lockstep.config.sections import ModelConfig
from lockstep.errors import InputError
from lockstep.models.registry import model_args
from lockstep.tools.torchtitan_config import from_torchtitan
from tests.helpers import run_cli

ASSET = Path(__file__).resolve().parents[1] / "assets" / "torchtitan_debug_model.toml"


def test_the_debug_job_translates_into_a_valid_config_and_names_what_has_no_equivalent(tmp_path, capfd):
    code, out, err = run_cli(["config", "from-torchtitan", str(ASSET)], capfd)
    assert code == 0, err
    translated = tomllib.loads(out)
    assert translated["lr_scheduler"] == {"formula": "torchtitan", "warmup_steps": 2, "decay_ratio": 0.8,
                                          "decay_type": "linear", "min_lr_factor": 0.0}  # fmt: skip
    assert translated["data"]["shuffle"] is False
    assert translated["model"]["flavor"] == "debug" and translated["model"]["overrides"] == {"vocab_size": 2048}
    assert translated["model"]["tokenizer_path"].endswith("tests/assets/tokenizer/tokenizer.json")
    named = [line.split(" = ")[0].removeprefix("note: torchtitan ") for line in err.splitlines()]
    left_off = [line for line in err.splitlines() if "options left off" in line]
    assert "metrics.save_tb_folder" in named and "training.dataset" in named
    assert (
        len(left_off) == 1
        and "job.print_config" in left_off[0]
        and "parallelism.context_parallel_degree" in left_off[0]
    )
    assert translated["profiling"]["enable_profiling"] is False
    assert (
        translated["checkpoint"]["last_save_model_only"] is False and translated["checkpoint"]["export_dtype"] == "fp32"
    )
    (tmp_path / "job.toml").write_text(out.replace(translated["model"]["tokenizer_path"], ""))
    config = load_config(str(tmp_path / "job.toml"), ["--model.tokenizer", "builtin", "--model.tokenizer_path="])
    validate_job_config(config, 2)
    assert (
        config.parallelism.fsdp_reshard_after_forward is True
        and config.activation_checkpoint.selective_ac_option == "2"
    )


def test_a_family_lockstep_lacks_or_an_unreadable_file_is_one_line(tmp_path, capfd):
    (tmp_path / "flux.toml").write_text('[model]\nname = "flux"\n')
    with pytest.raises(InputError, match="model.name 'flux' is not a family lockstep has"):
        from_torchtitan(tmp_path / "flux.toml")
    (tmp_path / "bad.toml").write_text("[job\n")
    code, _, err = run_cli(["config", "from-torchtitan", str(tmp_path / "bad.toml")], capfd)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is not a readable job file" in err
    (tmp_path / "taken.toml").write_text("")
    code, _, err = run_cli(["config", "from-torchtitan", str(ASSET), "--out", str(tmp_path / "taken.toml")], capfd)
    assert code == 2 and "exists already" in err and (tmp_path / "taken.toml").read_text() == ""


def test_flavor_custom_asks_for_every_number_and_takes_nothing_from_a_flavor():
    sizes = {"dim": 32, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5, "rope_theta": 1e4}
    _, args = model_args(ModelConfig(flavor="custom", overrides=sizes), 300, 16)
    assert (args.dim, args.n_layers, args.kv_heads, args.rope_scaling, args.tie_embeddings, args.vocab_size) == (
        32, 2, 4, None, False, 300,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="missing n_heads, rope_theta"):
        model_args(ModelConfig(flavor="custom", overrides={k: v for k, v in sizes.items() if k not in ("n_heads", "rope_theta")}), 300, 16)  # fmt: skip
    with pytest.raises(ConfigError, match="did you mean 'custom'"):
        model_args(ModelConfig(flavor="custm"), 300, 16)

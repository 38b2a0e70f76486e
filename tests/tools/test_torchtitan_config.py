"""A torchtitan job TOML becomes a lockstep config that loads and validates, with torchtitan's
learning-rate formulas and data order selected, and every key without an equivalent named."""

from pathlib import Path

import pytest
import tomllib

from lockstep.config import load_config, validate_job_config
from lockstep.errors import InputError
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
    for key in (
        "job.print_config",
        "profiling.enable_profiling",
        "metrics.save_tb_folder",
        "training.dataset",
        "parallelism.context_parallel_degree",
        "checkpoint.last_save_model_only",
        "checkpoint.export_dtype",
    ):
        assert key in named, key  # fmt: skip
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
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is not a readable TOML file" in err
    (tmp_path / "taken.toml").write_text("")
    code, _, err = run_cli(["config", "from-torchtitan", str(ASSET), "--out", str(tmp_path / "taken.toml")], capfd)
    assert code == 2 and "exists already" in err and (tmp_path / "taken.toml").read_text() == ""

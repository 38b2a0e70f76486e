"""lockstep.tools.torchtitan_resolved: torchtitan 0.3's job.json (written by its trainer with
``--debug.save_config_file``) read into the 0.2 sections lockstep config from-torchtitan translates."""

import json
from pathlib import Path

import pytest
import tomllib

from lockstep.config import load_config, validate_job_config
from lockstep.errors import InputError
from lockstep.tools.torchtitan_config import from_torchtitan
from lockstep.train.optimizer import lr_factor
from tests.helpers import run_cli

TITAN_03 = Path(__file__).resolve().parents[1] / "assets" / "torchtitan_0.3.0"


def test_a_torchtitan_0_3_job_json_gives_its_model_field_by_field_and_its_lr_at_every_step(tmp_path, capfd):
    """The job.json torchtitan 0.3.0's trainer wrote (tests/assets/torchtitan_0.3.0/make_fixture.py): the
    model from its module configs (flavor custom: every field given), and the same lr at every step as
    torchtitan logged."""
    code, out, err = run_cli(["config", "from-torchtitan", str(TITAN_03 / "job.json")], capfd)
    assert code == 0, err
    translated = tomllib.loads(out)
    assert translated["model"]["flavor"] == "custom"
    assert translated["model"]["overrides"] == {
        "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 2048, "ffn_hidden_size": 128,
        "multiple_of": 256, "norm_eps": 1e-5, "rope_theta": 500000, "tie_embeddings": False,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    }  # fmt: skip
    assert translated["optimizer"] == {"implementation": "fused", "lr": 0.0008, "eps": 1e-8, "weight_decay": 0.1,
                                       "betas": [0.9, 0.95]}  # fmt: skip
    assert translated["checkpoint"]["last_save_model_only"] is True and translated["debug"]["seed"] == 7
    named = " ".join(err.splitlines())
    for key in ("training.dataset", "loss.num_chunks", "training.mixed_precision_reduce", "debug.batch_invariant"):
        assert key in named, key
    (tmp_path / "job.toml").write_text(out)
    config = load_config(str(tmp_path / "job.toml"), ["--model.tokenizer", "bytes", "--model.tokenizer_path="])
    validate_job_config(config, 1)
    steps = json.loads((TITAN_03 / "steps.json").read_text())
    total = config.training.steps
    assert [config.optimizer.lr * lr_factor(s["step"] - 1, total, config.lr_scheduler) for s in steps] == pytest.approx(
        [s["lr"] for s in steps], rel=1e-12
    )


def test_a_job_json_without_a_model_spec_or_with_unlike_blocks_is_one_line(tmp_path):
    (tmp_path / "job.json").write_text('{"training": {"steps": 3}}')
    with pytest.raises(InputError, match="has no model_spec.model"):
        from_torchtitan(tmp_path / "job.json")
    job = json.loads((TITAN_03 / "job.json").read_text())
    job["model_spec"]["model"]["layers"][1]["feed_forward"]["w1"]["out_features"] = 256
    (tmp_path / "job.json").write_text(json.dumps(job))
    with pytest.raises(InputError, match="layers differ from block to block"):
        from_torchtitan(tmp_path / "job.json")
    job["optimizer"]["param_groups"] = [1]
    del job["model_spec"]["model"]["layers"][0]["feed_forward"]
    (tmp_path / "job.json").write_text(json.dumps(job))
    with pytest.raises(InputError, match=r"is not a job.json this importer reads \((KeyError|AttributeError)"):
        from_torchtitan(tmp_path / "job.json")

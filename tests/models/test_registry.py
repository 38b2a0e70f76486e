"""Architectures without code: [model.overrides] sets any field of the flavor's *Args, checked before any
work, recorded in config.toml and in the checkpoint identity; flavor from_hf takes them from an HF folder."""

import dataclasses
import json

import pytest
import tomllib
import torch

from lockstep.checkpoint import folders
from lockstep.config import ConfigError, load_config
from lockstep.models.registry import model_args
from lockstep.train.trainer import Trainer
from tests.helpers import run_cli, tiny_config, tiny_overrides


@pytest.mark.parametrize(
    "overrides, key, problem",
    [
        (
            ["--model.overrides.dimm", "32"],
            "model.overrides.dimm",
            "Llama3Args has no field 'dimm'; did you mean 'dim'?",
        ),
        (["--model.overrides.n_layers", "2.5"], "model.overrides.n_layers", "expected an integer"),
        (["--model.overrides.norm_eps", "true"], "model.overrides.norm_eps", "expected a number"),
        (["--model.overrides.dim", "66"], "model.overrides", "dim 66 / n_heads 4 / n_kv_heads 2 do not divide"),
        (["--model.overrides.rope_scaling", "8"], "model.overrides.rope_scaling", "takes a table of Llama3RopeScaling"),
        (
            ["--model.overrides.rope_scaling", '{"factr": 8}'],
            "model.overrides.rope_scaling.factr",
            "Llama3RopeScaling has no field 'factr'; did you mean 'factor'?",
        ),
        (["--model.overrides.max_seq_len", "9"], "model.overrides.max_seq_len", "it is training.seq_len"),
    ],
)
def test_bad_overrides_are_refused_before_any_work(tmp_path, capfd, overrides, key, problem):
    config = tiny_config(tmp_path, *overrides)
    with pytest.raises(ConfigError) as refused:
        model_args(config.model, 100, 32)
    assert str(refused.value).startswith(f"{key}: ") and problem in str(refused.value)
    code, _, err = run_cli(["train", "--config", "llama3_debug", *tiny_overrides(tmp_path), *overrides], capfd)
    assert code == 2 and err.strip() == f"lockstep train: error: {refused.value}"
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_padded_vocabulary_and_rope_scaling_are_overrides_as_torchtitan_sets_them(tmp_path):
    """torchtitan's debug model pads its vocabulary to 2048 rows and uses Llama 3.1 RoPE scaling: both
    are overrides (a table, JSON on the command line, or none), recorded in config.toml as tables."""
    from lockstep.models.common.rope import Llama3RopeScaling
    from lockstep.models.registry import typed_overrides

    scaling = (
        '{"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}'
    )
    config = tiny_config(tmp_path, "--model.overrides.vocab_size", "2048", "--model.overrides.rope_scaling", scaling)
    _, args = model_args(config.model, 100, 32)
    assert args.vocab_size == 2048 and args.rope_scaling == Llama3RopeScaling()
    with pytest.raises(ConfigError, match="model.overrides.vocab_size: 9 rows cannot hold the tokenizer's 100 tokens"):
        model_args(tiny_config(tmp_path, "--model.overrides.vocab_size", "9").model, 100, 32)
    assert typed_overrides(config.model)["rope_scaling"] == dataclasses.asdict(Llama3RopeScaling())
    one_b = load_config("llama3_1b", ["--model.overrides.rope_scaling", "none", "--model.tokenizer", "builtin",
                                      "--model.tokenizer_path="])  # fmt: skip
    assert model_args(one_b.model, 2048, 64)[1].rope_scaling is None
    (tmp_path / "shape.toml").write_text("[model.overrides.rope_scaling]\nfactor = 4.0\n")
    tabled = load_config(str(tmp_path / "shape.toml"), [])
    assert model_args(tabled.model, 100, 32)[1].rope_scaling == Llama3RopeScaling(factor=4.0)


@pytest.mark.parametrize(
    "overrides",
    [["--model.overrides.n_layers", "1000000000"], ["--model.overrides.dim", "10000000"]],
    ids=["n_layers-1e9", "dim-1e7"],
)
def test_a_model_too_large_for_any_layout_is_one_line_before_anything_is_built(tmp_path, capfd, overrides):
    """n_layers 1e9 used to build without end, dim 1e7 to end in an allocation traceback: the parameters
    are counted from a meta build of two blocks and set against what a rank of this machine has."""
    code, _, err = run_cli(["train", "--config", "llama3_debug", *tiny_overrides(tmp_path), *overrides], capfd)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "parameters need at least" in err and "GiB per rank" in err and "a rank has at most" in err
    assert not (tmp_path / "run").exists()


def test_overrides_build_the_model_and_are_recorded(tmp_path):
    (tmp_path / "shape.toml").write_text("[model.overrides]\ndim = 32\nn_layers = 3\n")
    overrides = ["--model.overrides.n_heads", "2", "--training.steps", "2", "--checkpoint.enable",
                 "--checkpoint.interval", "1"]  # fmt: skip
    config = load_config(str(tmp_path / "shape.toml"), [*tiny_overrides(tmp_path), *overrides])
    with Trainer(config, show_progress=False) as trainer:
        assert (trainer.model.args.dim, trainer.model.args.n_layers, trainer.model.args.n_heads) == (32, 3, 2)
        assert trainer.model.parts[0].tok_embeddings.weight.shape[1] == 32
        trainer.train()
    recorded = tomllib.loads((tmp_path / "run" / "config.toml").read_text())["model"]["overrides"]
    assert recorded == {"dim": 32, "n_layers": 3, "n_heads": 2}  # typed, the CLI's merged into the file's
    manifest = folders.read_manifest(folders.step_folder(tmp_path / "run" / "checkpoint", 2))
    assert manifest["model_overrides"] == recorded and manifest["model"]["args"]["dim"] == 32
    # Resuming with another shape is refused, naming the field.
    config.model.overrides["dim"] = 64
    config.training.steps = 3
    with pytest.raises(Exception, match=r"model\.args\.dim: 32 -> 64"):
        Trainer(config, show_progress=False)


def test_flavor_from_hf_takes_the_args_of_a_hugging_face_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lockstep.models.llama3 import hf_adapter

    torch.manual_seed(3)
    hf_config = transformers.LlamaConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=2100, max_position_embeddings=64, rope_theta=25000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )  # fmt: skip
    transformers.LlamaForCausalLM(hf_config).save_pretrained(tmp_path / "hf")
    config = tiny_config(tmp_path, "--model.flavor", "from_hf", "--checkpoint.initial_load_path", str(tmp_path / "hf"),
                         "--training.steps", "2")  # fmt: skip
    expected = hf_adapter.args_from_hf_config(json.loads((tmp_path / "hf" / "config.json").read_text()))
    with Trainer(config, show_progress=False) as trainer:
        args = trainer.model.args
        assert (args.dim, args.ffn_hidden_dim, args.rope_theta, args.norm_eps) == (48, 96, 25000.0, 1e-6)
        assert args.vocab_size == expected.vocab_size == 2100  # the model's rows; the tokenizer has 2048
        trainer.train()
    # The run's config.toml rebuilds the model without the folder.
    (tmp_path / "hf" / "config.json").unlink()
    rebuilt = load_config(str(tmp_path / "run" / "config.toml"), [])
    assert model_args(rebuilt.model, 2048, 32)[1] == model_args(config.model, 2048, 32)[1]


def test_from_hf_refuses_another_family_and_bad_yarn_in_one_line():
    from lockstep.config.sections import ModelConfig

    qwen = ModelConfig(name="llama3", flavor="from_hf", hf_config={"model_type": "qwen3", "hidden_size": 64})
    with pytest.raises(ConfigError, match="is a 'qwen3' model, not llama3; train with --model.name qwen3"):
        model_args(qwen, 100, 32)
    from lockstep.models.deepseek_v3 import DEEPSEEK_V3_FLAVORS, hf_adapter

    config = hf_adapter.hf_config(dataclasses.replace(DEEPSEEK_V3_FLAVORS["debug"], vocab_size=100))
    for scaling, problem in [({"type": "linear", "factor": 2.0}, "rope scaling 'linear'"),
                             ({"type": "yarn", "factor": -1.0}, "YaRN needs factor")]:  # fmt: skip
        bad = ModelConfig(name="deepseek_v3", flavor="from_hf", hf_config=config | {"rope_scaling": scaling})
        with pytest.raises(ConfigError, match=problem):
            model_args(bad, 100, 32)


def test_an_override_equal_to_the_flavor_does_not_block_a_resume(tmp_path):
    """The args decide whether a checkpoint fits; the overrides are recorded, typed, not compared."""
    with Trainer(tiny_config(tmp_path, "--model.overrides.n_layers", '"2"', "--training.steps", "2",
                             "--checkpoint.enable", "--checkpoint.interval", "2"), show_progress=False) as trainer:  # fmt: skip
        trainer.train()
    assert tomllib.loads((tmp_path / "run" / "config.toml").read_text())["model"]["overrides"] == {"n_layers": 2}
    with Trainer(tiny_config(tmp_path, "--training.steps", "3", "--checkpoint.enable", "--checkpoint.interval", "2"),
                 show_progress=False) as trainer:  # fmt: skip
        assert trainer.state.step == 2  # resumed: tiny has 2 layers


def test_a_from_hf_run_resumes_without_the_folder_and_convert_checks_the_family(tmp_path, capfd):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=2048, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    transformers.LlamaForCausalLM(hf_config).save_pretrained(tmp_path / "hf")
    flags = ["--model.flavor", "from_hf", "--checkpoint.initial_load_path", str(tmp_path / "hf"),
             "--checkpoint.enable", "--checkpoint.interval", "1"]  # fmt: skip
    with Trainer(tiny_config(tmp_path, *flags, "--training.steps", "1"), show_progress=False) as trainer:
        trainer.train()
    code, _, err = run_cli(
        ["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "out"), "--model", "qwen3"], capfd
    )
    assert code == 2 and "holds a 'llama' model, not qwen3" in err
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "hf" / name).unlink()  # the folder is gone; the run recorded its config.json
    with Trainer(tiny_config(tmp_path, *flags, "--training.steps", "2"), show_progress=False) as trainer:
        assert trainer.state.step == 1 and trainer.model.args.dim == 32
        trainer.train()


def test_the_resolved_args_are_printed_when_overrides_are_given(tmp_path, capsys):
    with Trainer(
        tiny_config(tmp_path, "--model.overrides.n_layers", "1", "--training.steps", "1"), show_progress=False
    ):
        pass
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model args: "))
    assert "'n_layers': 1" in line and "'dim': " in line and "'vocab_size': " in line

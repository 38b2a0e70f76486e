"""lockstep.tools.evaluate.evaluation_config: the config a run folder is evaluated with is the run's own
(config.toml), then the overrides, then the evaluation's settings (weights from the folder, validation
on, no checkpoints, the scratch folder as the run folder); a folder that says nothing of its config, or a
training source with no validation split, is refused in words. No model is built."""

import pytest

from lockstep.config import dump_toml, load_config
from lockstep.config.errors import ConfigError
from lockstep.errors import InputError
from lockstep.tools.evaluate import evaluation_config
from tests.helpers import tiny_config


def _run_folder(tmp_path, *overrides: str):
    run = tmp_path / "trained"
    run.mkdir()
    (run / "config.toml").write_text(dump_toml(tiny_config(tmp_path, *overrides)))
    return run


def test_a_run_folder_is_evaluated_with_its_own_config_then_the_overrides(tmp_path):
    run = _run_folder(tmp_path, "--training.seq_len", "48", "--debug.seed", "11")
    scratch = tmp_path / "scratch"
    config = evaluation_config(run, None, ["--debug.seed", "13"], scratch)
    trained = tiny_config(tmp_path, "--training.seq_len", "48")
    assert (config.training.seq_len, config.model.flavor) == (trained.training.seq_len, trained.model.flavor)
    assert evaluation_config(run, None, [], scratch).debug.seed == 11
    assert config.debug.seed == 13  # the override wins over the run's 11
    assert config.job.dump_folder == str(scratch / "run")
    assert config.checkpoint.initial_load_path == str(run)
    assert not config.checkpoint.enable and not config.checkpoint.create_seed_checkpoint
    assert config.validation.enable and config.validation.dataset == "builtin"
    assert not config.fault_tolerance.enable and config.training.global_batch_size == -1
    named = evaluation_config(run, "llama3_debug", [], scratch)  # --config names another source
    assert named.training.seq_len == load_config("llama3_debug", []).training.seq_len
    assert named.checkpoint.initial_load_path == str(run)


def test_a_folder_without_a_config_or_a_split_is_refused(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        evaluation_config(tmp_path / "missing", None, [], tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no config.toml or checkpoint manifest"):
        evaluation_config(tmp_path / "empty", None, [], tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "a document"}\n')
    run = _run_folder(tmp_path, "--training.dataset", "json", "--training.dataset_path", str(corpus))
    with pytest.raises(ConfigError, match="validation.dataset"):
        evaluation_config(run, None, [], tmp_path)

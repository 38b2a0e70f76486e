"""Parameter counts from meta builds of a few blocks, against the published model cards; printed at
start and recorded in env.json."""

import json

import pytest

from lockstep.config.sections import ModelConfig
from lockstep.models.registry import model_args
from lockstep.models.size import parameter_counts
from lockstep.train.trainer import Trainer
from tests.helpers import tiny_config


@pytest.mark.parametrize(
    "name, flavor, vocab, total, active",
    [
        ("llama3", "1B", 128256, 1.24e9, 1.24e9),  # Llama 3.2 1B and 3B: tied embeddings
        ("llama3", "3B", 128256, 3.21e9, 3.21e9),
        ("llama3", "8B", 128256, 8.03e9, 8.03e9),
        ("deepseek_v3", "671B", 129280, 671e9, 37e9),
        ("qwen3_moe", "235B-A22B", 151936, 235e9, 22e9),
        ("qwen3_moe", "30B-A3B", 151936, 30.5e9, 3.3e9),
        ("qwen3", "0.6B", 151936, 0.6e9, 0.6e9),
    ],
)
def test_counts_match_the_model_cards(name, flavor, vocab, total, active):
    counts = parameter_counts(*model_args(ModelConfig(name=name, flavor=flavor), vocab, 4096))
    assert counts["total"] == pytest.approx(total, rel=0.02)
    assert counts["active"] == pytest.approx(active, rel=0.03)
    assert counts["non_embedding"] < counts["total"]


def test_the_counts_are_printed_and_recorded_in_env_json(tmp_path, capsys):
    with Trainer(tiny_config(tmp_path, "--training.steps", "1"), show_progress=False) as trainer:
        trainer.train()
    recorded = json.loads((tmp_path / "run" / "env.json").read_text())["parameters"]
    assert recorded == parameter_counts(*model_args(trainer.config.model, trainer.tokenizer.vocab_size, 32))
    assert (
        f"{recorded['total']:,} parameters, {recorded['non_embedding']:,} without embeddings" in capsys.readouterr().out
    )

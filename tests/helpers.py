"""Small builders shared by tests."""

from __future__ import annotations

import os

import torch

from lockstep.config import JobConfig, load_config
from lockstep.config.sections import ModelConfig
from lockstep.models.registry import model_args


def tiny_overrides(folder) -> list[str]:
    """CLI overrides for a seconds-long run: the tiny Llama on the built-in corpus, CPU."""
    return [
        "--job.dump_folder", str(folder / "run"),
        "--model.flavor", "tiny",
        "--training.steps", "6",
        "--training.local_batch_size", "2",
        "--training.seq_len", "32",
        "--training.device", "cpu",
        "--lr_scheduler.warmup_steps", "2",
        "--metrics.log_freq", "1",
        "--debug.seed", "7",
    ]  # fmt: skip


def tiny_config(folder, *overrides: str) -> JobConfig:
    """The tiny run's typed config, one process."""
    return load_config("llama3_debug", tiny_overrides(folder) + list(overrides))


def tiny_model(vocab_size: int = 97, seq_len: int = 32, seed: int = 0, flavor: str = "tiny") -> torch.nn.Module:
    spec, args = model_args(ModelConfig(flavor=flavor), vocab_size, seq_len)
    with torch.device("meta"):
        model = spec.build(args, "sdpa")
    model.init_weights(seed, "cpu")
    return model


def save_rank_weights(trainer, folder, tag: str = "final") -> None:
    """This rank's full weights (DTensors gathered), for merged_rank_weights."""
    torch.save(trainer.full_weights(), folder / f"weights.{tag}.{os.environ.get('RANK', '0')}.pt")


def merged_rank_weights(folder, tag: str = "final") -> dict[str, torch.Tensor]:
    """The whole model's weights, merged from every rank's stages; ranks that hold the same parameter
    must agree on it bitwise."""
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob(f"weights.{tag}.*.pt")):
        for name, value in torch.load(file).items():
            assert name not in weights or torch.equal(weights[name], value), f"ranks disagree on {name}"
            weights[name] = value
    return weights

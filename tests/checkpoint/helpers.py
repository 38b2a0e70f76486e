"""Runs that stop part-way (a signal after step k), and their results."""

from __future__ import annotations

import os
import signal
import threading
import time

import torch

from lockstep.run.folder import read_metrics
from lockstep.train.trainer import Trainer
from tests.helpers import merged_rank_weights, save_rank_weights, tiny_config

CHECKPOINTED = [
    "--checkpoint.enable", "--checkpoint.interval", "4", "--training.steps", "12",
    "--training.global_batch_size", "8", "--debug.deterministic",
]  # fmt: skip
EIGHT = ["--training.steps", "8"]


def stop_after(trainer: Trainer, step: int) -> None:
    """SIGTERM this process once the trainer has finished `step` (it then saves and stops)."""

    def watch() -> None:
        while trainer.state.step < step:
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def train(folder, overrides: list[str], stop_at: int = 0, tag: str = "final") -> None:
    """Train (to the end, or until a signal after step stop_at); each rank saves its full weights."""
    with Trainer(tiny_config(folder, *CHECKPOINTED, *overrides), show_progress=False) as trainer:
        if stop_at:
            stop_after(trainer, stop_at)
        trainer.train()
        save_rank_weights(trainer, folder, tag)


def result(folder, tag: str = "final") -> tuple[list[tuple], dict[str, torch.Tensor]]:
    weights = merged_rank_weights(folder, tag)
    return [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(folder / "run")], weights


def assert_bitwise(got, expected) -> None:
    (metrics, weights), (ref_metrics, ref_weights) = got, expected
    assert metrics == ref_metrics
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)


def _resume(folder, *overrides: str) -> int:
    with Trainer(tiny_config(folder, *CHECKPOINTED, *EIGHT, *overrides), show_progress=False) as trainer:
        return trainer.state.step

"""lockstep.tools.estimate.rank_step: the estimate's step, composed from the trainer's pieces, against
Trainer.train_step on gloo ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lockstep.tools.estimate.wire import WireCounter
from tests.distributed import run_on_ranks

VOCAB = 2048  # the built-in tokenizer's


def _trainer_and_rank_step_body(folder, overrides: list[str]) -> None:
    from lockstep.tools.estimate.rank_step import RankStep
    from lockstep.train.trainer import Trainer
    from tests.helpers import tiny_config

    config = tiny_config(folder, *overrides)
    with Trainer(config, show_progress=False) as trainer:
        counter = WireCounter(dist.get_rank(), 2)
        with counter:
            trainer.train_step()
        trained = counter.traffic.as_dict()
        # In the trainer's process group: a second init after its teardown could meet rank 0's old store.
        step = RankStep(
            config,
            trainer.dims,
            vocab_size=VOCAB,
            device=torch.device("cpu"),
            attention_backend="sdpa",
            ranks_per_node=2,
        )
        counter = WireCounter(dist.get_rank(), 2)
        with counter:
            step.run()
    estimated = counter.traffic.as_dict()
    gradients = [k for k in trained if k.startswith(("all_gather", "reduce_scatter", "all_reduce ("))]
    assert gradients and {k: trained[k] for k in gradients} == {k: estimated.get(k) for k in gradients}, (
        trained,
        estimated,
    )


def test_the_estimated_step_moves_what_the_trainers_step_moves(tmp_path):
    """The estimate's step (RankStep) is composed from the trainer's pieces: on FSDP 2 it moves what
    Trainer.train_step moves (FSDP's all-gathers, the canonical reduce-scatter, the canonical sums), call
    for call and byte for byte, so the two cannot drift apart unseen."""
    run_on_ranks(_trainer_and_rank_step_body, 2, tmp_path, ["--training.local_batch_size", "2"])

"""Each sample's loss in one training step, for spike records, ``lockstep inspect --losses`` and replay.

The step's samples run forward once more, with the weights the step started from, through the same
forward the training loss takes (ForwardBackward.summed_losses), without gradients, with the RNG
streams restored and MoE token counting paused, so training is not disturbed. Each rank takes its own
microbatches of the step (the loader's placement), one sample at a time; the sums land in global
slots that are summed over data-parallel ranks and pipeline stages, one non-zero term per slot.

Under pipeline parallelism the schedule fixes the microbatch, so a sample has its own loss only when
``pipeline_parallel_microbatch_size`` is 1; otherwise there are no per-sample losses (None).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lockstep.data.dataset import IGNORE_INDEX
from lockstep.data.loader import DataLoader, Microbatch, placement
from lockstep.models.common.moe import token_counting_paused
from lockstep.train.validation import rng_restored


@dataclass
class SampleLosses:
    samples: list[int]
    """Global sample indices of the step, in order."""
    summed: list[float]
    """Each sample's summed token cross-entropy (fp32 sums, as floats)."""
    tokens: list[int]
    """Each sample's loss-taking tokens."""

    def mean(self) -> list[float]:
        """Per-token loss of each sample (nan for a sample without loss-taking tokens)."""
        return [s / t if t else float("nan") for s, t in zip(self.summed, self.tokens, strict=True)]


@dataclass
class StepPlace:
    """Where this rank's microbatches sit in a step: what the loader's placement needs."""

    dp_rank: int
    dp_degree: int
    shard_degree: int
    pipelined: bool
    groups: list[dist.ProcessGroup | None]
    """Summed over in order: data-parallel ranks, then pipeline stages."""


def step_sample_losses(
    loader: DataLoader,
    step_start: int,
    summed_losses: Callable[[list[Microbatch]], list[torch.Tensor] | None],
    place: StepPlace,
    device: torch.device,
) -> SampleLosses | None:
    """The losses of the global batch starting at sample `step_start`; a collective over `place.groups`
    (every rank of the job calls it for the same step). None when samples share a pipeline microbatch."""
    per_microbatch, samples = loader.local_batch, loader.global_batch
    if place.pipelined and per_microbatch != 1:
        return None
    count = samples // per_microbatch
    mine = placement(count, place.dp_rank, place.dp_degree, place.shard_degree)
    sums = torch.zeros(2, samples, dtype=torch.float64, device=device)  # summed loss, tokens
    with torch.no_grad(), token_counting_paused(), rng_restored(device):
        microbatches = [loader.global_microbatch(step_start, j) for j in mine]
        singles = microbatches
        if not place.pipelined:
            singles = [
                Microbatch(mb.inputs[i : i + 1], mb.labels[i : i + 1])
                for mb in microbatches
                for i in range(len(mb.inputs))
            ]
        losses = summed_losses(singles)
    slots = [j * per_microbatch + i for j in mine for i in range(per_microbatch)]
    if losses is not None:
        sums[0, slots] = torch.cat([loss.reshape(1) for loss in losses]).double()
    sums[1, slots] = torch.tensor(
        [int((mb.labels[i] != IGNORE_INDEX).sum()) for mb in microbatches for i in range(len(mb.labels))],
        dtype=torch.float64, device=device,
    )  # fmt: skip
    if losses is None:  # an earlier pipeline stage: only the last one's losses count
        sums[1] = 0
    for group in (g for g in place.groups if g is not None):
        dist.all_reduce(sums, group=group)  # one non-zero term per slot in each sum: exact
    summed, tokens = sums.cpu().tolist()
    return SampleLosses(list(range(step_start, step_start + samples)), summed, [int(t) for t in tokens])

"""Per-sample losses of one step without a trainer: a fake loader whose sample g is all g's, and a fake
forward whose loss of a batch is the sum of its inputs, so each slot's expected value is known."""

import math
from types import SimpleNamespace

import pytest
import torch

from lockstep.data.dataset import IGNORE_INDEX
from lockstep.data.loader import Microbatch
from lockstep.models.common import moe
from lockstep.train.observe.sample_losses import SampleLosses, StepPlace, step_sample_losses

SEQ = 3


def _sample(g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample g: inputs all g; its first g % SEQ labels take no loss."""
    labels = torch.full((SEQ,), g)
    labels[: g % SEQ] = IGNORE_INDEX
    return torch.full((SEQ,), g), labels


def _loader(global_batch: int, local_batch: int) -> SimpleNamespace:
    def global_microbatch(step_start: int, j: int) -> Microbatch:
        samples = [_sample(step_start + j * local_batch + i) for i in range(local_batch)]
        return Microbatch(torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples]))

    return SimpleNamespace(global_batch=global_batch, local_batch=local_batch, global_microbatch=global_microbatch)


def _place(dp_rank: int = 0, dp_degree: int = 1, pipelined: bool = False) -> StepPlace:
    return StepPlace(dp_rank, dp_degree, 1, pipelined, groups=[None, None])


def _input_sums(batches: list[Microbatch]) -> list[torch.Tensor]:
    return [mb.inputs.float().sum() for mb in batches]


def test_each_sample_gets_its_own_loss_and_tokens_in_global_sample_order():
    """The forward sees one sample at a time (inputs of size 1), and sample g's sum lands in slot g."""
    seen = []

    def summed_losses(batches):
        seen.extend(len(mb.inputs) for mb in batches)
        return _input_sums(batches)

    losses = step_sample_losses(_loader(6, 2), 12, summed_losses, _place(), torch.device("cpu"))
    assert seen == [1] * 6
    assert losses.samples == list(range(12, 18))
    assert losses.summed == [SEQ * g for g in range(12, 18)]
    assert losses.tokens == [SEQ - g % SEQ for g in range(12, 18)]


def test_data_parallel_ranks_fill_only_their_own_slots_and_sum_to_the_whole_step():
    """Summed over ranks (the all-reduce), each slot has one non-zero term: the one-rank result."""
    loader, cpu = _loader(8, 2), torch.device("cpu")
    whole = step_sample_losses(loader, 0, _input_sums, _place(), cpu)
    ranks = [step_sample_losses(loader, 0, _input_sums, _place(rank, 2), cpu) for rank in (0, 1)]
    assert ranks[1].summed[:4] == [0.0] * 4 and ranks[1].tokens[:4] == [0] * 4  # rank 1 holds samples 4-7
    assert [a + b for a, b in zip(ranks[0].summed, ranks[1].summed, strict=True)] == whole.summed
    assert [a + b for a, b in zip(ranks[0].tokens, ranks[1].tokens, strict=True)] == whole.tokens


def test_the_step_leaves_the_rng_and_the_moe_token_counting_as_they_were():
    counting = []

    def summed_losses(batches):
        counting.append(moe._counting[0])
        torch.rand(5)  # a forward that draws (dropout) must not shift training's stream
        return _input_sums(batches)

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    step_sample_losses(_loader(2, 1), 0, summed_losses, _place(), torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)
    assert counting == [False] and moe._counting[0]


def test_pipelined_samples_sharing_a_microbatch_have_no_losses_of_their_own():
    def never(batches):
        raise AssertionError("no forward is run")

    assert step_sample_losses(_loader(4, 2), 0, never, _place(pipelined=True), torch.device("cpu")) is None


@pytest.mark.parametrize("last_stage", [True, False])
def test_under_pipelining_only_the_last_stage_contributes(last_stage):
    """A stage without the loss (summed_losses gives None) adds zeros: the tokens are the last stage's."""

    def summed_losses(batches):
        assert all(len(mb.inputs) == 1 for mb in batches)  # the schedule's microbatches, not split again
        return _input_sums(batches) if last_stage else None

    losses = step_sample_losses(_loader(3, 1), 3, summed_losses, _place(pipelined=True), torch.device("cpu"))
    assert losses.summed == ([9.0, 12.0, 15.0] if last_stage else [0.0] * 3)
    assert losses.tokens == ([3, 2, 1] if last_stage else [0] * 3)


def test_the_mean_is_per_token_and_nan_for_a_sample_without_loss_taking_tokens():
    mean = SampleLosses([0, 1], [6.0, 0.0], [3, 0]).mean()
    assert mean[0] == 2.0 and math.isnan(mean[1])

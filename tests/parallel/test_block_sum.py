"""Blocks of a global batch summed across replica groups rebuild the one-process tree bit for bit."""

import random

import pytest
import torch

from lockstep.parallel.block_sum import blocks_of, combine_blocks
from lockstep.parallel.canonical import TreeSum


def leaves(count: int, size: int = 257, seed: int = 0) -> list[torch.Tensor]:
    """Values spread over many magnitudes, so any change of summation order shows in the last bits."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=generator) * 10.0 ** torch.randint(-3, 4, (size,), generator=generator)
            for _ in range(count)]  # fmt: skip


def one_process(values: list[torch.Tensor]) -> torch.Tensor:
    total = TreeSum()
    for v in values:
        total.add([v.clone()])
    return total.result()[0]


def block_sum(values: list[torch.Tensor]) -> torch.Tensor:
    return one_process(values)  # a block of 2^k leaves: its own complete tree


@pytest.mark.parametrize("leaves_count,blocks", [(8, 4), (12, 3), (6, 3), (16, 2), (10, 5)])
def test_tree_sum_fed_aligned_blocks_equals_the_leaves(leaves_count, blocks):
    values = leaves(leaves_count)
    per_block = leaves_count // blocks
    if per_block & (per_block - 1):
        pytest.skip("blocks must be powers of two")
    level = per_block.bit_length() - 1
    total = TreeSum()
    for b in range(blocks):
        total.add([block_sum(values[b * per_block : (b + 1) * per_block])], level=level)
    assert torch.equal(total.result()[0], one_process(values))


def test_a_different_order_would_show():
    """The check above can fail: summing the same blocks left to right differs from the tree."""
    values = leaves(8)
    left_to_right = values[0].clone()
    for v in values[1:]:
        left_to_right += v
    assert not torch.equal(left_to_right, one_process(values))


def simulated_groups(num_blocks: int, participants: int, values: list[torch.Tensor], level: int) -> list[torch.Tensor]:
    """Every live group's combine_blocks, its managed all-reduce simulated as a sum of all groups'
    buffers in a random order (the backend's order is not ours to choose)."""
    per_block = 2**level
    mine = [
        {b: block_sum(values[b * per_block : (b + 1) * per_block]) for b in blocks_of(p, participants, num_blocks)}
        for p in range(participants)
    ]
    if participants == 1:
        return [combine_blocks(mine[0], num_blocks, level, lambda tensor: pytest.fail("nothing to exchange"))]
    buffers: list[torch.Tensor] = []
    results = [None] * participants

    def collect(p):
        def sum_across_groups(tensor: torch.Tensor) -> None:
            buffers.append(tensor.clone())

        return sum_across_groups

    # First pass: every group hands its buffer over; then the "all-reduce" adds them in a random order.
    for p in range(participants):
        combine_blocks({b: v.clone() for b, v in mine[p].items()}, num_blocks, level, collect(p))
    order = list(range(participants))
    random.Random(1).shuffle(order)
    reduced = buffers[order[0]].clone()
    for p in order[1:]:
        reduced += buffers[p]

    def delivered(tensor: torch.Tensor) -> None:
        tensor.copy_(reduced)

    for p in range(participants):
        results[p] = combine_blocks({b: v.clone() for b, v in mine[p].items()}, num_blocks, level, delivered)
    return results


@pytest.mark.parametrize("participants", [1, 2, 3, 4])
def test_any_number_of_live_groups_gives_the_one_process_bits(participants):
    """Four blocks of two microbatches; 1, 2, 3 (not a power of two) or 4 groups alive."""
    values = leaves(8)
    for result in simulated_groups(4, participants, values, level=1):
        assert torch.equal(result, one_process(values))


def test_two_groups_of_two_blocks_use_a_plain_sum():
    values = leaves(4)
    for result in simulated_groups(2, 2, values, level=1):
        assert torch.equal(result, one_process(values))


def test_signed_zeros_and_nan_payloads_cross_unchanged():
    """The slots travel as int32 bit patterns: -0.0 stays -0.0 (a float sum with zeros would not)."""
    block = torch.tensor([-0.0, 1.5, float("nan")])
    received = []

    def sum_across_groups(bits: torch.Tensor) -> None:
        assert bits.dtype == torch.int32
        received.append(bits.clone())

    combine_blocks({0: block.clone()}, 3, 0, sum_across_groups)
    slots = received[0].view(torch.float32)
    assert torch.equal(slots[0].view(torch.int32), block.view(torch.int32))
    assert torch.equal(slots[1].view(torch.int32), torch.zeros(3, dtype=torch.int32))


def test_blocks_are_shared_contiguously_and_completely():
    for num_blocks in range(1, 9):
        for participants in range(1, num_blocks + 1):
            shares = [blocks_of(p, participants, num_blocks) for p in range(participants)]
            assert sorted(b for share in shares for b in share) == list(range(num_blocks))
            assert all(share and share == list(range(share[0], share[-1] + 1)) for share in shares)
    with pytest.raises(ValueError):
        blocks_of(0, 5, 4)

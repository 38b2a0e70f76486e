"""The sum over replica groups of the blocks of a global batch, in the canonical tree order.

Under fault tolerance a step's global batch is cut into fixed blocks, one per replica group at full
strength; each live group computes the canonical subtree of one or more blocks (all of them when it
is alone). Every block holds 2^k microbatches and starts at a multiple of 2^k, so it is a node of the
canonical tree over the global microbatch index, and feeding the block sums to ``TreeSum`` at level k
in block order rebuilds the one-process tree bit for bit (lockstep.parallel.canonical).

Moving the block sums between groups must not add in an order the backend picks. Each group writes
its blocks into their own slots of a zeroed [blocks, n] buffer, and the buffers are summed as int32
bit patterns: every slot has exactly one non-zero contributor, integer addition is exact in any
order, and the bits (signed zeros and NaN payloads included) arrive unchanged. With two blocks held
by two groups the buffer is skipped: a + b == b + a bitwise, so a float sum of the two is exact.
The price is blocks x n elements moved instead of n; groups are few, and the buffers are the
gradients of one rank of a group (FSDP shards under FSDP).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lockstep.parallel.canonical import TreeSum

SumAcrossGroups = Callable[[torch.Tensor], None]
"""Sums a tensor in place over the live replica groups (torchft's managed all-reduce)."""


def blocks_of(participant: int, participants: int, num_blocks: int) -> list[int]:
    """The blocks a live group computes: a contiguous share, the same on every group for a given quorum."""
    if not 0 <= participant < participants <= num_blocks:
        raise ValueError(f"participant {participant} of {participants} cannot share {num_blocks} blocks")
    return [b for b in range(num_blocks) if b * participants // num_blocks == participant]


def combine_blocks(
    mine: dict[int, torch.Tensor], num_blocks: int, level: int, sum_across_groups: SumAcrossGroups
) -> torch.Tensor:
    """The canonical sum of all `num_blocks` block sums, on every group alike; `mine` holds this
    group's blocks (flat fp32 vectors of one length, by block index), each the sum of 2^`level`
    microbatches."""
    if len(mine) == num_blocks:  # this group computed every block: nothing to exchange
        sums = [mine[b] for b in range(num_blocks)]
    elif num_blocks == 2 and len(mine) == 1:
        (only,) = mine.values()
        sum_across_groups(only)  # two operands: one addition, the same bits in either order
        return only
    else:
        sums = list(_exchange_slots(mine, num_blocks, sum_across_groups))
    total = TreeSum()
    for block_sum in sums:
        total.add([block_sum], level=level)
    return total.result()[0]


def _exchange_slots(mine: dict[int, torch.Tensor], num_blocks: int, sum_across_groups: SumAcrossGroups):
    first = next(iter(mine.values()))
    if first.dtype != torch.float32 or any(v.shape != first.shape for v in mine.values()):
        raise ValueError("block sums must be flat fp32 vectors of one length")
    slots = torch.zeros(num_blocks, first.numel(), dtype=torch.float32, device=first.device)
    for block, block_sum in mine.items():
        slots[block] = block_sum
    bits = slots.view(torch.int32)
    sum_across_groups(bits)
    return bits.view(torch.float32).unbind(0)

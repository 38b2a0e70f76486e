"""The canonical summation order written independently of lockstep.parallel, for tests to compare its
sums with bit for bit (docs/layout-invariance.md): pairwise halving inside a power-of-two run, and the
runs of the count's binary digits added left to right."""

from __future__ import annotations

import torch


def pairwise(rows: list[torch.Tensor]) -> torch.Tensor:
    """A power-of-two run summed as a balanced tree: (0 + 1) + (2 + 3), and so on up."""
    if len(rows) == 1:
        return rows[0].clone()
    half = len(rows) // 2
    return pairwise(rows[:half]) + pairwise(rows[half:])


def canonical(rows: list[torch.Tensor]) -> torch.Tensor:
    """The binary-counter tree: 7 = 4 + 2 + 1 is ((pairwise 0-3) + (pairwise 4-5)) + row 6."""
    total, start = None, 0
    for bit in reversed(range(len(rows).bit_length())):
        if len(rows) >> bit & 1:
            run = pairwise(rows[start : start + (1 << bit)])
            total = run if total is None else total + run
            start += 1 << bit
    return total

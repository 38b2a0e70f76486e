"""Where each element of a lockstep parameter lives in a Hugging Face checkpoint, so that a rank can
read only the part of the checkpoint its shard of the parameter covers (instead of converting the
whole model and slicing it afterwards).

A model's Hugging Face adapter describes each parameter as a set of boxes (``HFPiece``), each copied
from a box of one Hugging Face tensor, plus at most one transform that acts on whole blocks of rows
(Llama's q/k row permutation within each head). Checkpoint readers intersect these boxes with the
shard they hold; the model code stays free of any knowledge of sharding or storage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HFPiece:
    """The box of a lockstep parameter at `at` (one offset per lockstep dim) of extent `size` is the
    box of Hugging Face tensor `name` at `hf_at`. When the Hugging Face tensor has fewer dims (one
    tensor per expert), the piece's leading lockstep dims have extent 1 and are dropped."""

    name: str
    hf_shape: tuple[int, ...]
    """The whole Hugging Face tensor's shape, checked against the checkpoint before anything is read."""
    at: tuple[int, ...]
    size: tuple[int, ...]
    hf_at: tuple[int, ...]


@dataclass(frozen=True)
class HFSource:
    """How one lockstep parameter is read from a Hugging Face checkpoint."""

    pieces: tuple[HFPiece, ...]
    row_block: int = 0
    """When non-zero, `rows_from_hf` must see whole blocks of this many rows (dim 0)."""
    rows_from_hf: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Maps rows read in Hugging Face order to lockstep order; row-local per block of `row_block`
    rows, so it can be applied to any block-aligned range of rows on its own."""


def whole(name: str, shape: torch.Size | tuple[int, ...]) -> HFPiece:
    """A lockstep parameter that is one Hugging Face tensor of the same shape."""
    shape = tuple(shape)
    return HFPiece(name, shape, (0,) * len(shape), shape, (0,) * len(shape))

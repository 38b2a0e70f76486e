"""Initial values are a function of (seed, name, element index): any box of a parameter can be drawn
alone and equals that part of the whole."""

import pytest
import torch

from lockstep.models.common import init as init_fns


def _init_for(name: str) -> init_fns.InitFn:
    return init_fns.ones if name.endswith("norm") else init_fns.trunc_normal(0.02)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(init_fns, "BLOCK_ELEMENTS", 24)  # 3 rows of 8, so boxes straddle blocks


@pytest.mark.parametrize(
    "shape, offset, local_shape",
    [
        ((10, 8), (4, 0), (5, 8)),  # rows 4..8: parts of blocks 1 and 2
        ((10, 8), (0, 4), (10, 4)),  # columns 4..7 (a row-parallel shard)
        ((10, 8), (2, 2), (7, 3)),  # both
        ((5, 4, 9), (1, 0, 0), (3, 4, 9)),  # rows of 36 elements: one block each
        ((50,), (17,), (20,)),  # a vector: blocks of 24 elements
    ],
)
def test_a_box_equals_that_part_of_the_full_value(small_blocks, shape, offset, local_shape):
    full = init_fns.full_value("w", torch.Size(shape), 5, _init_for)
    box = init_fns.initial_values("w", shape, 5, _init_for, offset, local_shape)
    assert torch.equal(box, full[tuple(slice(o, o + n) for o, n in zip(offset, local_shape, strict=True))])


def test_blocks_are_independent_draws(small_blocks):
    full = init_fns.full_value("w", torch.Size((9, 8)), 5, _init_for)
    assert not torch.equal(full[:3], full[3:6])
    assert not torch.equal(full, init_fns.full_value("v", torch.Size((9, 8)), 5, _init_for))
    assert torch.equal(init_fns.full_value("norm", torch.Size((30,)), 5, _init_for), torch.ones(30))

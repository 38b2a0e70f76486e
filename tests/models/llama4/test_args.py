"""Llama 4 text flavors: published parameter counts."""

import pytest

from lockstep.models.llama4 import LLAMA4_FLAVORS
from lockstep.models.registry import model_spec
from lockstep.models.size import parameter_counts
from tests.models.llama4.helpers import _meta

# Model cards (huggingface.co/meta-llama): Scout "17B activated, 109B total", Maverick "17B activated,
# 400B total". The totals include the vision encoder, which lockstep leaves out, so the text models
# count a little less: (flavor, total text parameters in billions, activated).
PUBLISHED = [("17B-16E", 109, 17), ("17B-128E", 400, 17)]


@pytest.mark.parametrize("flavor, total, activated", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_parameter_counts_match_the_model_cards(flavor, total, activated):
    args = LLAMA4_FLAVORS[flavor]
    model = _meta(args)
    count = sum(p.numel() for p in model.parameters())
    idle = args.n_moe_blocks * 3 * args.dim * args.moe_inter_dim * (args.n_routed_experts - args.n_activated_experts)
    assert round((count - idle) / 1e9) == activated  # 17.17B in both
    assert 0.98 * total <= count / 1e9 <= 1.01 * total  # Scout 107.8B of 109B, Maverick 400.7B of 400B
    counts = parameter_counts(model_spec("llama4"), args)  # what the trainer prints, from a few blocks
    assert counts["total"] == count and counts["active"] == count - idle

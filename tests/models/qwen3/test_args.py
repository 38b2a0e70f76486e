"""Qwen3 flavors, dense and MoE: published parameter counts and shapes."""

import pytest

from lockstep.models.qwen3 import QWEN3_FLAVORS, QWEN3_MOE_FLAVORS, Qwen3
from tests.models.qwen3.helpers import _meta

# Published sizes, from the model cards on huggingface.co/Qwen ("Number of Parameters" and
# "Number of Parameters (Non-Embedding)"; for the MoE models "Number of Activated Parameters"):
# (flavor, total, non-embedding or activated, the digits after the point they are given to).
DENSE_PUBLISHED = [
    ("0.6B", 0.6, 0.44, 2),  # Qwen3-0.6B: 0.6B, 0.44B non-embedding
    ("1.7B", 1.7, 1.4, 1),  # Qwen3-1.7B: 1.7B, 1.4B
    ("4B", 4.0, 3.6, 1),  # Qwen3-4B: 4.0B, 3.6B
    ("8B", 8.2, 6.95, 2),  # Qwen3-8B: 8.2B, 6.95B
    ("14B", 14.8, 13.2, 1),  # Qwen3-14B: 14.8B, 13.2B
    ("32B", 32.8, 31.2, 1),  # Qwen3-32B: 32.8B, 31.2B
]


MOE_PUBLISHED = [
    ("30B-A3B", 30.5, 29.9, 3.3, 1),  # Qwen3-30B-A3B: 30.5B total, 29.9B non-embedding, 3.3B activated
    ("235B-A22B", 235, 234, 22, 0),  # Qwen3-235B-A22B: 235B total, 234B non-embedding, 22B activated
]


def _embedding_params(model: Qwen3) -> int:
    """The embedding, and the output projection unless it is the same tensor."""
    return sum(p.numel() for name, p in model.named_parameters() if name in ("tok_embeddings.weight", "output.weight"))


@pytest.mark.parametrize("flavor, total, non_embedding, digits", DENSE_PUBLISHED, ids=[f[0] for f in DENSE_PUBLISHED])
def test_dense_parameter_counts_match_the_model_cards(flavor, total, non_embedding, digits):
    model = _meta(QWEN3_FLAVORS[flavor])
    count = sum(p.numel() for p in model.parameters())  # a tied matrix counts once
    assert round(count / 1e9, 1) == total
    assert round((count - _embedding_params(model)) / 1e9, digits) == non_embedding
    assert (model.output.weight is model.tok_embeddings.weight) == (flavor in ("0.6B", "1.7B", "4B"))


@pytest.mark.parametrize(
    "flavor, total, non_embedding, activated, digits", MOE_PUBLISHED, ids=[f[0] for f in MOE_PUBLISHED]
)
def test_moe_parameter_counts_match_the_model_cards(flavor, total, non_embedding, activated, digits):
    args = QWEN3_MOE_FLAVORS[flavor]
    model = _meta(args)
    count = sum(p.numel() for p in model.parameters())
    idle_experts = args.n_routed_experts - args.n_activated_experts
    active = count - args.n_layers * 3 * args.dim * args.moe_inter_dim * idle_experts
    assert round(count / 1e9, digits) == total
    assert round((count - _embedding_params(model)) / 1e9, digits) == non_embedding
    # Activated, embeddings included: 3.353B and 22.19B; the 30B card cuts 3.35 to 3.3 rather than rounding.
    assert abs(active / 1e9 - activated) < 0.6 * 10**-digits


def test_flavors_have_qwen3_shapes():
    for table in (QWEN3_FLAVORS, QWEN3_MOE_FLAVORS):
        for name, args in table.items():
            assert (args.head_dim, args.rope_theta, args.norm_eps) == (128 if name != "debug" else 64, 1e6, 1e-6)
            assert args.vocab_size == (-1 if name == "debug" else 151936)  # debug: the tokenizer's
    assert QWEN3_FLAVORS["debug"].tie_embeddings and not QWEN3_MOE_FLAVORS["debug"].tie_embeddings
    assert QWEN3_FLAVORS["0.6B"].n_heads * QWEN3_FLAVORS["0.6B"].head_dim != QWEN3_FLAVORS["0.6B"].dim

"""Llama 3's tensor/sequence-parallel plan (Megatron-style, see lockstep.models.common.parallel_plan),
declared once, applied by lockstep.parallel: heads and the SwiGLU split, the residual stream sequence
sharded, the output projection split by vocabulary."""

from __future__ import annotations

from lockstep.models.common.parallel_plan import check_divides, grouped_query_decoder_plan

tensor_parallel_plan = grouped_query_decoder_plan
"""(model or pipeline stage, loss_parallel) -> {module name: ParallelStyle}."""


def check_tensor_parallel_degree(args, degree: int) -> str | None:
    """Why `degree` cannot split this model's heads and features, or None if it can."""
    return check_divides(
        degree, (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads), ("ffn hidden dim", args.ffn_hidden_dim))
    )

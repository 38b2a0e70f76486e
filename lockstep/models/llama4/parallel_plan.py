"""Llama 4's tensor/sequence-parallel plan (Megatron-style, see lockstep.models.common.parallel_plan):
attention heads split as Llama 3's (its QK-norm has no weight, its temperature none either, so nothing
is shared across heads), dense SwiGLU blocks split, MoE blocks (shared expert included) whole on every
tensor-parallel rank (their experts are split by expert parallelism instead), the output projection
split by vocabulary."""

from __future__ import annotations

from lockstep.models.common.parallel_plan import check_divides, grouped_query_decoder_plan

tensor_parallel_plan = grouped_query_decoder_plan
"""(model or pipeline stage, loss_parallel) -> {module name: ParallelStyle}."""


def check_tensor_parallel_degree(args, degree: int) -> str | None:
    """Why `degree` cannot split this model's heads and dense blocks, or None if it can."""
    sizes = (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads))
    if args.n_moe_blocks < args.n_layers:
        sizes += (("ffn_hidden_dim", args.ffn_hidden_dim),)
    return check_divides(degree, sizes)

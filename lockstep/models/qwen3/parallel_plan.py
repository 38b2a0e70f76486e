"""Qwen3's tensor/sequence-parallel plan (Megatron-style, see lockstep.models.common.parallel_plan):
attention heads split as Llama's, the QK-norm weights (shared by all heads) with their gradient summed
over the ranks, dense SwiGLU blocks split, MoE blocks whole on every tensor-parallel rank (their
experts are split by expert parallelism instead), the output projection, and a tied embedding with
it, split by vocabulary."""

from __future__ import annotations

from lockstep.models.common.parallel_plan import check_divides, grouped_query_decoder_plan

tensor_parallel_plan = grouped_query_decoder_plan
"""(model or pipeline stage, loss_parallel) -> {module name: ParallelStyle}."""


def check_tensor_parallel_degree(args, degree: int) -> str | None:
    """Why `degree` cannot split this model's heads (and dense features), or None if it can."""
    sizes = (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads))
    if not args.is_moe:
        sizes += (("ffn_hidden_dim", args.ffn_hidden_dim),)
    return check_divides(degree, sizes)

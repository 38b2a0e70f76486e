"""Qwen3 decoder, dense or mixture-of-experts, single-device code: grouped-query attention with
QK-norm (an RMSNorm over each head's q and k, before RoPE), an explicit head_dim, SwiGLU blocks or
MoE blocks (softmax top-k router, renormalised weights, no shared expert; lockstep.models.common.moe),
and optionally an output projection tied to the embedding.

The same decoder contract as Llama 3 and DeepSeek-V3 (tok_embeddings, a ``layers`` ModuleDict, norm,
output), so pipelining, FSDP, tensor and expert parallelism apply from outside unchanged.
"""

from __future__ import annotations

import torch

from lockstep.models.common.attention import GroupedQueryAttention
from lockstep.models.common.decoder import Decoder, TransformerBlock
from lockstep.models.common.feed_forward import FeedForward
from lockstep.models.common.moe import MoE, Router
from lockstep.models.common.rope import rope_cos_sin
from lockstep.models.qwen3.args import Qwen3Args


def _block(a: Qwen3Args) -> TransformerBlock:
    attention = GroupedQueryAttention(
        a.dim, n_heads=a.n_heads, n_kv_heads=a.kv_heads, head_dim=a.head_dim, qk_norm_eps=a.norm_eps
    )
    if not a.is_moe:
        return TransformerBlock(
            a.dim, norm_eps=a.norm_eps, attention=attention, feed_forward=FeedForward(a.dim, a.ffn_hidden_dim)
        )
    router = Router(
        a.dim, num_experts=a.n_routed_experts, top_k=a.n_activated_experts, score_func="softmax", num_groups=1, num_limited_groups=1,
        route_scale=1.0, norm_topk_prob=a.norm_topk_prob,
    )  # fmt: skip
    moe = MoE(a.dim, hidden_dim=a.moe_inter_dim, num_experts=a.n_routed_experts, num_shared=0, router=router)
    moe.seq_aux_loss_alpha = a.seq_aux_loss_alpha
    return TransformerBlock(a.dim, norm_eps=a.norm_eps, attention=attention, moe=moe)


class Qwen3(Decoder):
    """Build on the meta device, apply parallelism, then ``init_weights``."""

    depth_scaled = (
        "attention.wo.weight",
        "feed_forward.w2.weight",
        "feed_forward.w3.weight",
        "experts.w2",
        "experts.w3",
    )

    def __init__(self, args: Qwen3Args, attention_backend: str = "sdpa") -> None:
        super().__init__(args, attention_backend, {str(i): _block(args) for i in range(args.n_layers)})

    def _rope_table(self, device: torch.device | str) -> torch.Tensor:
        a = self.args
        return rope_cos_sin(a.head_dim, a.max_seq_len, a.rope_theta, None, device=device)

    def num_flops_per_token(self, seq_len: int) -> int:
        """6 x active parameters per token but the embedding (a tied output projection counts: it is a
        matmul), plus 12 x layers x heads x head_dim x seq_len for attention scores and values."""
        a = self.args
        weights = sum(p.numel() for _, p in self.named_parameters(remove_duplicate=False))
        weights -= self.tok_embeddings.weight.numel()
        inactive = a.n_layers * 3 * a.dim * a.moe_inter_dim * (a.n_routed_experts - a.n_activated_experts)
        return 6 * (weights - inactive) + 12 * a.n_layers * a.n_heads * a.head_dim * seq_len

"""Llama 4 text decoder, single-device code: grouped-query attention in two kinds of blocks (RoPE
blocks with chunked local attention and a weightless QK-norm; every fourth block NoPE, attending over
the whole window with a position-dependent temperature), dense SwiGLU blocks interleaved with MoE
blocks (top-1 sigmoid router, the score applied to each token before its expert, one shared expert).

The same decoder contract as Llama 3 (tok_embeddings, a ``layers`` ModuleDict, norm, output), so
pipelining, FSDP, tensor and expert parallelism apply from outside unchanged. The masks of both block
kinds are built once per microbatch (lockstep.models.common.masks).
"""

from __future__ import annotations

import torch

from lockstep.models.common.attention import AttentionTemperature, GroupedQueryAttention
from lockstep.models.common.decoder import Decoder, TransformerBlock
from lockstep.models.common.feed_forward import FeedForward
from lockstep.models.common.moe import MoE, Router
from lockstep.models.common.rope import rope_cos_sin
from lockstep.models.llama4.args import Llama4Args


def _attention(a: Llama4Args, layer_id: int) -> GroupedQueryAttention:
    rope = a.uses_rope(layer_id)
    temperature = None
    if not rope and a.attn_temperature_tuning:
        temperature = AttentionTemperature(floor_scale=a.floor_scale, attn_scale=a.attn_scale)
    return GroupedQueryAttention(
        a.dim, n_heads=a.n_heads, n_kv_heads=a.kv_heads, head_dim=a.head_dim,
        l2_qk_norm_eps=a.norm_eps if rope and a.use_qk_norm else None, rope=rope, temperature=temperature,
        chunked=rope and a.attention_chunk_size is not None,
    )  # fmt: skip


def _block(a: Llama4Args, layer_id: int) -> TransformerBlock:
    attention = _attention(a, layer_id)
    if not a.is_moe_block(layer_id):
        return TransformerBlock(
            a.dim, norm_eps=a.norm_eps, attention=attention, feed_forward=FeedForward(a.dim, a.ffn_hidden_dim)
        )
    router = Router(
        a.dim, num_experts=a.n_routed_experts, top_k=a.n_activated_experts, score_func="sigmoid", num_groups=1,
        num_limited_groups=1, route_scale=1.0, norm_topk_prob=False,
    )  # fmt: skip
    moe = MoE(
        a.dim, hidden_dim=a.moe_inter_dim, num_experts=a.n_routed_experts, num_shared=a.n_shared_experts,
        router=router, score_before_experts=True,
    )  # fmt: skip
    moe.seq_aux_loss_alpha = a.seq_aux_loss_alpha
    return TransformerBlock(a.dim, norm_eps=a.norm_eps, attention=attention, moe=moe)


class Llama4(Decoder):
    """Build on the meta device, apply parallelism, then ``init_weights``."""

    depth_scaled = ("attention.wo.weight", ".w2.weight", ".w3.weight", "experts.w2", "experts.w3")

    def __init__(self, args: Llama4Args, attention_backend: str = "sdpa") -> None:
        super().__init__(args, attention_backend, {str(i): _block(args, i) for i in range(args.n_layers)})

    def _rope_table(self, device: torch.device | str) -> torch.Tensor:
        a = self.args
        return rope_cos_sin(a.head_dim, a.max_seq_len, a.rope_theta, a.rope_scaling, device=device)

    def num_flops_per_token(self, seq_len: int) -> int:
        """6 x active parameters per token but the embedding, plus attention scores and values: 12 x heads
        x head_dim x the keys each query sees on average (the window on NoPE blocks, at most a chunk on
        the chunked ones)."""
        a = self.args
        weights = sum(p.numel() for _, p in self.named_parameters(remove_duplicate=False))
        weights -= self.tok_embeddings.weight.numel()
        inactive = a.n_moe_blocks * 3 * a.dim * a.moe_inter_dim * (a.n_routed_experts - a.n_activated_experts)
        attended = sum(
            min(seq_len, a.attention_chunk_size) if a.uses_rope(i) and a.attention_chunk_size else seq_len
            for i in range(a.n_layers)
        )
        return 6 * (weights - inactive) + 12 * a.n_heads * a.head_dim * attended

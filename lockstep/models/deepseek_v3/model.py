"""DeepSeek-V3 decoder, single-device code: multi-head latent attention (low-rank q and kv
projections, RoPE on a decoupled part of q and on one key part shared by all heads), dense SwiGLU
blocks first, then mixture-of-experts blocks (lockstep.models.common.moe).

It follows the same decoder contract as Llama 3 (tok_embeddings, a ``layers`` ModuleDict, norm,
output, parts may be None in a pipeline stage), so pipelining and FSDP apply unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from lockstep.models.common.attention import SharedAcrossHeads, attention
from lockstep.models.common.decoder import Decoder, TransformerBlock
from lockstep.models.common.feed_forward import FeedForward
from lockstep.models.common.kv_cache import LayerCache
from lockstep.models.common.masks import AttentionMasks
from lockstep.models.common.moe import MoE, Router
from lockstep.models.common.rope import apply_rope, rope_cos_sin
from lockstep.models.deepseek_v3.args import DeepSeekV3Args


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, a: DeepSeekV3Args) -> None:
        super().__init__()
        self.nope_dim, self.rope_dim, self.v_dim = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        if a.q_lora_rank == 0:
            self.wq = nn.Linear(a.dim, a.n_heads * a.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(a.dim, a.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(a.q_lora_rank, eps=1e-6)
            self.wq_b = nn.Linear(a.q_lora_rank, a.n_heads * a.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(a.dim, a.kv_lora_rank + a.qk_rope_head_dim, bias=False)
        self.kv_norm = nn.RMSNorm(a.kv_lora_rank, eps=1e-6)
        self.wkv_b = nn.Linear(a.kv_lora_rank, a.n_heads * (a.qk_nope_head_dim + a.v_head_dim), bias=False)
        self.wo = nn.Linear(a.n_heads * a.v_head_dim, a.dim, bias=False)
        self.share_rope = SharedAcrossHeads()
        self.softmax_scale = a.softmax_scale

    def forward(
        self, x_BSD: torch.Tensor, cos_sin: torch.Tensor, masks: AttentionMasks | None, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """`cache` (decoding): store this step's decompressed per-head k/v and attend over all cached."""
        batch, seq_len, _ = x_BSD.shape
        q = self.wq(x_BSD) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x_BSD)))
        q_nope, q_rope = q.view(batch, seq_len, -1, self.nope_dim + self.rope_dim).split(
            [self.nope_dim, self.rope_dim], dim=-1
        )
        latent, k_rope = self.wkv_a(x_BSD).split([self.wkv_b.in_features, self.rope_dim], dim=-1)
        kv = self.wkv_b(self.kv_norm(latent)).view(batch, seq_len, -1, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_rope = self.share_rope(apply_rope(k_rope.unsqueeze(2), cos_sin), k_nope.shape[2])
        q = torch.cat([q_nope, apply_rope(q_rope, cos_sin)], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v)
        out = attention(q, k, v, masks, self.softmax_scale)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))


def _block(a: DeepSeekV3Args, layer_id: int) -> TransformerBlock:
    attention = MultiHeadLatentAttention(a)
    if layer_id < a.n_dense_layers:
        return TransformerBlock(
            a.dim, norm_eps=a.norm_eps, attention=attention, feed_forward=FeedForward(a.dim, a.inter_dim)
        )
    router = Router(
        a.dim, num_experts=a.n_routed_experts, top_k=a.n_activated_experts, score_func=a.score_func, num_groups=a.n_expert_groups,
        num_limited_groups=a.n_limited_groups, route_scale=a.route_scale, norm_topk_prob=a.norm_topk_prob,
    )  # fmt: skip
    moe = MoE(
        a.dim, hidden_dim=a.moe_inter_dim, num_experts=a.n_routed_experts, num_shared=a.n_shared_experts, router=router
    )
    moe.seq_aux_loss_alpha = a.seq_aux_loss_alpha
    return TransformerBlock(a.dim, norm_eps=a.norm_eps, attention=attention, moe=moe)


class DeepSeekV3(Decoder):
    """Build on the meta device, apply parallelism, then ``init_weights``."""

    depth_scaled = ("attention.wo.weight", ".w2.weight", ".w3.weight", "experts.w2", "experts.w3")

    def __init__(self, args: DeepSeekV3Args, attention_backend: str = "sdpa") -> None:
        super().__init__(args, attention_backend, {str(i): _block(args, i) for i in range(args.n_layers)})

    def _rope_table(self, device) -> torch.Tensor:
        a = self.args
        return rope_cos_sin(a.qk_rope_head_dim, a.max_seq_len, a.rope_theta, a.rope_scaling, device=device)

    def num_flops_per_token(self, seq_len: int) -> int:
        """6 x active (non-embedding) parameters per token, plus attention scores and values."""
        a = self.args
        total = sum(p.numel() for p in self.parameters()) - self.tok_embeddings.weight.numel()
        moe_blocks = a.n_layers - a.n_dense_layers
        inactive = moe_blocks * 3 * a.dim * a.moe_inter_dim * (a.n_routed_experts - a.n_activated_experts)
        attention_flops = 6 * a.n_layers * a.n_heads * (a.qk_head_dim + a.v_head_dim) * seq_len
        return 6 * (total - inactive) + attention_flops

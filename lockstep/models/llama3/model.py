"""Llama 3 decoder, single-device code: RMSNorm, RoPE, grouped-query attention, SwiGLU, an output projection
of its own or tied to the embedding (``Llama3Args.tie_embeddings``).

Parallelism is applied from outside (``lockstep.parallel``); parameter names follow torchtitan's
so sharding plans and the Hugging Face adapter read naturally.
"""

from __future__ import annotations

import torch

from lockstep.models.common.attention import GroupedQueryAttention
from lockstep.models.common.decoder import Decoder, TransformerBlock
from lockstep.models.common.feed_forward import FeedForward
from lockstep.models.common.rope import rope_cos_sin
from lockstep.models.llama3.args import Llama3Args


def _block(a: Llama3Args) -> TransformerBlock:
    attention = GroupedQueryAttention(a.dim, n_heads=a.n_heads, n_kv_heads=a.kv_heads, head_dim=a.head_dim)
    return TransformerBlock(
        a.dim, norm_eps=a.norm_eps, attention=attention, feed_forward=FeedForward(a.dim, a.ffn_hidden_dim)
    )


class Llama3(Decoder):
    """Decoder-only Llama 3. Build it on the meta device, apply parallelism, then ``init_weights``."""

    depth_scaled = ("attention.wo.weight", "feed_forward.w2.weight", "feed_forward.w3.weight")

    def __init__(self, args: Llama3Args, attention_backend: str = "sdpa") -> None:
        super().__init__(args, attention_backend, {str(i): _block(args) for i in range(args.n_layers)})

    def _rope_table(self, device: torch.device | str) -> torch.Tensor:
        a = self.args
        return rope_cos_sin(a.head_dim, a.max_seq_len, a.rope_theta, a.rope_scaling, device=device)

    def num_flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 x (non-embedding params) for the matmuls forward+backward (a tied
        output projection counts: it is a matmul), plus 12 x layers x heads x head_dim x seq_len for
        attention scores and values (PaLM's formula)."""
        a = self.args
        n_params = sum(p.numel() for _, p in self.named_parameters(remove_duplicate=False))
        n_params -= self.tok_embeddings.weight.numel()
        return 6 * n_params + 12 * a.n_layers * a.n_heads * a.head_dim * seq_len

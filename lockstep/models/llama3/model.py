"""Llama 3 decoder, single-device code: RMSNorm, RoPE, grouped-query attention, SwiGLU, untied output.

Parallelism is applied from outside (``lockstep.parallel``); parameter names follow torchtitan's
so sharding plans and the Hugging Face adapter read naturally.
"""

from __future__ import annotations

import torch
from torch import nn

from lockstep.models.common import init as init_fns
from lockstep.models.common.attention import AttentionMasks, attention
from lockstep.models.common.decoder import Decoder, FeedForward
from lockstep.models.common.kv_cache import LayerCache
from lockstep.models.common.rope import apply_rope, rope_cos_sin
from lockstep.models.llama3.args import Llama3Args


class Attention(nn.Module):
    def __init__(self, args: Llama3Args) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(
        self, x_BSD: torch.Tensor, cos_sin: torch.Tensor, masks: AttentionMasks | None, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """`cache` (decoding): store this step's k/v (GQA: kv_heads of them) and attend over all cached."""
        batch, seq_len, _ = x_BSD.shape
        # -1 heads so tensor parallelism (which shards the head dim) needs no change here.
        q = self.wq(x_BSD).view(batch, seq_len, -1, self.head_dim)
        k = self.wk(x_BSD).view(batch, seq_len, -1, self.head_dim)
        v = self.wv(x_BSD).view(batch, seq_len, -1, self.head_dim)
        q, k = apply_rope(q, cos_sin), apply_rope(k, cos_sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v)
        out = attention(q, k, v, masks)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))


class TransformerBlock(nn.Module):
    def __init__(self, args: Llama3Args) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)

    def forward(
        self, x: torch.Tensor, cos_sin: torch.Tensor, masks: AttentionMasks | None, cache: LayerCache | None = None
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos_sin, masks, cache=cache)  # TP plans see 3 inputs
        return h + self.feed_forward(self.ffn_norm(h))


class Llama3(Decoder):
    """Decoder-only Llama 3. Build it on the meta device, apply parallelism, then ``init_weights``."""

    depth_scaled = ("attention.wo.weight", "feed_forward.w2.weight", "feed_forward.w3.weight")

    def __init__(self, args: Llama3Args, attention_backend: str = "sdpa") -> None:
        super().__init__(args, attention_backend, {str(i): TransformerBlock(args) for i in range(args.n_layers)})
        self.register_buffer("rope_cos_sin", self._rope_table(self.norm.weight.device), persistent=False)

    def _rope_table(self, device: torch.device | str) -> torch.Tensor:
        a = self.args
        return rope_cos_sin(a.head_dim, a.max_seq_len, a.rope_theta, a.rope_scaling, device=device)

    def init_weights(self, root_seed: int, device: torch.device | str) -> None:
        """Materialise (from meta) on `device` and fill every parameter from (root_seed, name)."""
        self.to_empty(device=device)
        init_fns.initialize_parameters(self, root_seed, self.init_for)
        self.rope_cos_sin = self._rope_table(device)

    def num_flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 x (non-embedding params) for the matmuls forward+backward, plus
        12 x layers x heads x head_dim x seq_len for attention scores and values (PaLM's formula)."""
        a = self.args
        n_params = sum(p.numel() for p in self.parameters()) - self.tok_embeddings.weight.numel()
        return 6 * n_params + 12 * a.n_layers * a.n_heads * a.head_dim * seq_len

"""Attention kernels and modules; the masks they take are lockstep.models.common.masks.

``model.attention = auto`` (the default) is FlexAttention on CUDA and SDPA elsewhere; the run
resolves it once (``resolve_attention_backend``) and the model is built with the result.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import flex_attention

from lockstep.config.errors import ConfigError
from lockstep.models.common.kv_cache import LayerCache
from lockstep.models.common.masks import AttentionMasks
from lockstep.models.common.rope import apply_rope

BACKENDS = ("sdpa", "flex")
"""What a model is built with; ``auto`` is resolved to one of these first."""


def resolve_attention_backend(setting: str, device_type: str) -> str:
    """The kernel a run uses, from ``model.attention`` and the device type, resolved once per run.

    auto is flex on CUDA (FlexAttention skips the masked-out 128x128 blocks of packed documents and
    holds no [B, 1, S, S] mask) and sdpa elsewhere. Explicit flex is refused off CUDA: torch 2.13's
    FlexAttention has a CPU forward but no CPU backward. Explicit sdpa is allowed everywhere.
    """
    if setting == "auto":
        return "flex" if device_type == "cuda" else "sdpa"
    if setting == "flex" and device_type != "cuda":
        raise ConfigError("model.attention", "FlexAttention has no CPU backward in torch 2.13; use auto or sdpa")
    if setting not in BACKENDS:
        raise ConfigError("model.attention", f"must be one of auto, {', '.join(BACKENDS)}; got {setting!r}")
    return setting


FLEX_KERNEL_OPTIONS = {"BACKEND": "TRITON"}
"""Pinned on CUDA: AUTO would take the decoding kernel for sequences under 128 (made for inference,
it splits the keys and combines the splits) and may take others in later versions. The Triton
forward gives each program one query block of one head. The Triton backward is deterministic: each
program owns one block of dQ (one query block of one head, looping over key blocks) or one block of
dK/dV (one key block, looping over the query heads of its group and the query blocks), and
stores it once with ``tl.store``; no atomics (torch/_inductor/kernel/flex/templates/
flex_backwards.py.jinja, grid in kernel/flex/flex_attention.py ``flex_attention_backward_grid``).
Atomics appear only for gradients of tensors a score_mod captures (``zeros_and_scatter``, kernel/
flex/common.py), and lockstep passes no score_mod. BACKEND = FLASH (flash-attn 4) is the one with
a nondeterministic dQ (kernel/flex/flex_flash_attention.py: deterministic only on SM100+ with
dq_write_order); AUTO does not choose it today, pinning TRITON keeps it so."""


@functools.cache
def _compiled_flex_attention():
    """FlexAttention compiled once, static shapes. Its kernel configuration is chosen without timing:
    without max-autotune inductor offers one forward and one backward config per (GPU, dtype, head
    dim) (torch/_inductor/template_heuristics/triton.py ``get_flex_attn_*_configs``), and under
    torch's deterministic mode the reductions around it are filtered to one config too
    (runtime/triton_heuristics.py ``filter_reduction_configs_for_determinism``)."""
    return torch.compile(flex_attention, dynamic=False)


def _flex_attention(q, k, v, block_mask, enable_gqa: bool, scale: float | None) -> torch.Tensor:
    kernel_options = FLEX_KERNEL_OPTIONS if q.is_cuda else None
    return _compiled_flex_attention()(
        q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, kernel_options=kernel_options
    )


def attention(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    masks: AttentionMasks | None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention, restricted to documents when masks say so. GQA when k/v have fewer heads.

    Without document masks both backends take SDPA with is_causal rather than FlexAttention with a
    causal BlockMask: on CUDA that is the flash (bf16) or memory-efficient (fp32) kernel, faster than
    FlexAttention's Triton kernel on a plain causal pattern, with no BlockMask to build per microbatch;
    its backward is deterministic under strict debug.deterministic (torch then runs the kernels'
    deterministic backward), and ``lockstep audit`` flags it otherwise, whichever backend is set.
    `scale` replaces 1/sqrt(head_dim) (YaRN's mscale). Masks with ``chunk_size`` run one SDPA call per
    chunk (``chunked_attention``)."""
    enable_gqa = k_BHSD.shape[1] != q_BHSD.shape[1]
    if masks is not None and masks.chunk_size is not None:
        return chunked_attention(q_BHSD, k_BHSD, v_BHSD, masks, scale)
    if masks is not None and masks.block_mask is not None:
        return _flex_attention(q_BHSD, k_BHSD, v_BHSD, masks.block_mask, enable_gqa, scale)
    if masks is not None and masks.sdpa_mask is not None:
        return F.scaled_dot_product_attention(
            q_BHSD, k_BHSD, v_BHSD, attn_mask=masks.sdpa_mask, scale=scale, enable_gqa=enable_gqa
        )
    return F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD, is_causal=True, scale=scale, enable_gqa=enable_gqa)


def chunked_attention(
    q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, masks: AttentionMasks, scale: float | None
) -> torch.Tensor:
    """Local attention within chunks of ``masks.chunk_size`` positions (Llama 4): chunks never see each
    other, so each is its own causal SDPA call over at most chunk x chunk scores, with its rows of the
    [B, 1, S, chunk] document mask when there is one. No [S, S] tensor exists at any point."""
    enable_gqa = k_BHSD.shape[1] != q_BHSD.shape[1]
    seq_len, chunk = q_BHSD.shape[2], masks.chunk_size
    outputs = []
    for start in range(0, seq_len, chunk):
        end = min(start + chunk, seq_len)
        q, k, v = q_BHSD[:, :, start:end], k_BHSD[:, :, start:end], v_BHSD[:, :, start:end]
        if masks.sdpa_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
        else:
            rows = masks.sdpa_mask[:, :, start:end, : end - start]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=rows, scale=scale, enable_gqa=enable_gqa)
        outputs.append(out)
    return torch.cat(outputs, dim=2)


class SharedAcrossHeads(nn.Module):
    """Broadcasts a tensor every head shares (DeepSeek-V3's RoPE part of the key, [B, S, 1, D]; a
    QK-norm weight, [1, 1, 1, D]) to `heads` heads. A module of its own so that a parallel plan can
    decide how its gradient, a sum over the heads, is taken (lockstep.parallel.canonical_linear); on
    one device it is ``expand``."""

    def forward(self, x_BS1D: torch.Tensor, heads: int) -> torch.Tensor:
        return x_BS1D.expand(-1, -1, heads, -1)


class HeadNorm(nn.Module):
    """RMSNorm over each head's dims of [B, S, H, D] (Qwen3's QK-norm), one weight [D] for all heads.

    The normalisation is weightless and the weight reaches the heads through ``SharedAcrossHeads``:
    its gradient is a sum over the heads, which tensor parallelism splits, so the parallel plan
    decides how that sum is taken (all-reduced, or in canonical chunks under debug.deterministic)."""

    def __init__(self, head_dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(head_dim))
        self.eps = eps
        self.share = SharedAcrossHeads()

    def forward(self, x_BSHD: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x_BSHD, (x_BSHD.shape[-1],), None, self.eps)
        return normed * self.share(self.weight.view(1, 1, 1, -1), x_BSHD.shape[2])


class AttentionTemperature(nn.Module):
    """Llama 4's attention temperature on its NoPE layers: queries at position p are scaled by
    1 + attn_scale * log(1 + floor((p + 1) / floor_scale)), sharpening attention at long range
    (arXiv 2501.19399). Positions are the window's (0..S-1) in training, and each token's own under a
    KV cache; 1 for the first floor_scale - 1 positions."""

    def __init__(self, *, floor_scale: float, attn_scale: float) -> None:
        super().__init__()
        self.floor_scale, self.attn_scale = floor_scale, attn_scale

    def forward(self, q_BSHD: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`positions`: [S] or [B, S]."""
        scales = torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
        scales = scales.view(*([1] if positions.dim() == 1 else []), *positions.shape, 1, 1)
        return (q_BSHD * scales).to(q_BSHD.dtype)


class GroupedQueryAttention(nn.Module):
    """Multi-head attention with grouped key/value heads (GQA; kv heads == heads is plain MHA), RoPE
    on q and k, and optionally QK-norm. Llama 3, Qwen3 and Llama 4 share it; parameter names follow
    torchtitan's (wq, wk, wv, wo).

    Options (keyword-only): `qk_norm_eps` is Qwen3's QK-norm, ``HeadNorm`` on each head's q and k before
    RoPE; `l2_qk_norm_eps` is Llama 4's, a weightless RMS norm after RoPE; `rope` False is a NoPE layer
    (Llama 4's every fourth), `temperature` scales its queries by position; `chunked` takes the
    chunked-attention masks (``AttentionMasks.for_chunked_layers``)."""

    def __init__(
        self,
        dim: int,
        *,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        qk_norm_eps: float | None = None,
        l2_qk_norm_eps: float | None = None,
        rope: bool = True,
        temperature: AttentionTemperature | None = None,
        chunked: bool = False,
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.q_norm = HeadNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = HeadNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.l2_qk_norm_eps = l2_qk_norm_eps
        self.rope, self.chunked = rope, chunked
        self.temperature = temperature

    def forward(
        self, x_BSD: torch.Tensor, cos_sin: torch.Tensor, masks: AttentionMasks | None, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """`cache` (decoding): store this step's k/v (GQA: kv_heads of them) and attend over all cached."""
        batch, seq_len, _ = x_BSD.shape
        # -1 heads so tensor parallelism (which shards the head dim) needs no change here.
        q = self.wq(x_BSD).view(batch, seq_len, -1, self.head_dim)
        k = self.wk(x_BSD).view(batch, seq_len, -1, self.head_dim)
        v = self.wv(x_BSD).view(batch, seq_len, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope(q, cos_sin), apply_rope(k, cos_sin)
        if self.l2_qk_norm_eps is not None:
            q, k = _weightless_rms_norm(q, self.l2_qk_norm_eps), _weightless_rms_norm(k, self.l2_qk_norm_eps)
        if self.temperature is not None:
            positions = cache.owner.positions_BS if cache is not None else torch.arange(seq_len, device=q.device)
            q = self.temperature(q, positions)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v)
        if self.chunked and masks is not None:
            masks = masks.for_chunked_layers()
        out = attention(q, k, v, masks)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))


def _weightless_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm without a weight, in fp32 (Llama 4's "L2" QK-norm, as transformers computes it)."""
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).type_as(x)

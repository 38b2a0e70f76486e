"""Rotary position embeddings in Meta's interleaved convention (pairs (0,1), (2,3), ...).

Hugging Face stores q/k projections for the rotate-half convention; the state dict adapters
permute their rows (``halves_to_interleaved``), so the model code keeps Meta's layout (the one
torchtitan uses too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's frequency scaling for long context (Meta's `apply_scaling`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def inverse_frequencies(head_dim: int, theta: float, scaling: Llama3RopeScaling | None) -> torch.Tensor:
    """fp32 [head_dim/2] inverse frequencies, scaled as Llama 3.1 does when scaling is given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is not None:
        low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        is_medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(is_medium, smoothed, inv_freq)
    return inv_freq.float()


def rope_cos_sin(
    head_dim: int,
    max_seq_len: int,
    theta: float,
    scaling: Llama3RopeScaling | None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """[max_seq_len, head_dim/2, 2] table of (cos, sin) per position and frequency."""
    inv_freq = inverse_frequencies(head_dim, theta, scaling).to(device)
    positions = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rope(x_BSHD: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim of x [B, S, H, D] by the table [S, D/2, 2] (positions
    0..S-1, training), or by per-row rows of it [B, S, D/2, 2] (decoding: the table gathered at each
    token's position, see lockstep.models.common.kv_cache)."""
    seq_len = x_BSHD.shape[1]
    pairs = x_BSHD.float().unflatten(-1, (-1, 2))
    if cos_sin.dim() == 4:
        cos, sin = cos_sin[:, :, None, :, 0], cos_sin[:, :, None, :, 1]
    else:
        cos = cos_sin[:seq_len, None, :, 0]
        sin = cos_sin[:seq_len, None, :, 1]
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x_BSHD)


def interleaved_to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of `heads` heads (dim 0) from interleaved pairs (x0, x1), (x2, x3) ... to halves (x0, x_{d/2}) ...,
    the layout Hugging Face's rotate-half RoPE expects; any trailing dims (a weight's inputs) ride along."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def halves_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of ``interleaved_to_halves``."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, -1).transpose(1, 2).reshape(w.shape)

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


@dataclass(frozen=True)
class YarnRopeScaling:
    """YaRN (arXiv 2309.00071) as DeepSeek-V3 uses it for 128K context: frequencies below the
    correction range are interpolated by `factor`, those above kept, a linear ramp between; the
    attention logits are sharpened by mscale (DeepSeek: on the softmax scale, mscale_all_dim; on
    cos/sin, the ratio of the two mscales, 1 when they are equal, as in DeepSeek-V3's config)."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    attention_factor: float | None = None
    """Scale of cos/sin when given explicitly (else derived from the mscales, as transformers does)."""
    truncate: bool = True
    """Round the correction range outwards to whole dims (DeepSeek's YaRN); false keeps it fractional."""

    def __post_init__(self) -> None:
        if not (
            self.factor > 0 and self.original_max_position_embeddings > 0 and self.beta_fast > 0 and self.beta_slow > 0
        ):
            raise ValueError(
                "YaRN needs factor, original_max_position_embeddings, beta_fast and beta_slow > 0; got "
                f"{self.factor}, {self.original_max_position_embeddings}, {self.beta_fast}, {self.beta_slow}"
            )

    @staticmethod
    def _mscale(factor: float, mscale: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0

    @property
    def cos_sin_factor(self) -> float:
        """What the cos/sin table is multiplied by."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return self._mscale(self.factor, self.mscale) / self._mscale(self.factor, self.mscale_all_dim)
        return self._mscale(self.factor, 1.0)

    @property
    def softmax_scale_factor(self) -> float:
        """What 1/sqrt(head_dim) is multiplied by (mscale_all_dim squared: it scales both q and k)."""
        return self._mscale(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0

    def inverse_frequencies(self, head_dim: int, theta: float) -> torch.Tensor:
        """fp32, computed as transformers computes them (fp32), so logits match it to rounding."""

        def correction_dim(rotations: float) -> float:
            return (
                head_dim
                * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi))
                / (2 * math.log(theta))
            )

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        powers = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
        keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide it by factor)
        return (1.0 / (self.factor * powers)) * (1 - keep) + (1.0 / powers) * keep


RopeScaling = Llama3RopeScaling | YarnRopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """fp32 [head_dim/2] inverse frequencies, scaled as Llama 3.1 or YaRN do when scaling is given."""
    if isinstance(scaling, YarnRopeScaling):
        return scaling.inverse_frequencies(head_dim, theta)
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
    scaling: RopeScaling | None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """[max_seq_len, head_dim/2, 2] table of (cos, sin) per position and frequency."""
    inv_freq = inverse_frequencies(head_dim, theta, scaling).to(device)
    positions = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)
    table = torch.stack((angles.cos(), angles.sin()), dim=-1)
    if isinstance(scaling, YarnRopeScaling) and scaling.cos_sin_factor != 1.0:
        table = table * scaling.cos_sin_factor
    return table


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

"""Where each element of a lockstep parameter lives in a Hugging Face checkpoint, so that a rank can
read only the part of the checkpoint its shard of the parameter covers (instead of converting the
whole model and slicing it afterwards).

A model's Hugging Face adapter describes each parameter as a set of boxes (``HFPiece``), each copied
from a box of one Hugging Face tensor, plus at most one transform that acts on whole blocks of rows
(Llama's q/k row permutation within each head). Checkpoint readers intersect these boxes with the
shard they hold; the model code stays free of any knowledge of sharding or storage.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from lockstep.models.common.rope import Llama3RopeScaling

DECODER_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
"""Every family's parameters outside the blocks, lockstep -> Hugging Face (the Decoder base holds them)."""

LAYER_NAME = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
"""A block's parameter (lockstep's ``layers.N.rest``, or Hugging Face's ``model.layers.N.rest``): N, rest."""


def table_hf_name(name: str, top: dict[str, str], block: dict[str, str], why: str = "") -> str:
    """The Hugging Face name of a lockstep parameter from an adapter's name tables: `top` for whole
    names (embeddings, final norm, output), `block` for the suffixes under each ``layers.N``."""
    if name in top:
        return top[name]
    match = LAYER_NAME.match(name)
    if match and match.group(2) in block:
        return f"model.layers.{match.group(1)}.{block[match.group(2)]}"
    raise KeyError(f"no single Hugging Face name for {name!r}{why}")


@dataclass(frozen=True)
class HFPiece:
    """The box of a lockstep parameter at `at` (one offset per lockstep dim) of extent `size` is the
    box of Hugging Face tensor `name` at `hf_at`. When the Hugging Face tensor has fewer dims (one
    tensor per expert), the piece's leading lockstep dims have extent 1 and are dropped."""

    name: str
    hf_shape: tuple[int, ...]
    """The whole Hugging Face tensor's shape, checked against the checkpoint before anything is read."""
    at: tuple[int, ...]
    size: tuple[int, ...]
    hf_at: tuple[int, ...]
    transposed: bool = False
    """The Hugging Face tensor holds the box with its last two dims swapped (Llama 4's experts store
    [E, in, out] where lockstep holds [E, out, in]); `hf_shape` and `hf_at` are in its own order."""


@dataclass(frozen=True)
class HFSource:
    """How one lockstep parameter is read from a Hugging Face checkpoint. No pieces: a tensor that
    Hugging Face checkpoints do not hold (Qwen3-MoE's routing bias), which reads as zeros."""

    pieces: tuple[HFPiece, ...]
    row_block: int = 0
    """When non-zero, `rows_from_hf` must see whole blocks of this many rows (dim 0)."""
    rows_from_hf: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Maps rows read in Hugging Face order to lockstep order; row-local per block of `row_block`
    rows, so it can be applied to any block-aligned range of rows on its own."""


def whole(name: str, shape: torch.Size | tuple[int, ...]) -> HFPiece:
    """A lockstep parameter that is one Hugging Face tensor of the same shape."""
    shape = tuple(shape)
    return HFPiece(name, shape, (0,) * len(shape), shape, (0,) * len(shape))


# Grouped experts (lockstep.models.common.moe): one [E, out, in] weight per projection here; one
# tensor per expert in Hugging Face checkpoints (DeepSeek-V3 and Qwen3-MoE alike), and in
# transformers' memory one fused [E, 2 * out, in] gate_up_proj plus down_proj per layer.

EXPERT_PROJECTIONS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
"""lockstep's grouped expert weight -> the Hugging Face projection of each expert."""
_HF_EXPERT = re.compile(r"^(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def experts_to_hf(hf_prefix: str, weight: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """Grouped `weight` (w1, w2 or w3) [E, out, in] -> the E tensors ``{hf_prefix}.{e}.{projection}.weight``."""
    projection = EXPERT_PROJECTIONS[weight]
    return {f"{hf_prefix}.{e}.{projection}.weight": value[e].clone() for e in range(value.shape[0])}


class ExpertsFromHF:
    """Collects Hugging Face expert tensors (per expert, or transformers' fused in-memory layout) of
    any number of layers and stacks them into lockstep's grouped weights."""

    def __init__(self) -> None:
        self._whole: dict[str, torch.Tensor] = {}
        self._per_expert: dict[tuple[str, str], dict[int, torch.Tensor]] = {}

    def add(self, prefix: str, rest: str, value: torch.Tensor) -> bool:
        """`rest`: a Hugging Face name after ``...mlp.experts.``; `prefix`: lockstep's name of the
        experts module (``layers.3.moe.experts``). False when `rest` is not an expert tensor."""
        if rest == "gate_up_proj":  # fused: rows [:I] gate, [I:] up
            half = value.shape[1] // 2
            self._whole[f"{prefix}.w1"], self._whole[f"{prefix}.w3"] = value[:, :half], value[:, half:]
        elif rest == "down_proj":
            self._whole[f"{prefix}.w2"] = value
        elif match := _HF_EXPERT.match(rest):
            self._per_expert.setdefault((prefix, match.group(2)), {})[int(match.group(1))] = value
        else:
            return False
        return True

    def result(self) -> dict[str, torch.Tensor]:
        ours = {v: k for k, v in EXPERT_PROJECTIONS.items()}
        out = dict(self._whole)
        for (prefix, projection), per_expert in self._per_expert.items():
            out[f"{prefix}.{ours[projection]}"] = torch.stack([per_expert[e] for e in sorted(per_expert)])
        return out


def experts_source(hf_prefix: str, weight: str, shape: torch.Size, hf_names: Collection[str]) -> HFSource:
    """How a rank reads its shard of grouped `weight` [E, out, in] of the experts at `hf_prefix`
    (``model.layers.3.mlp.experts``): E pieces, one per Hugging Face expert tensor, so a rank holding
    experts [a, b) reads only those; a folder in the fused layout (gate_up_proj [E, 2*out, in]) gives
    w1 its first and w3 its second half of rows."""
    projection = EXPERT_PROJECTIONS[weight]
    experts, rows, cols = shape
    if f"{hf_prefix}.0.{projection}.weight" not in hf_names and f"{hf_prefix}.down_proj" in hf_names:
        if projection == "down_proj":
            return HFSource((whole(f"{hf_prefix}.down_proj", shape),))
        start = rows if projection == "up_proj" else 0
        fused = HFPiece(f"{hf_prefix}.gate_up_proj", (experts, 2 * rows, cols), (0, 0, 0), tuple(shape), (0, start, 0))
        return HFSource((fused,))
    return HFSource(
        tuple(
            HFPiece(f"{hf_prefix}.{e}.{projection}.weight", (rows, cols), (e, 0, 0), (1, rows, cols), (0, 0))
            for e in range(experts)
        )
    )


def llama3_scaling_to_hf(scaling: Llama3RopeScaling | None) -> dict | None:
    """config.json's ``rope_scaling`` of Llama 3.1-style frequency scaling (Llama 3, Llama 4 Scout)."""
    if scaling is None:
        return None
    return {
        "rope_type": "llama3",
        "factor": scaling.factor,
        "low_freq_factor": scaling.low_freq_factor,
        "high_freq_factor": scaling.high_freq_factor,
        "original_max_position_embeddings": scaling.original_max_position_embeddings,
    }


def hf_rope_table(config: dict) -> dict:
    """config.json's RoPE settings, ``rope_scaling`` or (transformers 5) ``rope_parameters``; {} if none."""
    return config.get("rope_scaling") or config.get("rope_parameters") or {}


def hf_rope_type(config: dict) -> str:
    scaling = hf_rope_table(config)
    return scaling.get("rope_type", scaling.get("type")) or "default"


def llama3_scaling_from_hf(config: dict) -> Llama3RopeScaling | None:
    """The Llama 3.1-style scaling a config.json names, or None for any other RoPE type."""
    if hf_rope_type(config) != "llama3":
        return None
    scaling = hf_rope_table(config)
    return Llama3RopeScaling(
        factor=scaling["factor"],
        low_freq_factor=scaling["low_freq_factor"],
        high_freq_factor=scaling["high_freq_factor"],
        original_max_position_embeddings=scaling["original_max_position_embeddings"],
    )


def refuse_moved_routing_bias(name: str, value: torch.Tensor, model: str) -> None:
    """Refuse to export a routing bias that is not zero: `model`'s router in transformers has none (Qwen3-MoE,
    Llama 4), so only a bias that bias_update_speed never moved is exact as nothing."""
    if not value.is_meta and bool(value.any()):
        raise ValueError(
            f"{name} is not zero: transformers' {model} routes without a bias, so this model cannot be "
            "exported exactly (it was trained with bias_update_speed > 0)"
        )

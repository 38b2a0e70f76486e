"""Llama 4 text architecture: the args dataclass and the flavor table. Architecture only, no run settings.

Where torchtitan and transformers disagree, lockstep follows transformers and the published
checkpoints (their weights must load and give the same logits); docs/models.md lists the differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lockstep.models.common.rope import Llama3RopeScaling


@dataclass(frozen=True)
class Llama4Args:
    dim: int = 5120
    """Hidden size."""
    n_layers: int = 48
    """Transformer blocks."""
    n_heads: int = 40
    """Query heads."""
    n_kv_heads: int | None = 8
    """Key/value heads (grouped-query attention); None means n_heads."""
    head_dim: int = 128
    """Per-head dims, explicit (as in the published config.json)."""
    vocab_size: int = -1
    """-1: set from the tokenizer at build time; a real flavor fixes it (202048 rows)."""
    ffn_hidden_dim: int = 16384
    """Hidden size of the dense SwiGLU blocks (transformers' intermediate_size_mlp)."""
    moe_inter_dim: int = 8192
    """Hidden size of each routed expert and of the shared expert (transformers' intermediate_size)."""
    n_routed_experts: int = 16
    """Experts per MoE block."""
    n_activated_experts: int = 1
    """Experts per token (top-k; 1 in every published Llama 4)."""
    n_shared_experts: int = 1
    """Shared experts, which see every token, added to the routed output."""
    interleave_moe_layer_step: int = 1
    """Every this many blocks is an MoE block: blocks step-1, 2*step-1, ...; the others are dense
    (Scout: 1, all MoE; Maverick: 2, odd blocks MoE)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon (the block norms and the QK-norm)."""
    rope_theta: float = 500000.0
    """RoPE base."""
    rope_scaling: Llama3RopeScaling | None = None
    """Llama 3.1-style frequency scaling (Scout); None for plain RoPE (Maverick)."""
    max_seq_len: int = 8192
    """Length of the RoPE table; set to the training sequence length at build time."""
    nope_layer_interval: int = 4
    """Every this many blocks has no RoPE (NoPE; blocks interval-1, 2*interval-1, ..., as transformers'
    no_rope_layers); 0: every block rotates."""
    attention_chunk_size: int | None = 8192
    """The RoPE blocks attend only within chunks of this many positions (chunked local attention); the
    NoPE blocks attend over the whole window. None: every block attends over the whole window."""
    use_qk_norm: bool = True
    """A weightless RMS norm on q and k after RoPE, on the RoPE blocks (Scout: on; Maverick: off)."""
    attn_temperature_tuning: bool = True
    """The NoPE blocks scale their queries by 1 + attn_scale * log(1 + floor((pos + 1) / floor_scale))."""
    floor_scale: int = 8192
    """Positions per step of the attention temperature."""
    attn_scale: float = 0.1
    """Strength of the attention temperature."""
    tie_embeddings: bool = False
    """The output projection is the embedding matrix (no published Llama 4 ties them)."""
    bias_update_speed: float = 0.0
    """Auxiliary-loss-free balancing (torchtitan's load_balance_coeff, 1e-3 there): the routing bias
    moves by this per step. Off by default: transformers' Llama 4 router has no bias, so a moved bias
    could not be exported (convert to-hf refuses it)."""
    seq_aux_loss_alpha: float = 0.0
    """Weight of the sequence-wise balance loss (training only; exports stay exact)."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def is_moe_block(self, layer_id: int) -> bool:
        return (layer_id + 1) % self.interleave_moe_layer_step == 0

    def uses_rope(self, layer_id: int) -> bool:
        return self.nope_layer_interval == 0 or (layer_id + 1) % self.nope_layer_interval != 0

    @property
    def block_period(self) -> int:
        """Blocks after which the pattern of block kinds (MoE or dense, RoPE or NoPE) repeats."""
        return math.lcm(self.interleave_moe_layer_step, max(self.nope_layer_interval, 1))

    @property
    def n_moe_blocks(self) -> int:
        return sum(self.is_moe_block(i) for i in range(self.n_layers))

    @classmethod
    def from_dict(cls, values: dict) -> Llama4Args:
        """Inverse of dataclasses.asdict (as recorded in checkpoint manifests)."""
        scaling = values.get("rope_scaling")
        return cls(**values | {"rope_scaling": Llama3RopeScaling(**scaling) if scaling else None})

    def validate(self) -> None:
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads {self.kv_heads} does not divide n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (RoPE rotates pairs)")
        if self.vocab_size <= 0:
            raise ValueError("vocab_size must be set from the tokenizer before building the model")
        if not 0 < self.n_activated_experts <= self.n_routed_experts or self.moe_inter_dim <= 0:
            raise ValueError("Llama 4 needs 0 < n_activated_experts <= n_routed_experts and moe_inter_dim > 0")
        if self.interleave_moe_layer_step < 1 or self.nope_layer_interval < 0:
            raise ValueError("interleave_moe_layer_step must be >= 1 and nope_layer_interval >= 0")
        if self.attention_chunk_size is not None and self.attention_chunk_size < 1:
            raise ValueError("attention_chunk_size must be a positive number of positions, or None")
        if self.floor_scale < 1:
            raise ValueError("floor_scale must be >= 1")


LLAMA4_VOCAB = 202048
"""Rows of the published checkpoints' embedding and output matrices."""

_SCOUT_SCALING = Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)

LLAMA4_FLAVORS: dict[str, Llama4Args] = {
    # Tiny, with every Llama 4 feature exercised at seq_len 256: chunks of 64, a NoPE block (3) whose
    # temperature changes every 32 positions, dense blocks (0, 2) between MoE blocks (1, 3) with a
    # shared expert, QK-norm on the RoPE blocks.
    "debug": Llama4Args(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, ffn_hidden_dim=768, moe_inter_dim=256,
        n_routed_experts=8, interleave_moe_layer_step=2, attention_chunk_size=64, floor_scale=32,
        seq_aux_loss_alpha=0.001,
    ),
    "17B-16E": Llama4Args(
        vocab_size=LLAMA4_VOCAB, n_routed_experts=16, interleave_moe_layer_step=1, rope_scaling=_SCOUT_SCALING,
        use_qk_norm=True,
    ),
    "17B-128E": Llama4Args(
        vocab_size=LLAMA4_VOCAB, n_routed_experts=128, interleave_moe_layer_step=2, rope_scaling=None,
        use_qk_norm=False,
    ),
}  # fmt: skip
"""Scout (17B-16E: 16 experts in every block) and Maverick (17B-128E: 128 experts in every other
block, dense blocks between), text only, from the published config.json: dim 5120, 48 blocks, 40
query and 8 key/value heads of 128, experts and shared expert of 8192, dense blocks of 16384, top-1
sigmoid routing with the score applied before the experts, chunks of 8192, NoPE every fourth block."""
